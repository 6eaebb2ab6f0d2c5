"""Pretraining networks: shapes for both backbones, region placement, full-region equivalence, heads, views."""
import pytest
import torch
from monai.networks.nets import BasicUNet, SwinUNETR

from hybridmim_components import HybridMIMSwinUNETR, HybridMIMUNet, load_pretrained_weights

TINY_UNET = (4, 4, 8, 8, 16, 4)


def tiny(backbone, in_channels=1, region=64, **kwargs):
    if backbone == "swin":
        return HybridMIMSwinUNETR(in_channels=in_channels, feature_size=12, region_size=region, **kwargs)
    return HybridMIMUNet(in_channels=in_channels, features=TINY_UNET, region_size=region, **kwargs)


@pytest.mark.parametrize("backbone", ["swin", "unet"])
@pytest.mark.parametrize("crop,region,channels", [(96, 64, 1), (128, 96, 4), (96, 64, 4), (128, 96, 1)])
def test_output_shapes(backbone, crop, region, channels):
    net = tiny(backbone, channels, region).eval()
    with torch.no_grad():
        out = net(torch.rand(1, channels, crop, crop, crop))
    n_sub = (crop // 32) ** 3
    assert tuple(out["reconstruction"].shape) == (1, channels, region, region, region)
    assert out["region_slices"] == (slice(16, 16 + region),) * 3  # centred: 16 is on both decoder strides
    assert tuple(out["number_logits"].shape) == (1, n_sub, 9)
    assert tuple(out["location_logits"].shape) == (1, n_sub, 8)
    assert out["embeddings"] is None  # eval mode: one view, no contrast


@pytest.mark.parametrize("backbone", ["swin", "unet"])
def test_full_region_is_the_plain_backbone(backbone):
    net = tiny(backbone, region=64).eval()
    x = torch.rand(1, 1, 64, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net(x)["reconstruction"], net.backbone(x))


def test_region_snaps_to_decoder_stride():
    swin, unet = tiny("swin", region=32), tiny("unet", region=32)
    assert swin.region_slices((96, 96, 96)) == (slice(32, 64),) * 3  # centre 32 is a multiple of 16
    assert unet.region_slices((96, 64, 128)) == (slice(32, 64), slice(16, 48), slice(48, 80))
    assert tiny("swin", region=48).region_slices((96, 96, 96)) == (slice(32, 80),) * 3  # 24 -> 32 (nearest 16)
    with pytest.raises(ValueError, match="decoder stride 16"):
        tiny("swin", region=40)
    with pytest.raises(ValueError, match="larger than the crop"):
        tiny("unet", region=96)(torch.rand(1, 1, 64, 64, 64))
    with pytest.raises(ValueError, match="multiples of sub_volume_size=32"):
        tiny("unet", region=32)(torch.rand(1, 1, 64, 64, 48))


def test_heads_read_one_pooled_feature_per_sub_volume_in_c_order():
    net = tiny("unet", region=32)
    bottleneck = torch.zeros(1, 16, 4, 6, 2)  # UNet bottleneck stride 16: a 64×96×32 crop, 2×3×1 sub-volumes
    for j, (z, y) in enumerate([(z, y) for z in range(2) for y in range(3)]):
        bottleneck[0, 0, 2 * z : 2 * z + 2, 2 * y : 2 * y + 2, :] = j  # sub-volume j filled with value j
    bottleneck[0, 1, 0, 0, 0] = 4.0  # one cell of sub-volume 0: its mean over 2×2×2 cells is 0.5
    with torch.no_grad():
        for head in (net.number_head, net.location_head):
            head.weight.zero_()
            head.bias.zero_()
            head.weight[0, 0] = 1.0
            head.weight[1, 1] = 1.0
        number, location = net.forward_heads(bottleneck)
    assert tuple(number.shape) == (1, 6, 9)
    torch.testing.assert_close(number[0, :, 0], torch.arange(6.0))
    torch.testing.assert_close(location[0, :, 1], torch.tensor([0.5, 0, 0, 0, 0, 0]))


@pytest.mark.parametrize("backbone", ["swin", "unet"])
def test_two_sided_views_both_carry_gradient(backbone):
    torch.manual_seed(0)
    net = tiny(backbone, region=32).train()
    z1, z2 = net(torch.rand(2, 1, 64, 64, 64))["embeddings"]
    assert not torch.allclose(z1, z2)  # dropout makes two different views
    z2.sum().backward()  # gradient through the second view alone reaches the encoder
    grads = [p.grad for p in net.backbone.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0


def test_one_sided_second_view_has_no_gradient_and_none_has_no_views():
    net = tiny("unet", region=32, contrastive_views="one_sided").train()
    z1, z2 = net(torch.rand(2, 1, 64, 64, 64))["embeddings"]
    assert z1.requires_grad and not z2.requires_grad
    net = tiny("unet", region=32, contrastive_views="none").train()
    assert net(torch.rand(2, 1, 64, 64, 64))["embeddings"] is None
    with pytest.raises(ValueError, match="contrastive_views"):
        tiny("unet", contrastive_views="both")


def test_partial_decoder_computes_only_the_region():
    """The finest decoder stage runs on region voxels only: hook its input size."""
    net = tiny("unet", region=32).eval()
    seen = []
    net.backbone.upcat_1.register_forward_hook(lambda m, inp, out: seen.append(tuple(out.shape[2:])))
    with torch.no_grad():
        net(torch.rand(1, 1, 96, 96, 96))
    assert seen == [(32, 32, 32)]


@pytest.mark.parametrize("backbone", ["swin", "unet"])
@pytest.mark.parametrize("channels", [1, 4])
def test_backbone_weights_load_into_plain_monai_network(tmp_path, backbone, channels):
    net = tiny(backbone, channels)
    path = tmp_path / "model.pt"
    torch.save(net.backbone.state_dict(), path)
    if backbone == "swin":
        finetune = SwinUNETR(in_channels=channels, out_channels=14, feature_size=12)
        last = "out."
    else:
        finetune = BasicUNet(spatial_dims=3, in_channels=channels, out_channels=14, features=TINY_UNET)
        last = "final_conv."
    report = load_pretrained_weights(finetune, path)
    assert report["left_to_train"] and all(n.startswith(last) for n in report["left_to_train"])
    assert not report["unexpected"]
    source = net.backbone.state_dict()
    for name, value in finetune.state_dict().items():
        if not name.startswith(last):
            assert torch.equal(value, source[name]), name


def test_check_crop_fails_fast_with_the_sizes_named():
    net = tiny("unet", region=64)
    assert net.check_crop((96, 96, 96), patch_size=16) == (slice(16, 80),) * 3
    with pytest.raises(ValueError, match=r"roi_size=\(96, 96, 80\).*sub_volume_size=32"):
        net.check_crop((96, 96, 80))
    with pytest.raises(ValueError, match="patch_size=8"):
        net.check_crop(96, patch_size=8)
    with pytest.raises(ValueError, match="larger than the crop"):
        net.check_crop(32)
