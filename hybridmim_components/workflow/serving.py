"""What the finetune bundles' ``inference.json`` needs to be served by MONAI Label unmodified, on MONAI 1.5 and 1.6.

MONAI Label's ``BasicInferTask`` puts the request's image path into the data dictionary as ``image_path`` (a ``str``)
beside ``image``. Since MONAI 1.6, ``Spacingd`` copies the resampled image's metadata into every entry whose key starts
with ``"<key>_"`` (meant for the legacy ``image_meta_dict``): ``d["image_path"].update(...)`` then fails with
``AttributeError: 'str' object has no attribute 'update'`` and no label map comes back. MONAI 1.5.x's ``Spacingd`` does
not touch other keys.
"""
from __future__ import annotations

from collections.abc import Hashable, Mapping

from monai.transforms import Spacingd

__all__ = ["PathSafeSpacingd"]


class PathSafeSpacingd(Spacingd):
    """``Spacingd`` that leaves entries ``<key>_<anything>`` which are not dictionaries (``image_path``) as they were.

    Those entries are set aside for the call and put back unchanged; dictionary entries (``image_meta_dict``) get what
    MONAI's ``Spacingd`` gives them. Inversion (``Invertd``) is ``Spacingd``'s own. Input and output as ``Spacingd``:
    channel-first ``(C, H, W, D)`` images resampled to ``pixdim``.
    """

    def _set_aside(self, d: dict) -> dict:
        prefixes = tuple(f"{key}_" for key in self.keys)
        return {
            k: d.pop(k)
            for k in [k for k in d if isinstance(k, str) and k.startswith(prefixes) and not isinstance(d[k], Mapping)]
        }

    def __call__(self, data: Mapping[Hashable, object], lazy: bool | None = None) -> dict:
        d = dict(data)
        aside = self._set_aside(d)
        out = super().__call__(d, lazy=lazy)
        out.update(aside)
        return out
