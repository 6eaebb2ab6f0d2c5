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


class _FrozenInstanceNorm(torch.nn.Module):
    """An ``InstanceNorm3d`` that normalises with the statistics of its previous call when ``frozen``.

    Instance norm takes its statistics over the whole feature map, so a decoder stage run on the region alone
    normalises differently from the same stage run on the whole crop and no voxel could match exactly. Recording the
    statistics in the full pass and replaying them in the partial pass leaves only local operations (convolutions,
    per-voxel activations and affine maps) and keeps the activations at their real scale (an identity instead would
    let the deep decoder paths fade to ~1e-7 and hide a misplaced coarse stage).
    """

    def __init__(self, norm: torch.nn.InstanceNorm3d) -> None:
        super().__init__()
        self.norm, self.frozen, self.stats = norm, False, None

    def forward(self, x):
        if not self.frozen:
            self.stats = (x.mean((2, 3, 4), keepdim=True), x.var((2, 3, 4), unbiased=False, keepdim=True))
        mean, var = self.stats
        y = (x - mean) / torch.sqrt(var + self.norm.eps)
        if self.norm.affine:  # BasicUNet's norms are affine, SwinUNETR's are not
            y = y * self.norm.weight.view(1, -1, 1, 1, 1) + self.norm.bias.view(1, -1, 1, 1, 1)
        return y


def _with_frozen_instance_norm(net):
    """Wrap every InstanceNorm3d of ``net`` (in place); returns the wrappers."""
    wrappers = []
    for module in list(net.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.InstanceNorm3d):
                wrappers.append(_FrozenInstanceNorm(child))
                setattr(module, name, wrappers[-1])
    assert wrappers
    return wrappers


def _distance_to_cropped_border(region, crop):
    """``Rd×Rh×Rw`` int: each region voxel's distance (in voxels) to the nearest region side lying inside the crop
    (a side on the crop's own border is no border: both passes see the same zero padding there)."""
    distance = torch.full(tuple(region), 10**6)
    for axis, (r, c) in enumerate(zip(region, crop)):
        if r < c:
            i = torch.arange(r)
            shape = [1, 1, 1]
            shape[axis] = r
            distance = torch.minimum(distance, torch.minimum(i, r - 1 - i).view(shape))
    return distance


# Margin (voxels from the region's border) beyond which the partial decoder must reproduce the full one exactly.
# Stages that run on the whole grid (the encoder, upcat_4 / decoder5) are exact; a k2s2 transposed convolution has no
# overlap, so it keeps the error band of its input; each zero-padded 3×3×3 convolution run on a cropped map widens it
# by one cell of its stride; a 1×1×1 convolution keeps it.
#   UNet: upcat_3 (stride 4) adds 2 convs: 2·4 = 8; upcat_2: 8 + 2·2 = 12; upcat_1: 12 + 2·1 = 14.
#   Swin: each up block concatenates a skip block (UnetResBlock, 2 convs, on the cropped hs) -> 2 cells, then runs its
#   own UnetResBlock -> 2 more: stride 8: max(0, 16) + 16 = 32; stride 4: max(32, 8) + 8 = 40;
#   stride 2: max(40, 4) + 4 = 44; stride 1: max(44, 2) + 2 = 46.
REGION_MARGIN = {"unet": 14, "swin": 46}


@pytest.mark.parametrize(
    "backbone,crop,region,start",
    [
        # UNet, all three axes cropped: centres 16, 8 and 24 are on the stride-8 grid already
        ("unet", (96, 64, 128), (64, 48, 80), (16, 8, 24)),
        # Swin needs regions wider than 2·46 voxels for an interior; one cropped axis at a time keeps it cheap (the
        # region spans the crop along the others, where both passes see the same zero padding)
        ("swin", (160, 32, 32), (112, 32, 32), (32, 0, 0)),  # centre 24 snaps to 32 (nearest multiple of 16)
        ("swin", (32, 32, 128), (32, 32, 96), (0, 0, 16)),
    ],
)
def test_partial_region_matches_the_full_reconstruction_away_from_its_border(backbone, crop, region, start):
    """The region's reconstruction is the matching window of the full reconstruction, off by no stride.

    Voxels farther than ``REGION_MARGIN`` from a cropped side of the region must agree to float rounding; a region
    placed (or a feature map cropped) one decoder stride off compares unrelated voxels and fails.
    """
    torch.manual_seed(0)
    net = tiny(backbone, region=region).eval()
    x = torch.rand(1, 1, *crop)
    with torch.no_grad():
        plain = net.backbone(x)
        norms = _with_frozen_instance_norm(net)
        full = net.backbone(x)  # region = crop: the plain backbone (test_full_region_is_the_plain_backbone)
        torch.testing.assert_close(full, plain)  # recording the statistics changes nothing
        for norm in norms:
            norm.frozen = True  # the partial pass normalises every stage with the full pass's statistics
        out = net(x)
    expected = tuple(slice(s, s + r) for s, r in zip(start, region))
    assert out["region_slices"] == expected
    margin = REGION_MARGIN[backbone]
    assert all(r > 2 * margin for r, c in zip(region, crop) if r < c)  # an interior on every cropped axis
    window = full[0, 0][expected]
    diff = (out["reconstruction"][0, 0] - window).abs()
    distance = _distance_to_cropped_border(region, crop)
    interior = distance >= margin
    torch.testing.assert_close(out["reconstruction"][0, 0][interior], window[interior], rtol=1e-5, atol=1e-5)
    # the margin is tight: one voxel closer to the border the cropped features show (a decoder that ran its finer
    # stages on the whole crop and cropped only its output would show nothing there)
    assert float(diff[distance == margin - 1].max()) > 1e-4
