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
    with caplog.at_level(logging.INFO, logger="hybridmim_components.transfer"):
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
