"""tools/bundles/serve_on_cpu.py: the config it writes for MONAI Label (no export run here: a models/model.onnx newer
than model.pt stands for one; tests/test_monailabel_server.py serves a real export), and OnnxNetwork's behaviour
under MONAI Label (deep copy per device, a checkpoint handed to load_state_dict)."""
from __future__ import annotations

import copy
import json
import os
import shutil
import time

import pytest
import torch

from tools.bundles.serve_on_cpu import PYTORCH_CONFIG, serve_on_cpu

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONNX_TARGET = "hybridmim_components.workflow.OnnxNetwork"


def _bundle(tmp_path, name="hybridmim_swin_btcv"):
    root = tmp_path / name
    shutil.copytree(os.path.join(REPO_ROOT, "bundles", name, "configs"), root / "configs")
    (root / "models").mkdir()
    (root / "models" / "model.pt").write_bytes(b"weights")
    time.sleep(0.01)
    (root / "models" / "model.onnx").write_bytes(b"graph")  # newer than model.pt: no export
    return root


def _read(path):
    with open(path) as f:
        return json.load(f)


@pytest.mark.parametrize("fast", [False, True], ids=["float32", "fast"])
def test_inference_json_runs_the_onnx_graph_and_keeps_the_pytorch_config(tmp_path, fast):
    root = _bundle(tmp_path)
    original = _read(root / "configs" / "inference.json")
    serve_on_cpu(str(root), fast=fast)
    served = _read(root / "configs" / "inference.json")
    assert _read(root / "configs" / PYTORCH_CONFIG) == original
    # MONAI Label instantiates network_def: the onnxruntime session on the exported graph, preprocessing checked
    assert served["network_def"]["_target_"] == ONNX_TARGET and served["network"] == "@network_def"
    assert served["network_def"]["path"] == "@onnx_path"
    assert "check_trained_settings(@onnx_path" in served["network_def"]["_requires_"]
    assert served["device"] == "$torch.device('cpu')" and served["amp"] is False
    # preprocessing and the datalist stay the bundle's own
    assert served["preprocessing"] == original["preprocessing"] and served["pixdim"] == original["pixdim"]
    fast_layer = _read(root / "configs" / "inference_cpu_fast.json")
    float32 = {**original, **_read(root / "configs" / "inference_onnx.json")}
    for key, value in fast_layer.items():
        assert served.get(key) == (value if fast else float32.get(key)), key


def test_a_rerun_starts_from_the_pytorch_config(tmp_path):
    root = _bundle(tmp_path)
    serve_on_cpu(str(root), fast=True)
    serve_on_cpu(str(root), fast=False)  # back to float32: the fast keys are gone
    served = _read(root / "configs" / "inference.json")
    original = _read(root / "configs" / PYTORCH_CONFIG)
    assert served["inferer"] == original["inferer"]
    assert served["network_def"]["_target_"] == ONNX_TARGET


def test_an_onnx_config_without_its_pytorch_copy_is_refused(tmp_path):
    root = _bundle(tmp_path)
    serve_on_cpu(str(root))
    os.remove(root / "configs" / PYTORCH_CONFIG)
    with pytest.raises(ValueError, match="already runs ONNX"):
        serve_on_cpu(str(root))


def test_onnx_network_is_deep_copied_and_refuses_a_strict_load(tmp_path):
    pytest.importorskip("onnxruntime")
    from hybridmim_components.workflow import OnnxNetwork

    net = torch.nn.Conv3d(1, 2, 3, padding=1).eval()
    path = str(tmp_path / "m.onnx")
    x = torch.randn(2, 1, 8, 8, 8)
    torch.onnx.export(net, (x,), path, input_names=["image"], output_names=["pred"],
                      dynamic_axes={"image": {0: "batch"}, "pred": {0: "batch"}}, dynamo=False)
    onnx_net = OnnxNetwork(path)
    twin = copy.deepcopy(onnx_net)
    assert twin is not onnx_net and twin.session is not onnx_net.session
    torch.testing.assert_close(twin(x), onnx_net(x))
    with torch.no_grad():
        torch.testing.assert_close(onnx_net(x), net(x), atol=1e-5, rtol=1e-5)
    # MONAI Label's load of model.pt (strict=False): nothing is loaded, every key reported unexpected
    result = onnx_net.load_state_dict(net.state_dict(), strict=False)
    assert sorted(result.unexpected_keys) == sorted(net.state_dict()) and result.missing_keys == []
    with pytest.raises(RuntimeError, match="cannot load a state dict of 2 tensors"):
        onnx_net.load_state_dict(net.state_dict())


@pytest.mark.monai15
def test_the_export_runs_on_this_monai_and_the_graph_gives_pytorchs_logits(tmp_path):
    """A real ``onnx_export`` through serve_on_cpu.py (a tiny BasicUNet at a 32^3 patch, set in the copy's config),
    on the MONAI of this environment: CI repeats it under MONAI 1.5.1, whose ``onnx_export`` scripts the network
    unless told to trace, and torch's exporter (dynamo, torch >= 2.9) refuses a ScriptModule."""
    pytest.importorskip("onnxruntime")
    from monai.bundle import ConfigParser

    from hybridmim_components.workflow import OnnxNetwork

    name = "hybridmim_unet_msd_spleen"
    root = tmp_path / name
    shutil.copytree(os.path.join(REPO_ROOT, "bundles", name), root, ignore=shutil.ignore_patterns("*.pt", "*.onnx"))
    config_path = root / "configs" / "inference.json"
    config = _read(config_path)
    config.update({"features": [4, 4, 8, 8, 16, 4], "roi_size": [32, 32, 32]})
    config_path.write_text(json.dumps(config, indent=4))
    parser = ConfigParser()
    parser.read_config(str(config_path))
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def").eval()
    torch.save(net.state_dict(), root / "models" / "model.pt")

    serve_on_cpu(str(root))
    onnx_path = root / "models" / "model.onnx"
    assert onnx_path.is_file()
    x = torch.randn(3, 1, 32, 32, 32)  # a batch other than the export's dummy 2: the batch axis is dynamic
    with torch.no_grad():
        expected = net(x)
    got = OnnxNetwork(str(onnx_path))(x)
    assert got.shape == expected.shape == (3, 2, 32, 32, 32)
    err = float((got - expected).abs().max())
    assert err < 1e-3, f"onnxruntime vs PyTorch logits differ by {err:.2e}"
