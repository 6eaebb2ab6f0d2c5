"""Glue for the HybridMIM finetuning bundles that MONAI does not ship.

Three small pieces, each referenced from the bundles' configs:

- :func:`latest_checkpoint` (from :mod:`hybridmim_components.workflow.checkpoints`): the full checkpoint to resume from.
- :class:`HausdorffDistance95`: MONAI's ``HausdorffDistance`` handler measured in millimetres, the voxel spacing read
  from each prediction's affine (MONAI's handler passes no spacing and so reports voxels).
- :class:`BratsClassesToLabelMapd`: the inverse of ``ConvertToMultiChannelBasedOnBratsClassesd``: TC/WT/ET channels
  to one BraTS label map (1 necrotic/non-enhancing core, 2 oedema, 4 enhancing tumour), so that inference writes a
  label map aligned with the input images.
"""
from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.handlers import HausdorffDistance
from monai.metrics import HausdorffDistanceMetric
from monai.transforms import MapTransform, Transform
from monai.utils import convert_to_dst_type

from hybridmim_components.workflow.checkpoints import latest_checkpoint

__all__ = ["check_roi_size", "latest_checkpoint", "HausdorffDistance95", "BratsClassesToLabelMap", "BratsClassesToLabelMapd"]

logger = logging.getLogger(__name__)

def check_roi_size(roi_size: Sequence[int], multiple: int) -> None:
    """Fail when a bundle starts (before data is cached) on a crop the network cannot take.

    Args:
        roi_size: the bundle's ``roi_size`` (training crops and sliding-window patches).
        multiple: what every side must be a multiple of (SwinUNETR 32, BasicUNet 16).
    """
    sides = [int(n) for n in roi_size]
    bad = [n for n in sides if n <= 0 or n % multiple]
    if len(sides) != 3 or bad:
        raise ValueError(f"roi_size={sides} must be 3 positive multiples of {multiple} for this network (sides {bad}).")


class _SpacingHausdorffDistanceMetric(HausdorffDistanceMetric):
    """``HausdorffDistanceMetric`` that takes the voxel spacing from the prediction's affine when none is given, and
    scores a structure present in only one of prediction and label as ``inf`` on every MONAI version.

    ``y_pred``, ``y``: one-hot ``(B, C, H, W, D)``; returns ``(B, C)`` (``C - 1`` without the background).
    """

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs):  # type: ignore[override]
        if kwargs.get("spacing") is None and isinstance(y_pred, MetaTensor):
            affine = y_pred.affine
            affine = affine[0] if affine.ndim == 3 else affine  # a batch of one (the handler adds the batch dim)
            kwargs["spacing"] = affine_to_spacing(affine, r=y_pred.ndim - 2).tolist()
        hd = super()._compute_tensor(y_pred, y, **kwargs)
        # MONAI <= 1.6 gives nan at a percentile when one mask is empty, and the mean leaves nan out: a missed
        # structure vanished from the score. The next MONAI gives inf (Project-MONAI/MONAI#9096), as its maximum
        # always did; the same here on both. Empty on both sides stays nan (not applicable).
        first = 0 if self.include_background else 1
        pred_any = torch.as_tensor(y_pred)[:, first:].flatten(2).any(-1)
        label_any = torch.as_tensor(y)[:, first:].flatten(2).any(-1)
        one_sided = (pred_any != label_any).to(hd.device)
        return torch.where(one_sided, torch.full_like(hd, float("inf")), hd)


class HausdorffDistance95(HausdorffDistance):
    """MONAI's ``HausdorffDistance`` handler (95th percentile by default) in millimetres.

    The spacing of every image is read from its prediction's affine (``MetaTensor``), so the distance is physical at
    whatever resolution the prediction is given (the bundles' ``evaluate.json`` inverts the preprocessing first and
    measures at the original resolution). Plain tensors are measured in voxels, as by MONAI's handler. A class found
    in only one of prediction and label scores ``inf`` (so the mean is ``inf``), on MONAI 1.5/1.6 as on the next one.
    """

    def __init__(self, include_background: bool = False, percentile: float = 95.0, **kwargs) -> None:
        super().__init__(include_background=include_background, percentile=percentile, **kwargs)
        self.metric_fn = _SpacingHausdorffDistanceMetric(
            include_background=include_background,
            distance_metric=kwargs.get("distance_metric", "euclidean"),
            percentile=percentile,
            directed=kwargs.get("directed", False),
            reduction=kwargs.get("reduction", "mean"),
        )


class BratsClassesToLabelMap(Transform):
    """TC/WT/ET binary channels (``3×D×H×W``) to a one-channel BraTS label map (``1×D×H×W``).

    Nested as in BraTS: WT without TC is oedema (2), TC without ET necrotic/non-enhancing core (1), ET enhancing
    tumour (4); ``labels`` changes the three values (e.g. ``(1, 2, 3)`` for BraTS 2023).
    """

    def __init__(self, labels: Sequence[int] = (1, 2, 4)) -> None:
        if len(labels) != 3:
            raise ValueError(f"labels must give the values of (core, oedema, enhancing), got {labels!r}.")
        self.labels = tuple(int(v) for v in labels)

    def __call__(self, img):
        if img.shape[0] != 3:
            raise ValueError(f"expected 3 channels (TC, WT, ET), got shape {tuple(img.shape)}.")
        core, oedema, enhancing = self.labels
        x = torch.as_tensor(img.as_tensor() if isinstance(img, MetaTensor) else img)
        tc, wt, et = (x[i] > 0.5 for i in range(3))
        out = torch.zeros((1, *x.shape[1:]), dtype=torch.uint8, device=x.device)
        out[0][wt] = oedema
        out[0][tc] = core
        out[0][et] = enhancing
        return convert_to_dst_type(out, img, dtype=torch.uint8)[0]  # keeps a MetaTensor's affine and meta


class BratsClassesToLabelMapd(MapTransform):
    """Dictionary version of :class:`BratsClassesToLabelMap`."""

    def __init__(self, keys: KeysCollection, labels: Sequence[int] = (1, 2, 4), allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.converter = BratsClassesToLabelMap(labels)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.converter(d[key])
        return d
