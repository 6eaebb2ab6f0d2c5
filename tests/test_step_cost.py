"""``tools/benchmarks/compute_step_cost.py``: FLOPs and saved activations of one training step, on tiny settings.

Checked against hand counts (a convolution's multiply-adds, the bytes it saves for backward), and the ``meta``
device (shapes only, what the paper-scale table uses) against the real CPU arithmetic on a tiny bundle step.
"""
from __future__ import annotations

import json

import pytest
import torch

from tools.benchmarks import compute_step_cost as csc

TINY = {"features": [4, 4, 8, 8, 16, 4], "feature_size": 12, "roi_size": [64, 64, 64], "region_size": [32, 32, 32],
        "batch_size": 1}


@pytest.mark.parametrize("x_requires_grad", [False, True])
def test_count_step_matches_a_hand_count_for_a_convolution(x_requires_grad):
    conv = torch.nn.Conv3d(2, 3, kernel_size=3, padding=1, bias=False)
    x = torch.rand(1, 2, 4, 4, 4, requires_grad=x_requires_grad)
    cost = csc.count_step(lambda: conv(x).sum(), list(conv.parameters()))
    macs = 3 * 4 ** 3 * 2 * 3 ** 3  # output voxels × channels × (in channels · kernel volume)
    assert cost["flops_forward"] == 2 * macs
    # backward: the weight gradient is one more such product, the input gradient another (only if x needs one)
    assert cost["flops_backward"] == 2 * macs * (2 if x_requires_grad else 1)
    assert cost["flops"] == cost["flops_forward"] + cost["flops_backward"]
    assert cost["saved_activation_bytes"] == 2 * 4 ** 3 * 4  # the float32 input
    assert cost["saved_parameter_bytes"] == conv.weight.numel() * 4


def test_views_of_one_storage_count_once():
    x = torch.rand(8, 8, requires_grad=True)

    def step():
        a, b = x.exp().split(4)  # exp saves its output; the two halves are views of that one storage
        return (a * b).sum()

    cost = csc.count_step(step)
    assert cost["saved_activation_bytes"] == 8 * 8 * 4  # exp's output (a and b are views of it): 256 bytes, once


@pytest.mark.parametrize("name, small", [
    ("hybridmim_unet_pretrain", {**TINY, "roi_size": [32, 32, 32], "region_size": [32, 32, 32]}),  # ~2 s
    # Swin needs a 64³ crop (its bottleneck is 1/32 of the crop): ~15 s of real CPU arithmetic
    pytest.param("hybridmim_swin_pretrain", {**TINY, "samples_per_volume": 1}, marks=pytest.mark.slow),
])
def test_meta_device_gives_the_figures_of_the_real_step(name, small):
    on_meta = csc.training_step_cost(name, small, device="meta")
    on_cpu = csc.training_step_cost(name, small, device="cpu")
    for key in ("flops", "flops_forward", "flops_backward", "saved_activation_bytes", "saved_parameter_bytes",
                "saved_tensors", "parameters"):
        assert on_meta[key] == on_cpu[key] > 0, key
    assert on_meta["settings"]["crops_per_step"] == small.get("samples_per_volume", 2)  # batch_size 1
    assert on_meta["flops_backward"] > on_meta["flops_forward"]


def test_bundle_settings_are_read_from_the_config_and_bad_overrides_are_named(tmp_path):
    parts = csc.training_parts("hybridmim_swin_pretrain_brats", {"feature_size": 12, "roi_size": [64, 64, 64],
                                                                  "region_size": [32, 32, 32]})
    assert tuple(parts["image"].shape) == (2, 4, 64, 64, 64)  # batch 1 × 2 samples, 4 BraTS channels
    assert set(parts["targets"]) == {"mim_target", "mim_patch_mask", "mim_count", "mim_location"}
    with pytest.raises(KeyError, match="not_a_key"):
        csc.bundle_parser("hybridmim_unet_pretrain", {"not_a_key": 1})
    with pytest.raises(SystemExit):
        csc.main(["--bundles", "hybridmim_unet_pretrain", "--override", "not_a_key=1",
                  "--output", str(tmp_path / "x")])


def test_cli_writes_json_and_markdown(tmp_path, capsys):
    overrides = [a for k, v in TINY.items() if k != "feature_size" for a in ("--override", f"{k}={json.dumps(v)}")]
    rows = csc.main(["--bundles", "hybridmim_unet_pretrain", *overrides, "--output", str(tmp_path / "cost")])
    result = json.loads((tmp_path / "cost.json").read_text())
    assert result["computed_not_measured"] is True and result["h100_bf16_dense_tflops"] == 989.0
    row = result["rows"][0]
    assert row["flops"] == rows[0]["flops"] > 0
    assert row["h100_40pct_step_s"] == pytest.approx(row["flops"] / (0.4 * 989e12))
    md = (tmp_path / "cost.md").read_text()
    assert "computed, not measured" in md and "| hybridmim_unet_pretrain | 64×64×64 | 2 |" in md
