"""Fail-loud pretrained-weight transfer: checkpoint layouts, reports, refusals, weights_only."""
import logging

import pytest
import torch
from monai.networks.nets import BasicUNet, SwinUNETR

from hybridmim_components import HybridMIMUNet, PretrainedWeightsError, load_pretrained_weights

FEATURES = (4, 4, 8, 8, 16, 4)


@pytest.fixture
def backbone_state():
    return HybridMIMUNet(features=FEATURES).backbone.state_dict()


def finetune_unet(out_channels=3, features=FEATURES, in_channels=1):
    return BasicUNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, features=features)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: s,
        lambda s: {"model": s, "epoch": 3},
        lambda s: {"state_dict": s},
        lambda s: {f"module.{k}": v for k, v in s.items()},
        lambda s: {"model": {f"module.backbone.{k}": v for k, v in s.items()}},
    ],
    ids=["flat", "model", "state_dict", "module-prefix", "ddp-wrapper-prefix"],
)
def test_layouts_load_everything_but_the_last_layer(tmp_path, backbone_state, wrap, caplog):
    path = tmp_path / "w.pt"
    torch.save(wrap(backbone_state), path)
    net = finetune_unet()
    with caplog.at_level(logging.INFO, logger="hybridmim_components.weights.transfer"):
        report = load_pretrained_weights(net, str(path))
    # the pretrained last layer has 1 output channel, the finetuning one 3: it is left to train, all else loads
    assert report["missing"] == [] and report["unexpected"] == []
    assert [m.split()[0] for m in report["left_to_train"]] == ["final_conv.weight", "final_conv.bias"]
    assert len(report["loaded"]) == len(backbone_state) - 2
    for name, value in net.state_dict().items():
        if not name.startswith("final_conv."):
            assert torch.equal(value, backbone_state[name])
    assert str(path) in caplog.text and "left_to_train: 2" in caplog.text


def test_same_out_channels_loads_the_last_layer_too(tmp_path, backbone_state):
    torch.save(backbone_state, tmp_path / "w.pt")
    report = load_pretrained_weights(finetune_unet(out_channels=1), tmp_path / "w.pt")
    assert report["missing"] == [] and report["left_to_train"] == []


def test_wrong_backbone_raises_with_report(tmp_path, backbone_state):
    torch.save(backbone_state, tmp_path / "unet.pt")
    swin = SwinUNETR(in_channels=1, out_channels=3, feature_size=12)
    before = {k: v.clone() for k, v in swin.state_dict().items()}
    with pytest.raises(PretrainedWeightsError) as err:
        load_pretrained_weights(swin, tmp_path / "unet.pt")
    message = str(err.value)
    assert "unet.pt" in message and "missing:" in message and "unexpected:" in message
    assert "swinViT" in message  # names the missing keys
    assert err.value.report["loaded"] == []
    assert all(torch.equal(v, before[k]) for k, v in swin.state_dict().items())  # nothing half-loaded


def test_other_width_or_channels_is_mis_shaped(tmp_path, backbone_state):
    torch.save(backbone_state, tmp_path / "w.pt")
    with pytest.raises(PretrainedWeightsError, match=r"mis_shaped: \d+"):
        load_pretrained_weights(finetune_unet(features=(8, 8, 16, 16, 32, 8)), tmp_path / "w.pt")
    with pytest.raises(PretrainedWeightsError, match="conv_0.conv_0.conv.weight"):
        load_pretrained_weights(finetune_unet(in_channels=4), tmp_path / "w.pt")


def test_empty_path_means_scratch_and_missing_file_names_it(tmp_path):
    assert load_pretrained_weights(finetune_unet(), None) is None
    assert load_pretrained_weights(finetune_unet(), "") is None
    assert load_pretrained_weights(finetune_unet(), "null") is None  # `--pretrained_path null` on the CLI
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_pretrained_weights(finetune_unet(), tmp_path / "nowhere.pt")


class _NotWeights:
    pass


def test_loads_with_weights_only(tmp_path, backbone_state):
    torch.save({"model": backbone_state, "extra": _NotWeights()}, tmp_path / "pickled.pt")
    with pytest.raises(Exception, match="[Ww]eights only"):
        load_pretrained_weights(finetune_unet(), tmp_path / "pickled.pt")


# ------------------------------------------------------------------------------------ pretrained_path = bundle folder
import hashlib  # noqa: E402
import json  # noqa: E402

from hybridmim_components.weights.transfer import WeightsHashError  # noqa: E402


def make_bundle(root, state, manifest: str | None = None, manifest_name: str = "large_files.yml"):
    """A minimal downloaded bundle: ``configs/metadata.json``, ``models/model.pt`` and optionally a manifest."""
    (root / "configs").mkdir(parents=True)
    (root / "configs" / "metadata.json").write_text(json.dumps({"version": "0.1.0"}))
    (root / "models").mkdir()
    torch.save(state, root / "models" / "model.pt")
    if manifest is not None:
        (root / manifest_name).write_text(manifest)
    return root


def digest(path, kind="sha256"):
    with open(path, "rb") as f:
        return hashlib.new(kind, f.read()).hexdigest()


def yml(hash_val, hash_type="sha256", path="models/model.pt"):
    return (f'large_files:\n  - path: "{path}"\n    url: "https://example.org/model.pt"\n'
            f'    hash_val: "{hash_val}"\n    hash_type: "{hash_type}"\n')


def test_bundle_folder_without_manifest_loads_its_model_pt(tmp_path, backbone_state):
    bundle = make_bundle(tmp_path / "b", backbone_state)
    net = finetune_unet()
    report = load_pretrained_weights(net, bundle)
    assert report["path"] == str(bundle / "models" / "model.pt") and report["sha256"] is None
    assert all(torch.equal(v, backbone_state[k]) for k, v in net.state_dict().items() if not k.startswith("final"))


@pytest.mark.parametrize("manifest_name", ["large_files.yml", "large_files.yaml", "large_files.json"])
def test_bundle_manifest_hash_is_verified(tmp_path, backbone_state, manifest_name, caplog):
    bundle = make_bundle(tmp_path / "b", backbone_state)
    weights = bundle / "models" / "model.pt"
    good = digest(weights)
    entry = {"path": "models/model.pt", "url": "", "hash_val": good, "hash_type": "sha256"}
    text = json.dumps({"large_files": [entry]}) if manifest_name.endswith("json") else yml(good)
    (bundle / manifest_name).write_text(text)
    with caplog.at_level(logging.INFO, logger="hybridmim_components.weights.transfer"):
        report = load_pretrained_weights(finetune_unet(), bundle)
    assert report["sha256"] == good and f"sha256 {good}" in caplog.text and manifest_name in caplog.text

    bad = "0" * 64
    (bundle / manifest_name).write_text(text.replace(good, bad))
    net = finetune_unet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(WeightsHashError) as err:
        load_pretrained_weights(net, bundle)
    message = str(err.value)
    assert str(weights) in message and manifest_name in message and good in message and bad in message
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_model_zoo_md5_manifest_is_verified_too(tmp_path, backbone_state):
    bundle = make_bundle(tmp_path / "b", backbone_state)
    (bundle / "large_files.yml").write_text(yml(digest(bundle / "models" / "model.pt", "md5"), "md5"))
    assert load_pretrained_weights(finetune_unet(), bundle)["loaded"]
    (bundle / "large_files.yml").write_text(yml("f" * 32, "md5"))
    with pytest.raises(WeightsHashError, match="md5"):
        load_pretrained_weights(finetune_unet(), bundle)


def test_manifest_without_a_hash_for_model_pt_loads_unverified(tmp_path, backbone_state):
    bundle = make_bundle(tmp_path / "b", backbone_state, manifest=yml("", ""))
    assert load_pretrained_weights(finetune_unet(), bundle)["sha256"] is None
    (bundle / "large_files.yml").write_text(yml("0" * 64, path="models/model.ts"))  # lists another file only
    assert load_pretrained_weights(finetune_unet(), bundle)["sha256"] is None


def test_bad_manifests_are_named(tmp_path, backbone_state):
    bundle = make_bundle(tmp_path / "b", backbone_state, manifest=yml("abc", "crc99"))
    with pytest.raises(ValueError, match=r"large_files.yml.*crc99"):
        load_pretrained_weights(finetune_unet(), bundle)
    (bundle / "large_files.yml").write_text("files: []\n")
    with pytest.raises(ValueError, match=r"large_files.yml.*large_files"):
        load_pretrained_weights(finetune_unet(), bundle)


def test_folders_that_are_not_usable_bundles_fail_naming_what_was_looked_for(tmp_path, backbone_state):
    bundle = make_bundle(tmp_path / "b", backbone_state)
    (bundle / "models" / "model.pt").unlink()
    with pytest.raises(FileNotFoundError, match=str(bundle / "models" / "model.pt")):
        load_pretrained_weights(finetune_unet(), bundle)
    plain = tmp_path / "plain"
    plain.mkdir()
    torch.save(backbone_state, plain / "model.pt")
    with pytest.raises(FileNotFoundError, match=str(plain / "configs" / "metadata.json")):
        load_pretrained_weights(finetune_unet(), plain)
