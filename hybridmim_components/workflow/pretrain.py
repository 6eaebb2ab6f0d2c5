"""Batch preparation and loss logging of the HybridMIM pretraining bundles (MONAI/ignite engines).

The pretraining bundles run a MONAI ``SupervisedTrainer``/``SupervisedEvaluator`` whose batch is the collated output
of ``HierarchicalMaskd``. This module supplies:

- :class:`PrepareMIMBatch`: ``prepare_batch`` returning ``(masked image, {mim_* targets})``, so the engine's
  ``loss_function(outputs, targets)`` is ``HybridMIMLoss(outputs, batch)``.
- :func:`loss_terms_transform`: an ``output_transform`` for ``StatsHandler``/``TensorBoardStatsHandler`` that logs every
  loss term (``loss.last_terms``) and the learning rate.

The other pieces of the pretraining workflow live by concern: :mod:`hybridmim_components.workflow.pretext_metrics` (validation
metrics), :mod:`hybridmim_components.workflow.previews` (TensorBoard preview, NIfTI outputs), :mod:`hybridmim_components.workflow.seeding`
(same masks at every validation), :mod:`hybridmim_components.workflow.checkpoints` (resume, best validation, loading weights),
:mod:`hybridmim_components.workflow.progress` (progress bar).

Engine outputs (``engine.state.output``, not decollated) are dicts with ``"image"`` (masked crops ``B×C×D×H×W``),
``"label"`` (the targets dict of :class:`PrepareMIMBatch`) and ``"pred"`` (the network's output dict:
``reconstruction`` ``B×C×Rd×Rh×Rw``, ``region_slices``, ``number_logits`` ``B×N×9``, ``location_logits`` ``B×N×8``).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from monai.engines.utils import PrepareBatch

from hybridmim_components.masking import MIM_KEYS

__all__ = ["PrepareMIMBatch", "loss_terms_transform"]


# --- batch ------------------------------------------------------------------------------------------------------------
class PrepareMIMBatch(PrepareBatch):
    """``prepare_batch`` of the pretraining engines.

    Args:
        image_key: key of the masked image in the batch.
        target_keys: keys moved to the device and returned as the targets dict (default: the ``mim_*`` keys
            ``mim_target`` ``B×C×D×H×W``, ``mim_patch_mask`` ``B×D/p×H/p×W/p`` bool, ``mim_count`` ``B×N`` int64,
            ``mim_location`` ``B×N×8``).

    ``__call__(batchdata, device, non_blocking, **kwargs) -> (image, targets)``; the image keeps its metadata
    (``MetaTensor``) so savers know the affine; targets are plain tensors.
    """

    def __init__(self, image_key: str = "image", target_keys: Sequence[str] = MIM_KEYS) -> None:
        self.image_key = image_key
        self.target_keys = tuple(target_keys)

    def __call__(self, batchdata: Mapping, device=None, non_blocking: bool = False, **kwargs: Any):
        missing = [k for k in (self.image_key, *self.target_keys) if k not in batchdata]
        if missing:
            raise KeyError(
                f"batch has no key(s) {missing} (keys: {sorted(batchdata)}); the preprocessing must end with "
                "HierarchicalMaskd so that the batch carries the mim_* targets."
            )
        image = batchdata[self.image_key].to(device=device, non_blocking=non_blocking, **kwargs)
        targets = {}
        for k in self.target_keys:
            value = batchdata[k]
            value = value.as_tensor() if hasattr(value, "as_tensor") else torch.as_tensor(value)
            targets[k] = value.to(device=device, non_blocking=non_blocking, **kwargs)
        return image, targets


# --- logging ----------------------------------------------------------------------------------------------------------
def loss_terms_transform(loss: Any, optimizer: torch.optim.Optimizer | None = None, prefix: str = "train_") -> Callable:
    """``output_transform`` logging every loss term and the learning rate.

    Returns a callable ``f(output) -> {prefix + term: float, ..., "lr": float}`` reading ``loss.last_terms`` (the
    detached terms of the last call of ``HybridMIMLoss``: loss, reconstruction, number, location, consistency,
    contrastive) and ``optimizer.param_groups[0]["lr"]``. The engine output itself is not used.
    """

    def transform(output: Any) -> dict[str, float]:
        terms = getattr(loss, "last_terms", None) or {}
        values = {f"{prefix}{k}": float(v) for k, v in terms.items()}
        if optimizer is not None:
            values["lr"] = float(optimizer.param_groups[0]["lr"])
        return values

    return transform
