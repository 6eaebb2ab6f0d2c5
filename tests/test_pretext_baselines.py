"""Trivial baselines of the pretext metrics against hand computations on tiny tensors."""
from __future__ import annotations

import math

import pytest
import torch

from hybridmim_components.workflow.pretext_baselines import (
    LocationAccuracyBaseline,
    MaskedReconstructionBaseline,
    NumberAccuracyBaseline,
)


def _run(metric, *batches):
    metric.reset()
    for pred, targets in batches:
        metric.update((pred, targets))
    return metric.compute()


def test_number_baseline_is_the_mode_share_over_the_epoch():
    # counts over two batches: 3 appears 4 times out of 7 -> 4/7, whatever a batch alone says
    first = {"mim_count": torch.tensor([[3, 3, 1], [0, 8, 3]])}
    second = {"mim_count": torch.tensor([[3]])}
    assert _run(NumberAccuracyBaseline(), ({}, first), ({}, second)) == pytest.approx(4 / 7)
    assert _run(NumberAccuracyBaseline(), ({}, {"mim_count": torch.tensor([[8, 8]])})) == 1.0
    assert math.isnan(_run(NumberAccuracyBaseline()))  # nothing seen


def test_location_baseline_is_the_majority_share():
    location = torch.zeros(1, 2, 8)
    location[0, 0, :3] = 1  # 3 of 16 masked -> answering "visible" everywhere scores 13/16
    assert _run(LocationAccuracyBaseline(), ({}, {"mim_location": location})) == pytest.approx(13 / 16)
    assert _run(LocationAccuracyBaseline(), ({}, {"mim_location": 1 - location})) == pytest.approx(13 / 16)


def test_reconstruction_baseline_predicts_the_visible_mean():
    # crop 1×1×2×2×2 with 1-voxel patches: patches are voxels; region = the first slice along D
    target = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]).reshape(1, 1, 2, 2, 2)
    patch_mask = torch.zeros(1, 2, 2, 2, dtype=torch.bool)
    patch_mask[0, 0, 0, 0] = True  # value 1, inside the region
    patch_mask[0, 1, 1, 1] = True  # value 8, outside the region
    region = (slice(0, 1), slice(0, 2), slice(0, 2))
    visible_mean = (2 + 3 + 4 + 5 + 6 + 7) / 6  # 4.5
    expected = (visible_mean - 1.0) ** 2  # only the masked voxel inside the region counts
    got = _run(MaskedReconstructionBaseline(), ({"region_slices": region},
                                               {"mim_target": target, "mim_patch_mask": patch_mask}))
    assert got == pytest.approx(expected)
