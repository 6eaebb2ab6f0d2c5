"""hybridmim_components.reconstruction: the inference-time networks of the pretraining bundles.

They must give exactly the pretraining network's region reconstruction from the backbone's weights alone (what
``models/model.pt`` holds), with the backbone's own parameter names, and the UNet one must script (TorchScript).
"""
from __future__ import annotations

import math

import pytest
import torch

from hybridmim_components import HybridMIMSwinUNETR, HybridMIMUNet
from hybridmim_components.reconstruction import (
    RegionReconstructionSwinUNETR,
    RegionReconstructionUNet,
    region_start,
)


@pytest.mark.parametrize(
    "size,region,stride,expected",
    [(96, 64, 8, 16), (64, 32, 8, 16), (64, 64, 8, 0), (80, 32, 16, 32), (96, 32, 16, 32), (128, 96, 8, 16)],
)
def test_region_start_by_hand(size, region, stride, expected):
    # centred start (size - region) / 2 rounded to the nearest multiple of stride (halves round up):
    # 80/32/16 -> 24 is 1.5 strides -> 2 strides = 32; 96/32/16 -> 32 = 2 strides
    assert region_start(size, region, stride) == expected


def test_region_start_matches_the_pretraining_network():
    net = HybridMIMUNet(features=(4, 4, 8, 8, 16, 4), region_size=(8, 16, 24))
    for size in range(32, 161, 32):
        slices = net.region_slices((size, size, size))
        for s, r in zip(slices, (8, 16, 24)):
            assert s.start == region_start(size, r, 8) == 8 * math.floor((size - r) / 2 / 8 + 0.5)


@pytest.mark.parametrize("backbone", ["unet", "swin"])
def test_same_reconstruction_as_the_pretraining_network(backbone):
    torch.manual_seed(0)
    if backbone == "unet":
        net = HybridMIMUNet(in_channels=2, features=(4, 4, 8, 8, 16, 4), region_size=(32, 16, 32))
        rec = RegionReconstructionUNet(in_channels=2, features=(4, 4, 8, 8, 16, 4), region_size=(32, 16, 32))
        x = torch.rand(2, 2, 64, 96, 64)
    else:
        net = HybridMIMSwinUNETR(in_channels=2, feature_size=12, region_size=(32, 32, 16))
        rec = RegionReconstructionSwinUNETR(in_channels=2, feature_size=12, region_size=(32, 32, 16))
        x = torch.rand(1, 2, 64, 64, 96)
    # models/model.pt is the pretraining network's backbone state dict: it loads strictly, nothing left over
    assert set(rec.state_dict()) == set(net.backbone.state_dict())
    rec.load_state_dict(net.backbone.state_dict(), strict=True)
    net.eval(), rec.eval()
    with torch.no_grad():
        expected, got = net(x), rec(x)
    assert isinstance(got, torch.Tensor) and got.shape == expected["reconstruction"].shape
    torch.testing.assert_close(got, expected["reconstruction"], rtol=0, atol=0)
    assert rec.region_slices(x.shape[2:]) == tuple(expected["region_slices"])


def test_unet_reconstruction_scripts():
    rec = RegionReconstructionUNet(in_channels=1, features=(4, 4, 8, 8, 16, 4), region_size=32).eval()
    scripted = torch.jit.script(rec)
    x = torch.rand(1, 1, 64, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), rec(x))
    assert scripted(x).shape == (1, 1, 32, 32, 32)


def test_bad_sizes_name_the_problem():
    with pytest.raises(ValueError, match="multiples of the decoder stride 8"):
        RegionReconstructionUNet(features=(4, 4, 8, 8, 16, 4), region_size=20)
    rec = RegionReconstructionUNet(features=(4, 4, 8, 8, 16, 4), region_size=64)
    with pytest.raises(ValueError, match="multiples of 16"):
        rec(torch.rand(1, 1, 72, 64, 64))
    with pytest.raises(ValueError, match="larger than the crop"):
        rec(torch.rand(1, 1, 32, 64, 64))
