"""``PathSafeSpacingd``: the inference bundles' Spacingd, which MONAI Label's ``image_path`` string does not break.

In process, no MONAI Label needed (the real server is ``tests/test_monailabel_server.py``).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Spacingd

import monai
from hybridmim_components.workflow import PathSafeSpacingd

PIXDIM = (1.5, 1.5, 2.0)
# the Spacingd of MONAI 1.6.x only: 1.5 leaves other keys alone, the next MONAI (1.7.dev) updates dictionary entries
# only (spatial/dictionary.py: `isinstance(d[k], MutableMapping)`); PathSafeSpacingd is then harmless
MONAI_16 = tuple(int(x) for x in monai.__version__.split(".")[:2]) == (1, 6)


def _served_sample() -> dict:
    """What MONAI Label's BasicInferTask holds after loading: the image (1, 10, 12, 8) at 1.2 x 1.0 x 2.5 mm, its
    path as a string beside it, and the legacy meta dictionary."""
    affine = torch.diag(torch.tensor([1.2, 1.0, 2.5, 1.0], dtype=torch.float64))
    image = MetaTensor(torch.rand(1, 10, 12, 8), affine=affine, meta={"filename_or_obj": "/studies/ct.nii.gz"})
    return {"image": image, "image_path": "/studies/ct.nii.gz", "image_meta_dict": {"filename_or_obj": "ct.nii.gz"}}


@pytest.mark.skipif(not MONAI_16, reason="the Spacingd of MONAI 1.5 and of the next MONAI leaves strings alone")
def test_monai_16_spacingd_fails_on_a_string_image_entry():
    """The cause (MONAI 1.6.x): Spacingd updates every ``image_*`` entry with the new metadata."""
    with pytest.raises(AttributeError, match="'str' object has no attribute 'update'"):
        Spacingd(keys="image", pixdim=PIXDIM)(_served_sample())


def test_path_safe_spacingd_keeps_the_path_and_resamples_like_spacingd():
    sample = _served_sample()
    spacing = PathSafeSpacingd(keys="image", pixdim=PIXDIM)
    out = spacing(sample)
    assert out["image_path"] == "/studies/ct.nii.gz"
    # by hand: 10 * 1.2 / 1.5 = 8, 12 * 1.0 / 1.5 = 8, 8 * 2.5 / 2.0 = 10
    assert tuple(out["image"].shape) == (1, 8, 8, 10)
    np.testing.assert_allclose(np.diag(out["image"].affine.numpy())[:3], PIXDIM)
    reference = Spacingd(keys="image", pixdim=PIXDIM)({"image": sample["image"].clone()})
    torch.testing.assert_close(out["image"].as_tensor(), reference["image"].as_tensor())
    # the dictionary entry gets what MONAI's Spacingd gives it (updated on MONAI 1.6, untouched on 1.5)
    assert isinstance(out["image_meta_dict"], dict)
    # inversion is Spacingd's own (by the same instance, as Invertd does): back to the input grid
    back = spacing.inverse(out)
    assert tuple(back["image"].shape) == (1, 10, 12, 8)
    np.testing.assert_allclose(back["image"].affine.numpy(), sample["image"].affine.numpy(), atol=1e-6)
