"""LegacyPatchMerging reproduces MONAI <= 1.4's SwinUNETR; MONAI's current default does not.

The reference (``tests/data/swin_merging_reference_monai14.pt``) was computed under MONAI 1.4.0 by
``tools/weights/make_merging_reference.py``; its docstring has the command.
"""
import pytest
import torch
import torch.nn as nn
from monai.networks.nets import SwinUNETR
from monai.networks.nets.swin_unetr import PatchMerging
from monai.utils import version_leq

import monai
from hybridmim_components.weights.merging import DOWNSAMPLE_CHOICES, LegacyPatchMerging, resolve_downsample
from tools.weights.make_merging_reference import NET_ARGS, REFERENCE_PATH, fingerprints, seeded_state_dict

# Written out here, not imported: MONAI 1.4.0's swin_unetr.py, PatchMerging.forward, x0..x7 as (d, h, w) offsets.
MONAI14_ORDER = [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1)]
MONAI15_ORDER = [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1)]


@pytest.fixture(scope="module")
def reference():
    return torch.load(REFERENCE_PATH, weights_only=True)


def _run(reference, downsample):
    """SwinUNETR(NET_ARGS, downsample) with the reference's weights (hash-checked) on its input -> [1, 2, 64, 32, 32]."""
    net = SwinUNETR(**NET_ARGS, downsample=downsample).eval()
    weights = seeded_state_dict(net.state_dict(), reference["seed"])
    mismatched = [k for k, h in fingerprints(weights).items() if reference["sha256"].get(k) != h]
    assert not mismatched and set(weights) == set(reference["sha256"]), (
        f"rebuilt weights differ from those MONAI {reference['monai_version']} ran with: {mismatched[:5]}; "
        "rerun tools/weights/make_merging_reference.py"
    )
    net.load_state_dict(weights, strict=True)
    with torch.no_grad():
        return net, net(reference["input"].float())


def test_reference_was_made_under_monai_14(reference):
    assert reference["monai_version"].startswith("1.4.")
    assert reference["input"].shape == (1, 1, 64, 32, 32) and reference["output"].shape == (1, 2, 64, 32, 32)
    assert reference["output"].std() > 0.1  # not a degenerate network


def test_legacy_merging_reproduces_monai_14(reference):
    net, out = _run(reference, resolve_downsample("merging_legacy"))
    assert all(isinstance(getattr(net.swinViT, f"layers{i}")[0].downsample, LegacyPatchMerging) for i in range(1, 5))
    assert (out - reference["output"]).abs().max().item() < 1e-5


@pytest.mark.skipif(version_leq(monai.__version__, "1.4.99"), reason="MONAI <= 1.4's default is the legacy order")
def test_default_merging_differs_from_monai_14(reference):
    _, out = _run(reference, "merging")
    assert (out - reference["output"]).abs().max().item() > 1e-3


def _labelled(d, h, w, c):
    """[1, d, h, w, c] whose value names its position: 1000·d + 100·h + 10·w + c."""
    grid = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in (d, h, w, c)), indexing="ij")
    return (1000 * grid[0] + 100 * grid[1] + 10 * grid[2] + grid[3])[None]


def _concat_only(module):
    # without norm and reduction the module returns the concatenation itself: [B, D/2, H/2, W/2, 8·C]
    module.norm, module.reduction = nn.Identity(), nn.Identity()
    return module


def test_legacy_concatenation_order_is_monai_14s():
    c = 3
    cat = _concat_only(LegacyPatchMerging(dim=c))(_labelled(2, 2, 2, c))
    assert cat.shape == (1, 1, 1, 1, 8 * c)
    expected = torch.tensor([1000.0 * i + 100 * j + 10 * k + ch for i, j, k in MONAI14_ORDER for ch in range(c)])
    assert torch.equal(cat.flatten(), expected)
    # and on a larger, odd-sized grid (zero-padded at the end), block by block
    x = _labelled(3, 4, 5, c)
    padded = torch.nn.functional.pad(x, (0, 0, 0, 1, 0, 0, 0, 1))  # -> [1, 4, 4, 6, c]
    hand = torch.cat([padded[:, i::2, j::2, k::2] for i, j, k in MONAI14_ORDER], -1)
    assert torch.equal(_concat_only(LegacyPatchMerging(dim=c))(x), hand)


def test_legacy_differs_from_current_monai_only_in_the_order():
    c = 4
    torch.manual_seed(0)
    legacy, current = LegacyPatchMerging(dim=c), PatchMerging(dim=c)
    assert legacy.state_dict().keys() == current.state_dict().keys()
    legacy.load_state_dict(current.state_dict())
    x = torch.randn(2, 4, 6, 2, c)
    with torch.no_grad():
        by_hand = current.reduction(current.norm(torch.cat([x[:, i::2, j::2, k::2] for i, j, k in MONAI14_ORDER], -1)))
        assert torch.allclose(legacy(x), by_hand, atol=1e-6)
        if not version_leq(monai.__version__, "1.4.99"):
            assert not torch.allclose(legacy(x), current(x), atol=1e-3)
        # 2-D input [B, H, W, C]: MONAI's path, unchanged
        legacy2d, current2d = LegacyPatchMerging(dim=c, spatial_dims=2), PatchMerging(dim=c, spatial_dims=2)
        legacy2d.load_state_dict(current2d.state_dict())
        x2d = torch.randn(2, 6, 5, c)
        assert torch.equal(legacy2d(x2d), current2d(x2d))
    with pytest.raises(ValueError, match="5D"):
        legacy(torch.randn(2, 3, c))


def test_resolve_downsample():
    assert resolve_downsample("merging") == "merging" and resolve_downsample("mergingv2") == "mergingv2"
    assert resolve_downsample("merging_legacy") is LegacyPatchMerging
    assert set(DOWNSAMPLE_CHOICES) == {"merging", "merging_legacy", "mergingv2"}
    for bad in ("merge", "Merging", "", None, LegacyPatchMerging):
        with pytest.raises(ValueError, match="downsample") as err:
            resolve_downsample(bad)
        assert all(repr(choice) in str(err.value) for choice in DOWNSAMPLE_CHOICES)
