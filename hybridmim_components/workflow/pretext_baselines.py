"""Trivial baselines of the pretext metrics, measured on the same validation crops and masks.

A pretext metric means little alone: 30 % number accuracy is good when counts are spread over 9 values and poor when
one count dominates. Each baseline is what a predictor that ignores the image scores, accumulated over the epoch and
all-reduced across ranks like the metrics themselves (:mod:`hybridmim_components.workflow.pretext_metrics`):

- :class:`NumberAccuracyBaseline`: always predict the most frequent count of the evaluated set (the mode).
- :class:`LocationAccuracyBaseline`: always predict the more frequent state (masked or visible) for every patch.
- :class:`MaskedReconstructionBaseline`: predict every masked voxel by the mean of the crop's visible voxels (per
  channel): the MSE a reconstruction must beat to have learned anything beyond the crop's brightness.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce

from hybridmim_components.masking import masked_voxels_in_region, patches_to_voxels
from hybridmim_components.workflow.pretext_metrics import _SumCountMetric

__all__ = ["NumberAccuracyBaseline", "LocationAccuracyBaseline", "MaskedReconstructionBaseline"]

NUM_COUNTS = 9  # 0..8 masked patches per sub-volume


class NumberAccuracyBaseline(_SumCountMetric):
    """Accuracy of always answering the most frequent count: ``max_k n_k / Σ_k n_k`` over the counts of all
    ``B×N`` sub-volumes of the epoch (``targets["mim_count"]``, int64 in 0..8)."""

    def __init__(self, output_transform: Callable = lambda x: x, device: str | torch.device = "cpu") -> None:
        self._histogram: torch.Tensor
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        super().reset()
        self._histogram = torch.zeros(NUM_COUNTS, dtype=torch.float64, device=self._device)

    def batch_sum_count(self, pred: Mapping, targets: Mapping):
        counts = targets["mim_count"].reshape(-1).to(torch.int64)
        self._histogram += torch.bincount(counts, minlength=NUM_COUNTS)[:NUM_COUNTS].to(self._histogram)
        return torch.zeros(()), float(counts.numel())

    @sync_all_reduce("_histogram", "_count")
    def compute(self) -> float:
        if self._count.item() == 0:
            return float("nan")
        return (self._histogram.max() / self._count).item()


class LocationAccuracyBaseline(_SumCountMetric):
    """Accuracy of answering the majority state for every patch: ``max(q, 1 − q)``, ``q`` the share of masked
    patches among all ``B×N×8`` entries of ``targets["mim_location"]`` (≈ ``1 − mask_ratio``)."""

    def batch_sum_count(self, pred: Mapping, targets: Mapping):
        location = targets["mim_location"] > 0.5
        return location.sum(), float(location.numel())

    @sync_all_reduce("_sum", "_count")
    def compute(self) -> float:
        if self._count.item() == 0:
            return float("nan")
        share = (self._sum / self._count).item()
        return max(share, 1.0 - share)


class MaskedReconstructionBaseline(_SumCountMetric):
    """MSE of predicting each masked voxel of the region by the mean of its crop's visible voxels.

    ``m_bc = mean_{v visible} x_bcv`` over the whole crop; ``Σ_{b,c,v ∈ R masked} (m_bc − x_bcv)² / (C · #masked in
    R)``, the same voxels and weighting as :class:`~hybridmim_components.workflow.pretext_metrics.MaskedReconstructionMSE`.
    Inputs: ``targets["mim_target"]`` ``B×C×D×H×W``, ``targets["mim_patch_mask"]`` ``B×d×h×w``,
    ``pred["region_slices"]``.
    """

    def batch_sum_count(self, pred: Mapping, targets: Mapping):
        target = targets["mim_target"].float()
        patch_mask = targets["mim_patch_mask"].bool()
        patch_size = target.shape[2] // patch_mask.shape[1]
        visible = (~patches_to_voxels(patch_mask, patch_size)).unsqueeze(1).to(target)  # B×1×D×H×W
        mean = (target * visible).sum((2, 3, 4), keepdim=True) / visible.sum((2, 3, 4), keepdim=True).clamp_min(1)
        region = tuple(pred["region_slices"])
        masked = masked_voxels_in_region(patch_mask, region, patch_size)  # B×1×R
        original = target[(slice(None), slice(None), *region)]
        squared = (mean - original) ** 2 * masked
        return squared.sum(), float(masked.sum().item()) * target.shape[1]
