"""Placing and slicing CT volumes for pictures, shared by the demo (:mod:`tools.demo`) and the experiments
(:mod:`tools.experiments.visualize_reconstruction`, :mod:`tools.experiments.patient_study`)."""
from __future__ import annotations

import numpy as np


def region_offset(masked_affine: np.ndarray, recon_affine: np.ndarray) -> tuple[int, int, int]:
    """Voxel index, in the masked crop, of the reconstruction's first voxel.

    ``masked_affine``, ``recon_affine``: the ``4×4`` voxel-to-world affines of the two NIfTI files a pretraining
    bundle's inference writes (the reconstruction covers the central region of the crop)."""
    index = np.linalg.inv(masked_affine) @ recon_affine[:, 3]
    return tuple(int(round(v)) for v in index[:3])


def axial(volume: np.ndarray, z: int) -> np.ndarray:
    """``X×Y×Z`` (RAS) -> slice ``z`` as ``Y×X`` in radiological view: anterior up, the patient's right on the
    image's left."""
    return np.flipud(volume[:, :, z].T)[:, ::-1]
