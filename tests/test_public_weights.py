"""Public SwinUNETR checkpoint layouts: each is rebuilt with the publishers' exact key names from MONAI's own
networks (small feature sizes), recognised, and converted back to MONAI names, tensor for tensor."""
import re

import pytest
import torch
from monai.networks.nets import BasicUNet, SwinUNETR

from hybridmim_components import HybridMIMSwinUNETR, HybridMIMUNet
from hybridmim_components.weights.public_weights import (
    LAYOUTS,
    ConvertedCheckpoint,
    convert_checkpoint,
    coverage,
    detect_layout,
    infer_architecture,
)

FS = 12  # SwinUNETR feature size: the smallest MONAI allows (divisible by 12)


def swin_state(seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs = {"in_channels": 1, "out_channels": 2, "feature_size": FS, **kwargs}
    return SwinUNETR(**kwargs).state_dict()


def to_timm_mlp(name):
    """MONAI's MLP names -> the timm names of the original Swin code (mlp.fc1/fc2)."""
    return re.sub(r"\.mlp\.linear([12])\.", r".mlp.fc\1.", name)


def only(state, *tops):
    return {k: v for k, v in state.items() if k.split(".", 1)[0] in tops}


SWIN_ENC = ("swinViT", "encoder1", "encoder2", "encoder3", "encoder4", "encoder10")


def projection_head(prefix, in_dim, hidden=32):
    # VoCo's projection_head: three Linear layers (its BatchNorm1d has neither affine weights nor running stats)
    return {
        f"{prefix}layer1.0.weight": torch.randn(hidden, in_dim), f"{prefix}layer1.0.bias": torch.randn(hidden),
        f"{prefix}layer2.0.weight": torch.randn(hidden, hidden), f"{prefix}layer2.0.bias": torch.randn(hidden),
        f"{prefix}layer3.0.weight": torch.randn(hidden, hidden), f"{prefix}layer3.0.bias": torch.randn(hidden),
    }


def assert_converted(result, reference, expected_names, n_dropped):
    """Every converted name exists in ``reference`` with its shape, the set is ``expected_names`` and each tensor is
    the file's own (identity: nothing copied or altered)."""
    assert isinstance(result, ConvertedCheckpoint)
    state = result.state_dict
    assert sorted(state) == sorted(expected_names)
    for name, value in state.items():
        assert name in reference and reference[name].shape == value.shape, name
    assert len(result.dropped) == n_dropped, result.dropped


# --- Tang et al. model_swinvit.pt: {"state_dict": module.<SwinTransformer names, mlp.fc1/fc2>, module.norm.*} ---


def tang_swinvit_file(source):
    raw = {}
    for name, value in source.items():
        if name.startswith("swinViT."):
            raw["module." + to_timm_mlp(name[len("swinViT."):])] = value
    raw["module.norm.weight"], raw["module.norm.bias"] = torch.randn(16 * FS), torch.randn(16 * FS)
    return {"state_dict": raw}


def test_tang_swinvit_converts_like_monai_load_from():
    source = swin_state(seed=2)
    raw = tang_swinvit_file(source)
    assert "module.layers1.0.blocks.0.mlp.fc1.weight" in raw["state_dict"]
    assert detect_layout(raw) is LAYOUTS["tang_ssl_swinvit"]
    result = convert_checkpoint(raw)
    swin_names = [k for k in source if k.startswith("swinViT.")]
    assert_converted(result, source, swin_names, n_dropped=2)
    assert result.dropped == ["norm.bias", "norm.weight"]
    assert result.covers == "swin_encoder" and result.layout.covers == "swin_encoder"
    assert result.layout.merging == "merging_legacy"
    for name in swin_names:  # the very tensors of the file, under their MONAI names
        assert result.state_dict[name] is source[name]

    torch.manual_seed(0)
    ours = SwinUNETR(in_channels=1, out_channels=2, feature_size=FS)
    missing, unexpected = ours.load_state_dict(result.state_dict, strict=False)
    assert unexpected == [] and all(not m.startswith("swinViT.") for m in missing)
    torch.manual_seed(1)
    monai_loaded = SwinUNETR(in_channels=1, out_channels=2, feature_size=FS)
    monai_loaded.load_from(raw)  # MONAI's own reader of this file
    theirs = monai_loaded.state_dict()
    compared = 0
    for name, value in ours.state_dict().items():
        if name.startswith("swinViT."):
            assert torch.equal(value, theirs[name]), name
            compared += 1
    assert compared == len(swin_names)
    # and the loaded weights are the file's, not either network's initialisation
    assert torch.equal(theirs["swinViT.layers2.0.blocks.1.mlp.linear2.weight"],
                       source["swinViT.layers2.0.blocks.1.mlp.linear2.weight"])


def test_tang_ssl_head_checkpoint():
    source = swin_state(seed=3)
    swin = only(source, "swinViT")
    dim = 16 * FS
    raw = {f"module.{k}": v for k, v in swin.items()}
    raw.update({
        "module.rotation_head.weight": torch.randn(4, dim), "module.rotation_head.bias": torch.randn(4),
        "module.contrastive_head.weight": torch.randn(512, dim), "module.contrastive_head.bias": torch.randn(512),
        "module.conv.0.weight": torch.randn(dim // 2, dim, 3, 3, 3), "module.conv.0.bias": torch.randn(dim // 2),
    })
    ckpt = {"epoch": 10, "state_dict": raw, "optimizer": {"state": {}, "param_groups": []}}
    assert detect_layout(ckpt).name == "tang_ssl_head"
    result = convert_checkpoint(ckpt)
    assert_converted(result, source, list(swin), n_dropped=6)
    assert result.covers == "swin_encoder"


# --- the model zoo's swin_unetr_btcv_segmentation models/model.pt: a bare SwinUNETR, 48 features, 14 classes ---


def test_model_zoo_btcv_bundle():
    source = swin_state(out_channels=14, feature_size=48)
    assert detect_layout(source).name == "model_zoo_swin_unetr_btcv"
    result = convert_checkpoint(source)
    assert_converted(result, source, list(source), n_dropped=0)
    assert result.covers == "all" and result.layout.merging == "merging_legacy"
    assert result.architecture["out_channels"] == 14 and result.architecture["feature_size"] == 48
    assert result.layout.preprocessing["spacing"] == [1.5, 1.5, 2.0]


def test_fourteen_classes_at_another_width_is_not_the_model_zoo_file():
    assert detect_layout(swin_state(out_channels=14)).name == "hybridmim_bundle"


# --- VoCo: [module.]backbone.{swinViT (v2), encoder1..4, encoder10} + student/teacher projection heads ---


@pytest.mark.parametrize("wrap", [lambda s: s, lambda s: {"state_dict": {f"module.{k}": v for k, v in s.items()}}],
                         ids=["final_model", "ddp_checkpoint"])
def test_voco_ssl_head(wrap):
    source = swin_state(use_v2=True)
    encoder = only(source, *SWIN_ENC)
    assert any(k.startswith("swinViT.layers1c.") for k in encoder)
    raw = {f"backbone.{k}": v for k, v in encoder.items()}
    raw.update(projection_head("student.", 24 * FS))
    raw.update(projection_head("teacher.", 24 * FS))
    result = convert_checkpoint(wrap(raw))
    assert result.layout.name == "voco"
    assert_converted(result, source, list(encoder), n_dropped=12)
    assert all(d.startswith(("student.", "teacher.")) for d in result.dropped)
    assert result.covers == "encoder" and result.architecture["use_v2"] is True


def test_vocomni_whole_network():
    source = swin_state(use_v2=True, out_channels=21)
    raw = {f"module.backbone.{k}": v for k, v in source.items()}
    raw.update(projection_head("module.student.", 24 * FS))
    raw.update(projection_head("module.teacher.", 24 * FS))
    result = convert_checkpoint({"state_dict": raw})
    assert result.layout.name == "vocomni"
    assert_converted(result, source, list(source), n_dropped=12)
    assert result.covers == "all" and result.architecture["out_channels"] == 21


# --- SuPreM: {"net": module.backbone.<SwinUNETR without out>} + the Universal model's heads ---


def suprem_heads(prefix, classes=32):
    dim = 16 * FS
    return {
        f"{prefix}precls_conv.0.weight": torch.randn(FS), f"{prefix}precls_conv.0.bias": torch.randn(FS),
        f"{prefix}precls_conv.2.weight": torch.randn(8, FS, 1, 1, 1), f"{prefix}precls_conv.2.bias": torch.randn(8),
        f"{prefix}GAP.0.weight": torch.randn(dim), f"{prefix}GAP.0.bias": torch.randn(dim),
        f"{prefix}GAP.3.weight": torch.randn(256, dim, 1, 1, 1), f"{prefix}GAP.3.bias": torch.randn(256),
        f"{prefix}controller.weight": torch.randn(153, 512, 1, 1, 1), f"{prefix}controller.bias": torch.randn(153),
        f"{prefix}organ_embedding": torch.randn(classes, 512),
        f"{prefix}text_to_vision.weight": torch.randn(256, 512), f"{prefix}text_to_vision.bias": torch.randn(256),
    }


def test_suprem_universal_model():
    source = swin_state()
    backbone = {k: v for k, v in source.items() if not k.startswith("out.")}
    raw = {f"module.backbone.{k}": v for k, v in backbone.items()}
    raw.update(suprem_heads("module."))
    ckpt = {"net": raw, "optimizer": {"state": {}, "param_groups": []}, "scheduler": {}, "epoch": 800}
    assert detect_layout(ckpt).name == "suprem_swin"
    result = convert_checkpoint(ckpt)
    assert_converted(result, source, list(backbone), n_dropped=13)
    assert result.covers == "all" and result.architecture["out_channels"] is None
    assert result.layout.licence.startswith("CC BY-NC-ND")


def test_suprem_backbone_file():
    source = swin_state()
    backbone = {k: v for k, v in source.items() if not k.startswith("out.")}
    result = convert_checkpoint({"net": backbone, "epoch": 1})  # SuPreM's *_backbone.pth
    assert result.layout.name == "suprem_swin"
    assert_converted(result, source, list(backbone), n_dropped=0)


# --- Disruptive Autoencoders: {"model": encoder.<Swin, layersN.0.0., mlp.fc>, encoder1.., decoder1.., out} ---


def dae_file(source):
    raw = {}
    for name, value in source.items():
        if name.startswith("swinViT.patch_embed."):
            raw["encoder." + name[len("swinViT."):]] = value
        elif name.startswith("swinViT."):
            layer, zero, tail = name[len("swinViT."):].split(".", 2)
            raw[to_timm_mlp(f"encoder.{layer}.{zero}.0.{tail}")] = value
        else:
            raw[name] = value
    raw["encoder.mask_token"] = torch.zeros(1, 1, FS)
    raw["encoder.norm.weight"], raw["encoder.norm.bias"] = torch.ones(16 * FS), torch.zeros(16 * FS)
    return {"model": raw, "optimizer": {"state": {}, "param_groups": []}, "epoch": 100}


def test_dae_swin():
    source = swin_state(out_channels=1)
    ckpt = dae_file(source)
    assert "encoder.layers1.0.0.blocks.0.mlp.fc1.weight" in ckpt["model"]
    assert detect_layout(ckpt).name == "dae_swin"
    result = convert_checkpoint(ckpt)
    assert_converted(result, source, list(source), n_dropped=3)
    assert result.dropped == ["encoder.mask_token", "encoder.norm.bias", "encoder.norm.weight"]
    for name, value in source.items():
        assert result.state_dict[name] is value
    assert result.covers == "all" and result.notes == []


def test_dae_convolution_stem_is_reported_not_renamed():
    source = swin_state(out_channels=1)
    ckpt = dae_file(source)
    model = ckpt["model"]
    del model["encoder.patch_embed.proj.weight"], model["encoder.patch_embed.proj.bias"]
    model["encoder.patch_embed.proj.conv1.conv.weight"] = torch.randn(FS, 1, 2, 2, 2)
    model["encoder.patch_embed.proj.conv2.conv.weight"] = torch.randn(FS, FS, 3, 3, 3)
    result = convert_checkpoint(ckpt)
    assert "swinViT.patch_embed.proj.weight" not in result.state_dict
    assert not any("patch_embed" in k for k in result.state_dict)
    assert "encoder.patch_embed.proj.conv1.conv.weight" in result.dropped
    assert len(result.notes) == 1 and "convolution stem" in result.notes[0]


# --- HybridMIM authors: module.<MONAI SwinUNETR names> + their pretext heads, saved bare ---


def test_hybridmim_authors():
    source = swin_state(out_channels=1)
    dim = 16 * FS
    raw = {f"module.{k}": v for k, v in source.items()}
    raw.update({
        "module.pred_mask_region.weight": torch.randn(9, dim), "module.pred_mask_region.bias": torch.randn(9),
        "module.contrast_learning_head.weight": torch.randn(384, dim),
        "module.contrast_learning_head.bias": torch.randn(384),
        "module.pred_mask_region_position.weight": torch.randn(8, dim),
        "module.pred_mask_region_position.bias": torch.randn(8),
    })
    assert detect_layout(raw).name == "hybridmim_authors"
    result = convert_checkpoint(raw)
    assert_converted(result, source, list(source), n_dropped=6)
    assert result.covers == "all"


# --- our own bundles: models/model.pt (flat backbone) and the whole pretraining network ---


def test_hybridmim_bundle_swin_and_whole_network():
    net = HybridMIMSwinUNETR(feature_size=FS)
    backbone = net.backbone.state_dict()
    flat = convert_checkpoint(backbone)
    assert flat.layout.name == "hybridmim_bundle" and flat.layout.merging == "merging"
    assert_converted(flat, backbone, list(backbone), n_dropped=0)
    whole = convert_checkpoint({"network": net.state_dict(), "epoch": 3})
    assert whole.layout.name == "hybridmim_bundle"
    assert_converted(whole, backbone, list(backbone), n_dropped=6)  # number/location/projection heads
    assert all(d.startswith(("number_head.", "location_head.", "projection.")) for d in whole.dropped)


def test_hybridmim_bundle_unet():
    features = (4, 4, 8, 8, 16, 4)
    backbone = HybridMIMUNet(features=features).backbone.state_dict()
    result = convert_checkpoint({f"module.{k}": v for k, v in backbone.items()})
    assert result.layout.name == "hybridmim_bundle"
    assert_converted(result, backbone, list(backbone), n_dropped=0)
    assert result.covers == "all"
    assert result.architecture == {"backbone": "BasicUNet", "in_channels": 1, "out_channels": 1,
                                   "features": features}


# --- unknown layouts, architecture, coverage ---


@pytest.mark.parametrize("ckpt", [
    {"foo.weight": torch.zeros(2), "bar.bias": torch.zeros(2)},
    {"model": {"conv1.weight": torch.zeros(2)}},
])
def test_unknown_layout_names_its_keys(ckpt):
    with pytest.raises(ValueError, match="unknown checkpoint layout") as err:
        detect_layout(ckpt)
    first = next(iter(ckpt.get("model", ckpt)))
    assert first in str(err.value) and "tang_ssl_swinvit" in str(err.value)
    with pytest.raises(ValueError, match="unknown checkpoint layout"):
        convert_checkpoint(ckpt)


def test_no_state_dict_at_all():
    with pytest.raises(ValueError, match="no state dict found.*'epoch'"):
        detect_layout({"epoch": 3, "optimizer": {"state": {}}})


def test_infer_architecture_swin():
    state = swin_state(in_channels=4, out_channels=3, feature_size=24, use_v2=True)
    assert infer_architecture(state) == {
        "backbone": "SwinUNETR", "feature_size": 24, "in_channels": 4, "patch_size": 2, "use_v2": True,
        "depths": (2, 2, 2, 2), "num_heads": (3, 6, 12, 24), "window_size": 7, "out_channels": 3,
    }
    assert infer_architecture(only(state, "swinViT"))["out_channels"] is None
    with pytest.raises(ValueError, match="cannot infer the architecture"):
        infer_architecture({"x.weight": torch.zeros(1)})


def test_coverage():
    state = swin_state()
    assert coverage(state) == "all"
    assert coverage(only(state, *SWIN_ENC)) == "encoder"
    assert coverage(only(state, "swinViT")) == "swin_encoder"
    unet = BasicUNet(spatial_dims=3, features=(4, 4, 8, 8, 16, 4)).state_dict()
    assert coverage(unet) == "all"
    assert coverage({k: v for k, v in unet.items() if k.startswith(("conv_0", "down_"))}) == "encoder"
    assert coverage({}) == "none"


def test_layout_table_is_complete():
    for name, layout in LAYOUTS.items():
        assert layout.name == name
        assert layout.covers in ("swin_encoder", "encoder", "all")
        assert layout.merging in ("merging", "merging_legacy")
        assert set(layout.preprocessing) == {"orientation", "spacing", "intensity", "crop"}, name
        assert layout.licence


def test_swin_vit_spelling_is_the_old_ssl_head():
    # the SSLHead named its encoder 'swin_vit' until research-contributions PR #88; loaders rename it to 'swinViT'
    source = swin_state()
    swin = only(source, "swinViT")
    raw = {"module." + k.replace("swinViT.", "swin_vit.", 1): v for k, v in swin.items()}
    raw["module.rotation_head.weight"], raw["module.rotation_head.bias"] = torch.randn(4, 16 * FS), torch.randn(4)
    for ckpt in ({"state_dict": raw}, {k: v for k, v in raw.items() if "rotation" not in k}):
        result = convert_checkpoint(ckpt)
        assert result.layout.name == "tang_ssl_head"
        assert_converted(result, source, list(swin), n_dropped=len(ckpt.get("state_dict", ckpt)) - len(swin))


def test_voco_published_file_is_the_bare_encoder():
    # VoCo_B_SSL_head.pt as published: 145 tensors in MONAI names, no heads (Large-Scale-Medical issue #40)
    source = swin_state(use_v2=True)
    encoder = only(source, *SWIN_ENC)
    assert len(encoder) == 145
    result = convert_checkpoint(encoder)
    assert result.layout.name == "voco" and result.layout.merging == "merging_legacy"
    assert_converted(result, source, list(encoder), n_dropped=0)
    assert result.covers == "encoder"


def test_vocomni_published_file_and_other_v2_networks():
    assert detect_layout(swin_state(use_v2=True, out_channels=21)).name == "vocomni"
    assert detect_layout(swin_state(use_v2=True, out_channels=3)).name == "hybridmim_bundle"


def test_two_keys_for_one_parameter_stop():
    source = swin_state()
    raw = dict(source)
    raw["backbone.out.conv.conv.bias"] = torch.zeros(2)
    with pytest.raises(ValueError, match="'out.conv.conv.bias'.*both map to 'out.conv.conv.bias'"):
        convert_checkpoint(raw)
