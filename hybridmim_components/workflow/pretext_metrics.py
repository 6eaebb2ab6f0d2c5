"""Pretext metrics of the HybridMIM pretraining bundles (ignite ``Metric``s for MONAI's evaluators).

Each metric is a mean ``sum / count`` accumulated over the epoch and all-reduced across ranks under DDP:

- :class:`MaskedReconstructionMSE`: MSE on the masked voxels of the reconstructed region (the key metric).
- :class:`NumberAccuracy`: exact number of masked patches per sub-volume.
- :class:`LocationAccuracy`: masked/visible per patch.

They read the (not decollated) engine output: ``"pred"``, the network's output dict (``reconstruction``
``B×C×Rd×Rh×Rw``, ``region_slices``, ``number_logits`` ``B×N×9``, ``location_logits`` ``B×N×8``) and ``"label"``,
the ``mim_*`` targets of :class:`hybridmim_components.workflow.pretrain.PrepareMIMBatch`.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce
from monai.utils import CommonKeys as Keys

from hybridmim_components.masking import masked_voxels_in_region

__all__ = ["lower_is_better", "MaskedReconstructionMSE", "NumberAccuracy", "LocationAccuracy"]


def lower_is_better(current: float, best: float) -> bool:
    """``metric_cmp_fn`` of the evaluator: the key metric (reconstruction MSE) improves when it goes down."""
    return current < best


class _SumCountMetric(Metric):
    """Mean of a quantity as ``sum / count`` accumulated over the epoch and all-reduced across ranks.

    Subclasses implement ``batch_sum_count(pred, targets) -> (sum, count)`` on one (not decollated) engine output.
    ``compute`` returns ``nan`` when nothing was counted.
    """

    # ignite picks these keys out of the engine output dict: update() receives (pred dict, targets dict)
    required_output_keys = (Keys.PRED, Keys.LABEL)
    _required_output_keys = required_output_keys

    def __init__(self, output_transform: Callable = lambda x: x, device: str | torch.device = "cpu") -> None:
        self._sum: torch.Tensor
        self._count: torch.Tensor
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._sum = torch.zeros((), dtype=torch.float64, device=self._device)
        self._count = torch.zeros((), dtype=torch.float64, device=self._device)

    @reinit__is_reduced
    def update(self, output: Sequence | Mapping) -> None:
        """``output``: ``(pred, targets)`` (what ignite extracts from the engine output) or the output dict."""
        if isinstance(output, Mapping):
            output = (output.get(Keys.PRED), output.get(Keys.LABEL))
        pred, targets = output
        if not isinstance(pred, Mapping) or not isinstance(targets, Mapping):
            raise ValueError(
                f"{type(self).__name__} expects the network's output dict and the mim_* targets dict "
                f"(engine output keys '{Keys.PRED}', '{Keys.LABEL}', decollate=False), got "
                f"{type(pred).__name__} and {type(targets).__name__}."
            )
        total, count = self.batch_sum_count(pred, targets)
        self._sum += total.detach().to(self._device, torch.float64)
        self._count += torch.as_tensor(count, dtype=torch.float64, device=self._device)

    @sync_all_reduce("_sum", "_count")
    def compute(self) -> float:
        if self._count.item() == 0:
            return float("nan")
        return (self._sum / self._count).item()

    def batch_sum_count(self, pred: Mapping, targets: Mapping) -> tuple[torch.Tensor, float]:
        raise NotImplementedError


class MaskedReconstructionMSE(_SumCountMetric):
    """Mean squared error over the masked voxels inside the reconstruction region (lower is better).

    ``MSE = Σ_{c, v ∈ R, masked} (x̂_cv − x_cv)² / (C · |{v ∈ R, masked}|)``, accumulated over all samples of the
    epoch (a voxel-weighted mean, not a mean of per-sample means).

    Inputs: ``pred["reconstruction"]`` ``B×C×Rd×Rh×Rw``, ``pred["region_slices"]``, ``targets["mim_target"]``
    ``B×C×D×H×W``, ``targets["mim_patch_mask"]`` ``B×d×h×w`` bool (patch side ``p = D/d``).
    """

    def batch_sum_count(self, pred, targets):
        target = targets["mim_target"]
        patch_mask = targets["mim_patch_mask"]
        region = tuple(pred["region_slices"])
        patch_size = target.shape[2] // patch_mask.shape[1]
        voxels = masked_voxels_in_region(patch_mask, region, patch_size)  # B×1×R
        recon = pred["reconstruction"].float()  # B×C×R
        original = target[(slice(None), slice(None), *region)].float()  # B×C×R
        squared = (recon - original) ** 2 * voxels
        return squared.sum(), float(voxels.sum().item()) * recon.shape[1]


class NumberAccuracy(_SumCountMetric):
    """Share of sub-volumes whose number of masked patches is predicted exactly.

    ``argmax(pred["number_logits"], -1) == targets["mim_count"]`` over all ``B×N`` sub-volumes.
    """

    def batch_sum_count(self, pred, targets):
        correct = pred["number_logits"].argmax(-1) == targets["mim_count"]  # B×N
        return correct.sum(), float(correct.numel())


class LocationAccuracy(_SumCountMetric):
    """Per-patch accuracy of the location head: ``(logit > 0) == (label > 0.5)`` over all ``B×N×8`` patches."""

    def batch_sum_count(self, pred, targets):
        correct = (pred["location_logits"] > 0) == (targets["mim_location"] > 0.5)  # B×N×8
        return correct.sum(), float(correct.numel())
