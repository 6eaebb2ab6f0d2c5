"""CPU inference options: int8 quantization of the ONNX graph (``quantized_onnx``, ``OnnxNetwork(quantization=)``),
the ``inference_cpu_fast.json`` layer of the finetuning bundles, and the window count of the whole-CT benchmark.

Fast: a hand-built ONNX graph (3D convolution, ReLU, a linear layer over the channels) instead of an export.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from hybridmim_components.workflow.onnx_inference import OnnxNetwork, quantized_onnx  # noqa: E402
from tools.bundles.bundlegen.finetune import BACKBONES, TASKS, bundle_name  # noqa: E402
from tools.bundles.bundlegen.onnx import CPU_FAST, EXPORTABLE  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLES_DIR = os.path.join(REPO_ROOT, "bundles")
SIDE = 8


def _tiny_model(path: str, seed: int = 0) -> None:
    """``x`` ``B x 2 x 8 x 8 x 8`` -> Conv3d(2->16, 3, pad 1) -> ReLU -> per-voxel linear 16->3 -> ``B x 3 x 8^3``."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((16, 2, 3, 3, 3)).astype(np.float32) * 0.3
    b = rng.standard_normal(16).astype(np.float32) * 0.1
    lin = rng.standard_normal((16, 3)).astype(np.float32) * 0.5
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1] * 6, kernel_shape=[3, 3, 3]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 3, 4, 1]),  # B x D x H x W x 16
        helper.make_node("MatMul", ["t", "lin"], ["m"]),  # B x D x H x W x 3
        helper.make_node("Transpose", ["m"], ["y"], perm=[0, 4, 1, 2, 3]),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2, SIDE, SIDE, SIDE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, SIDE, SIDE, SIDE])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"),
                     numpy_helper.from_array(lin, "lin")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def _op_types(path: str) -> set:
    return {n.op_type for n in onnx.load(path).graph.node}


def test_int8_quantization_is_cached_close_to_float32_and_reaches_the_session(tmp_path):
    path = str(tmp_path / "model.onnx")
    _tiny_model(path)
    x = torch.rand(2, 2, SIDE, SIDE, SIDE)
    ref = OnnxNetwork(path)(x)
    net = OnnxNetwork(path, quantization="int8")
    assert net.model_path != path and os.path.dirname(net.model_path) == str(tmp_path)
    ops = _op_types(net.model_path)
    assert "ConvInteger" in ops and "MatMulInteger" in ops and "Conv" not in ops
    y = net(x)
    assert y.shape == ref.shape and y.dtype == torch.float32
    err = float((y - ref).abs().max())
    assert 0 < err < 0.05 * float(ref.abs().max()), err  # quantized (not the float graph), yet close
    # cached: a second load reuses the file; a changed model gets a new copy, not the stale one
    mtime = os.path.getmtime(net.model_path)
    assert quantized_onnx(path, "int8") == net.model_path and os.path.getmtime(net.model_path) == mtime
    _tiny_model(path, seed=1)
    assert quantized_onnx(path, "int8") != net.model_path
    assert not [n for n in os.listdir(tmp_path) if ".part" in n]  # written atomically, no leftovers


def test_int8_linear_keeps_convolutions_float(tmp_path):
    path = str(tmp_path / "model.onnx")
    _tiny_model(path)
    ops = _op_types(quantized_onnx(path, "int8_linear"))
    assert "Conv" in ops and "ConvInteger" not in ops and "MatMulInteger" in ops
    assert quantized_onnx(path, "none") == path


def test_unknown_quantization_is_named(tmp_path):
    path = str(tmp_path / "model.onnx")
    _tiny_model(path)
    with pytest.raises(ValueError, match=r"quantization must be one of .*got 'int4'"):
        OnnxNetwork(path, quantization="int4")
    with pytest.raises(ValueError, match=r"'fp8'"):
        quantized_onnx(path, "fp8")


@pytest.mark.parametrize("backbone", sorted(EXPORTABLE))
def test_cpu_fast_layer_reaches_inferer_and_session(backbone, tmp_path):
    """``inference.json`` + ``inference_onnx.json`` + ``inference_cpu_fast.json`` parsed as MONAI merges them: the
    fast layer's overlap, batch and quantization arrive in the inferer and the onnxruntime session, while
    ``inference.json`` alone keeps the paper's sliding window."""
    from monai.bundle import ConfigParser

    _tiny_model(str(tmp_path / "model.onnx"))
    configs = os.path.join(BUNDLES_DIR, bundle_name(backbone, "btcv"), "configs")
    parser = ConfigParser()
    parser.read_config([os.path.join(configs, c) for c in
                        ("inference.json", "inference_onnx.json", "inference_cpu_fast.json")])
    parser.update({"ckpt_dir": str(tmp_path), "check_trained_settings": False})
    fast = CPU_FAST[backbone]
    inferer = parser.get_parsed_content("inferer")
    assert (inferer.overlap[0] if isinstance(inferer.overlap, (list, tuple)) else inferer.overlap) == fast["overlap"]
    assert inferer.sw_batch_size == fast["sw_batch_size"]
    net = parser.get_parsed_content("network")
    assert isinstance(net, OnnxNetwork) and net.quantization == fast["quantization"]
    assert (net.model_path != net.path) == (fast["quantization"] != "none")
    default = ConfigParser()
    default.read_config(os.path.join(configs, "inference.json"))
    assert default["inferer"]["overlap"] == 0.5 and default["inferer"]["sw_batch_size"] == 4
    with open(os.path.join(configs, "inference_onnx.json")) as f:
        assert json.load(f)["onnx_quantization"] == "none"  # the ONNX layer alone stays float32


def test_cpu_fast_layer_changes_only_the_sliding_window_and_quantization():
    for backbone in BACKBONES:
        for task in TASKS:
            configs = os.path.join(BUNDLES_DIR, bundle_name(backbone, task), "configs")
            with open(os.path.join(configs, "inference_cpu_fast.json")) as f:
                fast = json.load(f)
            assert set(fast) == {"sw_overlap", "sw_batch_size", "onnx_quantization", "inferer"}, (backbone, task)
            with open(os.path.join(configs, "inference.json")) as f:
                base = json.load(f)["inferer"]
            # the same inferer as inference.json's, with its two numbers made keys
            assert {**fast["inferer"], "overlap": base["overlap"], "sw_batch_size": base["sw_batch_size"]} == base


def test_window_count_matches_monai():
    from monai.inferers.utils import _get_scan_interval
    from monai.data.utils import dense_patch_slices

    from tools.benchmarks.benchmark_whole_ct import window_count

    for shape in [(244, 202, 168), (96, 96, 96), (97, 50, 300), (233, 167, 143)]:
        for overlap in (0.25, 0.5):
            roi = (96, 96, 96)
            padded = [max(s, r) for s, r in zip(shape, roi)]
            interval = _get_scan_interval(padded, roi, 3, (overlap,) * 3)
            assert window_count(shape, roi, overlap) == len(dense_patch_slices(padded, roi, interval)), shape


def test_benchmark_combine_recomputes_agreement_against_a_reference_run_earlier(tmp_path):
    """Two reports of tools/benchmarks/benchmark_whole_ct.py (the reference in the first, a further setting in the
    second) merge into one table whose agreement compares the later setting with the earlier reference."""
    import nibabel as nib

    from tools.benchmarks.benchmark_whole_ct import main

    ref = np.zeros((10, 10, 10), np.uint8)
    ref[2:6, 2:6, 2:6] = 6  # 64 voxels of label 6
    other = ref.copy()
    other[2, 2:6, 2:6] = 0  # 16 of them lost: Dice 2*48/(64+48)
    other[8, 8, 8] = 1  # a label the reference lacks: Dice 0
    paths = {}
    for name, array in (("torch", ref), ("overlap", other)):
        paths[name] = str(tmp_path / f"{name}_seg.nii.gz")
        nib.save(nib.Nifti1Image(array, np.eye(4)), paths[name])

    def report(name: str, rate: float) -> str:
        run = {"end_to_end_s": 10.0, "sliding_window_s": 8.0, "windows": 4, "gflops": 20.0, "fraction_of_matmul": 1.0,
               "load_average_1min": 1.0, "label_map": paths[name]}
        out = {"command": f"run {name}", "machine": "test", "matmul_gflops_runs": [rate], "matmul_gflops": rate,
               "reference": name, "settings": {name: {"layers": "onnx", "overrides": {}}},
               "results": {"unet": {"models": "m", "gflop_per_window": 40.0, "runs": {"ct": {name: run}}}}}
        path = str(tmp_path / f"{name}.json")
        with open(path, "w") as f:
            json.dump(out, f)
        return path

    output = str(tmp_path / "combined.json")
    assert main(["--combine", report("torch", 40.0), report("overlap", 80.0), "--output", output]) == 0
    with open(output) as f:
        combined = json.load(f)
    runs = combined["results"]["unet"]["runs"]["ct"]
    assert set(runs) == {"torch", "overlap"} and "agreement" not in runs["torch"]
    agree = runs["overlap"]["agreement"]
    assert agree["voxels_differing"] == 17 and agree["voxels"] == 1000
    assert agree["dice_per_label"] == {"1": 0.0, "6": round(96 / 112, 5)} and agree["dice_min"] == 0.0
    assert combined["matmul_gflops"] == 80.0 and runs["torch"]["fraction_of_matmul"] == 0.25  # the best rate
    with open(str(tmp_path / "combined.md")) as f:
        table = f.read()
    assert "| unet | ct | overlap |" in table and "| reference |" in table
