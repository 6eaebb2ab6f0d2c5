"""ONNX for CPU inference: ``python -m monai.bundle onnx_export`` of every finetuning bundle and
``configs/inference_onnx.json`` (an onnxruntime session in the pipeline of ``inference.json``).

In process (fast): the accurate instance norm against float64 PyTorch where onnxruntime's own kernel is off, the
wrapper's errors, and that ``inference_onnx.json`` changes nothing of ``inference.json`` but the network, device,
mixed precision and checkpoint loading. Through the MONAI CLI (slow): each bundle's documented export command on a
tiny-width network, then onnxruntime against PyTorch logits (within 1e-4) on patches of the real demo CT (BraTS:
random 4-channel patches with a zero background; there is no real MRI among the test data), for a batch smaller and
one larger than the export's; and for the BTCV bundles the label maps of ``inference.json`` and of
``inference_onnx.json`` on a crop of the real CT, identical, with a partial last sliding-window batch.
"""
from __future__ import annotations

import glob
import json
import os
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from hybridmim_components.workflow import OnnxNetwork  # noqa: E402
from hybridmim_components.workflow.onnx_inference import stable_instance_norm  # noqa: E402
from tools.bundles.bundlegen.finetune import BACKBONES, TASKS, bundle_name  # noqa: E402
from tools.bundles.bundlegen.onnx import EXPORTABLE, export_command  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLES_DIR = os.path.join(REPO_ROOT, "bundles")
CASES = [(b, t) for b in BACKBONES for t in TASKS]
IDS = [bundle_name(b, t) for b, t in CASES]
# exported through the CLI: every UNet bundle, and the Swin bundle with 4 (BraTS) input channels; the 1-channel Swin
# export and its onnxruntime run are tests/test_shared_bundle.py's (a trained spleen bundle, downloaded, from the wheel).
# The Swin BTCV, spleen and liver bundles are generated alike but for the classes (the fast tests above compare their
# configs), and a SwinUNETR export takes 1-2 minutes on 2 CPU cores.
EXPORT_CASES = [(b, t) for b, t in CASES if b == "unet" or t == "brats"]
EXPORT_IDS = [bundle_name(b, t) for b, t in EXPORT_CASES]
WIDTH = {"swin": {"feature_size": 12}, "unet": {"features": [8, 8, 16, 32, 64, 8]}}
ROI = {"swin": 64, "unet": 32}  # the smallest patches each backbone takes (tests shrink, defaults stay)
ATOL = 1e-4


# ----------------------------------------------------------------------------------------------------------- helpers
def _instance_norm_model(channels: int, side: int) -> "onnx.ModelProto":
    from onnx import TensorProto, helper

    node = helper.make_node("InstanceNormalization", ["x", "s", "b"], ["y"], epsilon=1e-5)
    shape = [1, channels, side, side, side]
    graph = helper.make_graph(
        [node], "in", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        initializer=[helper.make_tensor("s", TensorProto.FLOAT, [channels], [0.5 + c for c in range(channels)]),
                     helper.make_tensor("b", TensorProto.FLOAT, [channels], [0.1 * c for c in range(channels)])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def _run(model, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _cli(args: list, cwd: str, what: str) -> str:
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{what} failed (exit {proc.returncode}):\n{text[-6000:]}"
    return text


def _overrides(overrides: dict) -> list:
    out = []
    for key, value in overrides.items():
        out += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return out


# -------------------------------------------------------------------------------------------------------- in process
def test_stable_instance_norm_matches_float64_where_onnxruntime_kernel_does_not():
    # CT-like channels: a large offset with a small spread on part of the volume, constant elsewhere (air, padding)
    rng = np.random.default_rng(0)
    offsets = np.array([0.0, 1.0, 10.0, 100.0], np.float32)[None, :, None, None, None]
    x = (rng.random((1, 4, 32, 32, 32), dtype=np.float32) * 0.01 + offsets).astype(np.float32)
    x[..., 8:] = offsets
    scale = torch.tensor([0.5, 1.5, 2.5, 3.5], dtype=torch.float64)
    bias = torch.tensor([0.0, 0.1, 0.2, 0.3], dtype=torch.float64)
    ref = torch.nn.functional.instance_norm(torch.from_numpy(x).double(), weight=scale, bias=bias, eps=1e-5).numpy()
    kernel = _run(_instance_norm_model(4, 32), x)
    stable_model = stable_instance_norm(_instance_norm_model(4, 32))
    assert "InstanceNormalization" not in {n.op_type for n in stable_model.graph.node}
    stable = _run(stable_model, x)
    torch32 = torch.nn.functional.instance_norm(torch.from_numpy(x), weight=scale.float(), bias=bias.float(),
                                                eps=1e-5).numpy()
    err_kernel, err_stable, err_torch = (float(np.abs(a - ref).max()) for a in (kernel, stable, torch32))
    assert err_kernel > 1e-2  # onnxruntime's own kernel: one float32 pass, E[x^2] - E[x]^2
    assert err_stable < max(2 * err_torch, 1e-4)  # as accurate as PyTorch's float32 instance norm


def test_onnx_network_errors(tmp_path):
    missing = str(tmp_path / "models" / "model.onnx")
    with pytest.raises(FileNotFoundError, match="model.onnx.*onnx_export network_def"):
        OnnxNetwork(missing)
    path = str(tmp_path / "in.onnx")
    onnx.save(_instance_norm_model(2, 8), path)
    with pytest.raises(ValueError, match="graph_optimization"):
        OnnxNetwork(path, graph_optimization="fast")
    with pytest.raises(ValueError, match="max_batch"):
        OnnxNetwork(path, max_batch=0)
    net = OnnxNetwork(path)
    x = torch.rand(1, 2, 8, 8, 8)
    ref = torch.nn.functional.instance_norm(x.double(), weight=torch.tensor([0.5, 1.5], dtype=torch.float64),
                                            bias=torch.tensor([0.0, 0.1], dtype=torch.float64), eps=1e-5)
    y = net(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"exported for inputs 1x2x8x8x8.*got 1x2x8x8x9"):
        net(torch.rand(1, 2, 8, 8, 9))


@pytest.mark.parametrize("backbone,task", CASES, ids=IDS)
def test_inference_onnx_json_overrides_only_the_network(backbone, task):
    configs = os.path.join(BUNDLES_DIR, bundle_name(backbone, task), "configs")
    assert backbone in EXPORTABLE
    base = json.load(open(os.path.join(configs, "inference.json")))
    onnx_cfg = json.load(open(os.path.join(configs, "inference_onnx.json")))
    merged = {**base, **onnx_cfg}  # MONAI's --config_file "[a, b]": top-level keys of b replace those of a
    changed = {k for k in merged if k not in base or merged[k] != base[k]}
    assert changed == {"onnx_path", "onnx_threads", "onnx_graph_optimization", "onnx_quantization", "device", "amp",
                       "network", "initialize"}
    assert merged["onnx_quantization"] == "none"  # float32 unless a layer or an override asks for int8
    assert merged["network"]["_target_"] == "hybridmim_components.workflow.OnnxNetwork"
    assert merged["onnx_path"] == "$@ckpt_dir + '/model.onnx'"
    assert not any("checkpointloader" in e for e in merged["initialize"])
    for key in ("preprocessing", "inferer", "postprocessing", "evaluator", "dataloader"):
        assert merged[key] == base[key]


# ---------------------------------------------------------------------------------------------------- through the CLI
@pytest.fixture(scope="module")
def demo_ct(tmp_path_factory):
    """The real demo CT (TotalSegmentator's example CT, tools/data/fetch_demo_ct.py): HU array and affine of its
    validation slab, and a small crop of it (48 x 48 x 10 voxels of 3 mm) as a one-image testing datalist."""
    import nibabel as nib

    from tools.data import fetch_demo_ct as demo

    root = tmp_path_factory.mktemp("demo_ct")
    demo.prepare(str(root / "ct"), cache_dir=os.environ.get("HYBRIDMIM_CACHE"))
    img = nib.load(str(root / "ct" / "images" / "abdomen_val.nii.gz"))
    hu = np.asarray(img.dataobj, dtype=np.float32)
    start = (30, 25, 0)
    crop = hu[30:78, 25:73, :]
    affine = img.affine.copy()
    affine[:3, 3] = img.affine[:3, :3] @ np.array(start) + img.affine[:3, 3]
    os.makedirs(root / "crop" / "images")
    nib.save(nib.Nifti1Image(crop, affine), str(root / "crop" / "images" / "ct.nii.gz"))
    with open(root / "crop" / "datalist.json", "w") as f:
        json.dump({"testing": [{"image": "images/ct.nii.gz"}]}, f)
    return {"hu": hu, "dataset_dir": str(root / "crop")}


def _patches(task: str, roi: int, batch: int, demo_ct: dict, seed: int) -> torch.Tensor:
    """``batch x C x roi^3`` network inputs: windowed real CT patches (zero-padded past the scan) or, for BraTS,
    z-scored random volumes inside a zero background."""
    rng = np.random.default_rng(seed)
    if TASKS[task]["modality"] == "CT":
        hu = demo_ct["hu"]
        out = np.zeros((batch, 1, roi, roi, roi), np.float32)
        for i in range(batch):
            x0, y0 = rng.integers(0, hu.shape[0] - roi), rng.integers(0, hu.shape[1] - roi)
            patch = hu[x0:x0 + roi, y0:y0 + roi, :roi]
            out[i, 0, :, :, :patch.shape[2]] = np.clip((patch + 1000.0) / 2000.0, 0.0, 1.0)
        return torch.from_numpy(out)
    out = rng.standard_normal((batch, TASKS[task]["in_channels"], roi, roi, roi)).astype(np.float32)
    out[..., : roi // 4] = 0.0
    return torch.from_numpy(out)


@pytest.mark.slow
@pytest.mark.parametrize("backbone,task", EXPORT_CASES, ids=EXPORT_IDS)
def test_onnx_export_and_parity(backbone, task, demo_ct, tmp_path):
    from monai.bundle import ConfigParser

    name = bundle_name(backbone, task)
    bundle = str(tmp_path / name)
    shutil.copytree(os.path.join(BUNDLES_DIR, name), bundle)
    roi, channels = ROI[backbone], TASKS[task]["in_channels"]
    width = WIDTH[backbone]
    # a checkpoint of the tiny network (random weights, seeded)
    parser = ConfigParser()
    parser.read_config(os.path.join(bundle, "configs", "inference.json"))
    parser.update(width)
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def").eval()
    torch.save(net.state_dict(), os.path.join(bundle, "models", "model.pt"))

    # the bundle README's command, with the test's patch size and width
    command = shlex.split(export_command(channels, roi).replace("\\\n", " "))
    assert command[:4] == ["python", "-m", "monai.bundle", "onnx_export"]
    _cli([sys.executable, *command[1:], *_overrides({**width, "roi_size": [roi] * 3})], bundle, "onnx_export")
    path = os.path.join(bundle, "models", "model.onnx")
    shapes = [(i.name, i.shape) for i in ort.InferenceSession(path, providers=["CPUExecutionProvider"]).get_inputs()]
    assert shapes == [("image", ["batch", channels, roi, roi, roi])]  # dynamic batch, fixed patch

    # fewer and more patches than the export's dummy batch of 2, one per onnxruntime call (the default) or 2 per
    # call with a partial last call
    for batch, max_batch in ((1, 1), (3, 2)):
        session = OnnxNetwork(path, max_batch=max_batch)
        x = _patches(task, roi, batch, demo_ct, seed=batch)
        with torch.no_grad():
            expected = net(x)
        got = session(x)
        assert got.shape == expected.shape == (batch, len(TASKS[task]["classes"]), roi, roi, roi)
        err = float((got - expected).abs().max())
        assert err <= ATOL, f"{name}: onnxruntime vs PyTorch logits differ by {err:.2e} (batch {batch})"

    if task != "btcv":
        return
    # the two inference pipelines on the cropped real CT; the crop gives 25 (UNet, 32^3) / 4 (Swin, 64^3) windows:
    # with sw_batch_size 4 / 3 the last batch holds a single patch
    common = {**width, "roi_size": [roi] * 3, "amp": False, "dataset_dir": demo_ct["dataset_dir"],
              "data_list_file_path": "datalist.json", "dataloader#num_workers": 0,
              "inferer#sw_batch_size": 4 if backbone == "unet" else 3}
    maps = {}
    for label, config in (("torch", "configs/inference.json"),
                          ("onnx", "['configs/inference.json','configs/inference_onnx.json']")):
        out_dir = str(tmp_path / f"out_{label}")
        _cli([sys.executable, "-m", "monai.bundle", "run", "--config_file", config,
              *_overrides({**common, "output_dir": out_dir})], bundle, f"inference ({label})")
        (seg,) = glob.glob(os.path.join(out_dir, "*_seg.nii.gz"))
        import nibabel as nib

        maps[label] = nib.load(seg)
    a, b = (np.asarray(m.dataobj) for m in (maps["torch"], maps["onnx"]))
    assert a.shape == b.shape == (48, 48, 10)
    np.testing.assert_allclose(maps["torch"].affine, maps["onnx"].affine)
    assert len(np.unique(a)) > 1  # not a trivial map
    assert int((a != b).sum()) == 0, f"{name}: {(a != b).sum()} of {a.size} voxels differ"


@pytest.mark.slow
def test_benchmark_runs_at_tiny_width(demo_ct, tmp_path):
    """tools/benchmarks/benchmark_onnx_inference.py end to end on the demo CT (tiny UNet, one pass each)."""
    from tools.benchmarks import benchmark_onnx_inference as bench

    out = str(tmp_path / "onnx_inference.json")
    image = os.path.join(demo_ct["dataset_dir"], "images", "ct.nii.gz")
    assert bench.main(["--backbones", "unet", "--repeats", "1", "--features", "[8,8,16,32,64,8]", "--image", image,
                       "--crop", "64", "--sw-batch-size", "1", "--variants", "basic=opt:basic,threads:1",
                       "--output", out]) == 0
    report = json.load(open(out))
    r = report["results"]["unet"]
    assert set(r["seconds"]) == {"pytorch", "onnxruntime", "basic"}
    assert all(len(ts) == 1 and ts[0] > 0 for ts in r["seconds"].values())
    assert r["ratio_to_pytorch"]["onnxruntime"] == pytest.approx(
        r["median_s"]["onnxruntime"] / r["median_s"]["pytorch"], rel=0.05)
    assert max(r["max_abs_logit_diff"].values()) <= ATOL
    assert r["variants"]["basic"] == {"threads": 1, "opt": "basic", "stable": 1, "batch": 1}
    assert "| unet" in open(os.path.splitext(out)[0] + ".md").read()
    with pytest.raises(ValueError, match="unknown key 'fast'"):
        bench.parse_variant("x=fast:1")
