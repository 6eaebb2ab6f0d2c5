"""Trained weights compute with the settings they were trained with, or the config stops and names the key.

In process, on tiny networks: ``check_trained_settings`` against hand-made records; the Swin spleen bundle's
``inference.json``, ``evaluate.json`` (layered on ``train.json``) and ``inference_onnx.json`` parsed with MONAI's
``ConfigParser`` as the CLI, MONAI Label and ``onnx_export`` parse them, on a bundle folder holding a tiny SwinUNETR
trained with ``downsample: merging_legacy``; and ``pack_bundle``'s packed configs, whose defaults build the trained
network (its logits equal to those of the network built by hand). The CLI runs are in ``test_shared_bundle.py``.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import zipfile

import pytest
import torch
from monai.bundle import ConfigParser
from monai.networks.nets import SwinUNETR

import hybridmim_components as hc
from hybridmim_components.weights.provenance import make_record, read_provenance, window_intensity, write_provenance
from hybridmim_components.weights.trained_settings import (
    TrainedSettingsMismatchError,
    check_trained_settings,
    config_values_from_record,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWIN_SPLEEN = os.path.join(REPO_ROOT, "bundles", "hybridmim_swin_msd_spleen")
WIDTH = 12
SPACING = [1.5, 1.5, 2.0]


def ct_preprocessing(spacing=SPACING, a_min=-1000.0, a_max=1000.0, crop=(64, 64, 64)) -> dict:
    return {"orientation": "RAS", "spacing": list(spacing), "intensity": window_intensity(a_min, a_max),
            "crop": list(crop)}


def swin_record(downsample="merging_legacy", width=WIDTH, **pre) -> dict:
    return make_record("SwinUNETR", width, 1, ct_preprocessing(**pre), downsample=downsample, out_channels=2,
                       use_v2=False, source="hybridmim_swin_msd_spleen")


def tiny_swin(downsample: str) -> SwinUNETR:
    torch.manual_seed(0)
    return SwinUNETR(in_channels=1, out_channels=2, feature_size=WIDTH, downsample=hc.resolve_downsample(downsample),
                     use_v2=False)


def swin_architecture(downsample="merging", width=WIDTH) -> dict:
    return {"backbone": "SwinUNETR", "width": width, "in_channels": 1, "out_channels": 2, "downsample": downsample,
            "use_v2": False}


@pytest.fixture
def weights(tmp_path):
    """``models/model.pt`` of a tiny SwinUNETR trained with ``merging_legacy``, its record beside it."""
    path = tmp_path / "models" / "model.pt"
    path.parent.mkdir()
    torch.save(tiny_swin("merging_legacy").state_dict(), path)
    write_provenance(path, swin_record())
    return path


# ------------------------------------------------------------------------------------------------------ the check
def test_a_merging_order_that_differs_stops_naming_key_values_and_override(weights):
    with pytest.raises(TrainedSettingsMismatchError) as e:
        check_trained_settings(weights, swin_architecture("merging"), ct_preprocessing())
    text = str(e.value)
    assert "downsample: trained with 'merging_legacy', this config has 'merging'" in text
    assert "--downsample merging_legacy" in text and "--check_trained_settings false" in text
    assert str(weights) in text


def test_width_spacing_and_window_are_named_with_their_overrides(weights):
    with pytest.raises(TrainedSettingsMismatchError) as e:
        check_trained_settings(weights, swin_architecture("merging_legacy", width=48),
                               ct_preprocessing(spacing=(1.0, 1.0, 1.0), a_min=-175.0, a_max=250.0))
    text = str(e.value)
    assert "feature_size: trained with 12, this config has 48 (override: --feature_size 12)" in text
    assert "spacing: trained with [1.5, 1.5, 2.0], this config has [1.0, 1.0, 1.0]" in text
    assert "--pixdim '[1.5, 1.5, 2.0]'" in text
    assert "--a_min -1000.0 --a_max 1000.0" in text
    assert "downsample" not in text  # the same order: not named


def test_matching_settings_pass_and_the_crop_is_not_compared(weights):
    assert check_trained_settings(weights, swin_architecture("merging_legacy"), ct_preprocessing(crop=(96, 96, 96))) == []


def test_disabled_check_warns_instead_of_stopping(weights, caplog):
    with caplog.at_level(logging.WARNING):
        found = check_trained_settings(weights, swin_architecture("merging"), None, enabled="false")
    assert len(found) == 1 and "downsample" in found[0]
    assert "check_trained_settings is false" in caplog.text


def test_weights_without_a_record_are_used_with_a_warning(weights, caplog):
    os.remove(str(weights).replace("model.pt", "model.provenance.json"))
    with caplog.at_level(logging.WARNING):
        assert check_trained_settings(weights, swin_architecture("merging"), ct_preprocessing()) == []
    assert "without a provenance record" in caplog.text


def test_missing_weights_are_said_not_checked(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert check_trained_settings(tmp_path / "models" / "model.pt", swin_architecture("merging"), None) == []
    assert "no trained weights at" in caplog.text and "--bundle_root" in caplog.text


def test_a_record_that_names_other_weights_is_refused(weights):
    write_provenance(weights, {**swin_record(), "weights_sha256": "0" * 64})
    with pytest.raises(TrainedSettingsMismatchError, match="belongs to other weights"):
        check_trained_settings(weights, swin_architecture("merging_legacy"), ct_preprocessing())


def test_config_values_from_record_name_the_bundle_keys():
    unet = make_record("BasicUNet", [4, 4, 8, 8, 16, 4], 4, {"spacing": [1, 1, 1], "crop": [32, 32, 32]},
                       out_channels=3)
    assert config_values_from_record(unet) == {
        "features": [4, 4, 8, 8, 16, 4], "network_def#in_channels": 4, "network_def#out_channels": 3,
        "pixdim": [1, 1, 1], "roi_size": [32, 32, 32]}
    swin = config_values_from_record(swin_record())
    assert swin["feature_size"] == WIDTH and swin["downsample"] == "merging_legacy" and swin["a_min"] == -1000.0


# ------------------------------------------------------------------------------------- the bundle's own configs
def bundle_copy(tmp_path, weights) -> str:
    root = tmp_path / "hybridmim_swin_msd_spleen"
    shutil.copytree(SWIN_SPLEEN, root, ignore=shutil.ignore_patterns("models"))
    shutil.copytree(os.path.dirname(weights), root / "models")
    return str(root)


def parse(root: str, files: list[str], **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([os.path.join(root, "configs", f) for f in files])
    parser.update({"bundle_root": root, "device": "$torch.device('cpu')", **overrides})
    return parser


def chain(exc: BaseException) -> str:
    """The messages of an exception and its causes (MONAI wraps an expression's error in a RuntimeError)."""
    texts = []
    while exc is not None:
        texts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(texts)


def logits(network, seed=1) -> torch.Tensor:
    torch.manual_seed(seed)
    x = torch.rand(1, 1, 64, 64, 64)
    with torch.no_grad():
        return network.eval()(x)


@pytest.mark.parametrize("files", [["inference.json"], ["train.json", "evaluate.json"]], ids=["inference", "evaluate"])
def test_network_def_of_the_bundle_stops_before_building_with_another_merging_order(tmp_path, weights, files):
    """What MONAI Label, ``onnx_export network_def`` and the CLI do: parse ``network_def`` (with the width
    overridden to the trained one, the merging order left at the default)."""
    root = bundle_copy(tmp_path, weights)
    parser = parse(root, files, feature_size=WIDTH, roi_size=[64, 64, 64])
    with pytest.raises(Exception) as e:
        parser.get_parsed_content("network_def")
    assert "downsample: trained with 'merging_legacy', this config has 'merging'" in chain(e.value)

    parser = parse(root, files, feature_size=WIDTH, roi_size=[64, 64, 64], downsample="merging_legacy")
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(weights, weights_only=True))
    assert torch.equal(logits(network), logits(load(tiny_swin("merging_legacy"), weights)))


def load(network, weights):
    network.load_state_dict(torch.load(weights, weights_only=True))
    return network


def test_the_two_merging_orders_load_the_same_file_and_compute_other_logits(weights):
    """Why the check exists: the plain load succeeds, the outputs differ."""
    legacy, plain = load(tiny_swin("merging_legacy"), weights), load(tiny_swin("merging"), weights)
    diff = (torch.softmax(logits(legacy), 1) - torch.softmax(logits(plain), 1)).abs().max().item()
    assert diff > 1e-3, diff


def test_inference_onnx_checks_the_preprocessing_against_the_record(tmp_path, weights):
    root = bundle_copy(tmp_path, weights)
    with open(os.path.join(root, "models", "model.onnx"), "wb") as f:
        f.write(b"exported graph")  # never opened: the check comes first
    parser = parse(root, ["inference.json", "inference_onnx.json"], feature_size=WIDTH, pixdim=[1.0, 1.0, 1.0])
    with pytest.raises(Exception) as e:
        for entry in range(len(parser["initialize"])):
            parser.get_parsed_content(f"initialize#{entry}")
    assert "spacing: trained with [1.5, 1.5, 2.0], this config has [1.0, 1.0, 1.0]" in chain(e.value)
    assert "downsample" not in chain(e.value)  # the ONNX graph fixes the architecture


# -------------------------------------------------------------------------------------------------------- packing
def test_packed_configs_carry_the_trained_settings_and_build_the_trained_network(tmp_path, weights):
    from tools.bundles.pack_bundle import pack_bundle

    root = bundle_copy(tmp_path, weights)
    zip_path = pack_bundle(root, output=str(tmp_path / "packed.zip"))
    out = tmp_path / "unpacked"
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(out)
        manifest = zf.read("hybridmim_swin_msd_spleen/large_files.yml").decode()
    packed = str(out / "hybridmim_swin_msd_spleen")
    for name in ("inference.json", "train.json"):
        with open(os.path.join(packed, "configs", name)) as f:
            config = json.load(f)
        assert (config["feature_size"], config["downsample"], config["roi_size"]) == (WIDTH, "merging_legacy",
                                                                                       [64, 64, 64]), name
    with open(os.path.join(REPO_ROOT, "bundles", "hybridmim_swin_msd_spleen", "configs", "inference.json")) as f:
        assert json.load(f)["downsample"] == "merging"  # the repository's bundle is left alone
    # the record travels with the weights' hash; both files are listed with their SHA-256
    record = read_provenance(os.path.join(packed, "models", "model.pt"))
    from hybridmim_components.weights.transfer import file_hash

    assert record["weights_sha256"] == file_hash(os.path.join(packed, "models", "model.pt"))
    assert file_hash(os.path.join(packed, "models", "model.provenance.json")) in manifest
    with open(os.path.join(packed, "configs", "metadata.json")) as f:
        assert json.load(f)["required_packages_version"]["hybridmim-components"] == hc.__version__

    # defaults only: the network the packed inference.json builds computes the trained network's logits exactly
    network = parse(packed, ["inference.json"]).get_parsed_content("network_def")
    load(network, os.path.join(packed, "models", "model.pt"))
    assert torch.equal(logits(network), logits(load(tiny_swin("merging_legacy"), weights)))

    # an edited record (not the packed one) is refused by its hash
    with open(os.path.join(packed, "models", "model.provenance.json"), "a") as f:
        f.write(" ")
    with pytest.raises(Exception) as e:
        parse(packed, ["inference.json"]).get_parsed_content("network_def")
    assert "sha256 of" in chain(e.value) and "model.provenance.json" in chain(e.value)


@pytest.mark.parametrize("files", [["inference.json"], ["train.json", "evaluate.json"]], ids=["inference", "evaluate"])
def test_a_pretraining_bundle_checks_its_saved_backbone_too(tmp_path, files):
    """The reconstruction (inference.json) and the pretext evaluation load models/model.pt as well."""
    root = tmp_path / "hybridmim_unet_pretrain"
    shutil.copytree(os.path.join(REPO_ROOT, "bundles", "hybridmim_unet_pretrain"), root,
                    ignore=shutil.ignore_patterns("models"))
    (root / "models").mkdir()
    torch.save({}, root / "models" / "model.pt")  # never loaded: the check comes first
    write_provenance(root / "models" / "model.pt", make_record(
        "BasicUNet", [4, 4, 8, 8, 16, 4], 1, ct_preprocessing(spacing=(3.0, 3.0, 3.0)), source="hybridmim_unet_pretrain"))
    with pytest.raises(Exception) as e:
        parse(str(root), files).get_parsed_content("network_def")
    text = chain(e.value)
    assert "features: trained with [4, 4, 8, 8, 16, 4], this config has [32, 32, 64, 128, 256, 32]" in text
    assert "--pixdim '[3.0, 3.0, 3.0]'" in text
