"""The MRI bundles' z-score normalisation, which inverting a prediction (``Invertd``) leaves alone on every MONAI.

The BraTS finetune bundles send their sigmoid probabilities back to the input grid with ``Invertd`` over the whole
preprocessing, which includes ``NormalizeIntensityd(nonzero=True, channel_wise=True)``. Up to MONAI 1.6 that transform
is not invertible, so ``Invertd`` undoes the geometry only. The next MONAI (``monai-weekly`` 1.7.dev, Project-MONAI/MONAI
PR #8905 "Make NormalizeIntensity invertible") records the mean and standard deviation on the image and ``Invertd``
then multiplies the *probabilities* by the image's standard deviation and adds its mean: a probability of 0.12 comes
back as up to 560, every voxel passes the 0.5 threshold, and the label map is tumour everywhere, with no error.
"""
from __future__ import annotations

import contextlib
from collections.abc import Hashable, Mapping

from monai.config import KeysCollection
from monai.transforms import MapTransform, NormalizeIntensity

__all__ = ["NonInvertibleNormalizeIntensityd"]


class NonInvertibleNormalizeIntensityd(MapTransform):
    """MONAI's ``NormalizeIntensityd`` that records nothing on the image, so ``Invertd`` never undoes it.

    Same arguments and the same output as ``NormalizeIntensityd`` (``(img - subtrahend) / divisor``, channel-first
    ``(C, H, W, D)`` in and out, by default mean and standard deviation computed per image). It is not an
    ``InvertibleTransform`` and the wrapped ``NormalizeIntensity`` runs with tracing off, so the image's
    ``applied_operations`` hold the spatial transforms only, as on MONAI <= 1.6.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False, **normalize_kwargs) -> None:
        super().__init__(keys, allow_missing_keys)
        self.normalizer = NormalizeIntensity(**normalize_kwargs)

    def _untraced(self):
        # MONAI <= 1.6: NormalizeIntensity is no TraceableTransform and records nothing anyway
        trace = getattr(self.normalizer, "trace_transform", None)
        return trace(False) if trace is not None else contextlib.nullcontext()

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        with self._untraced():
            for key in self.key_iterator(d):
                d[key] = self.normalizer(d[key])
        return d
