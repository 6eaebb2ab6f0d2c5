"""Whether two paths hold the same image: the same file, a byte-identical copy under another name, or (for images
nibabel reads) the same scan saved another way (``.nii`` and ``.nii.gz``): equal shape, affine and voxels.

Used wherever a held-out image must be kept out of training data given as separate lists (the pool builder's
``--exclude``, the patient study's folds): comparing paths alone misses a copy, so files of equal size are compared
by SHA-256 (computed once per file version), and other files by their decoded image (shape first, then affine,
then voxels).
"""
from __future__ import annotations

import hashlib
import os
from functools import lru_cache

import numpy as np


def sha256_of(path: str) -> str:
    """SHA-256 (hex) of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@lru_cache(maxsize=None)
def _cached_sha256(real_path: str, size: int, mtime_ns: int) -> str:  # size and mtime key the file's version
    return sha256_of(real_path)


def content_hash(path: str) -> str:
    """SHA-256 of a file's bytes, computed once per file version (path, size, modification time)."""
    real = os.path.realpath(path)
    stat = os.stat(real)
    return _cached_sha256(real, stat.st_size, stat.st_mtime_ns)


def same_file(a: str, b: str) -> bool:
    """``a`` and ``b`` are one file (after resolving links) or have equal size and equal SHA-256."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    return content_hash(a) == content_hash(b)


@lru_cache(maxsize=None)
def _cached_geometry(real_path: str, size: int, mtime_ns: int):
    import nibabel as nib

    try:
        img = nib.load(real_path)
    except Exception:  # not an image format nibabel knows: only its bytes can be compared
        return None
    return tuple(img.shape), tuple(map(tuple, np.asarray(img.affine, dtype=np.float64)))


def _geometry(path: str):
    """``(shape, affine)`` of an image nibabel reads (header only, once per file version), else ``None``."""
    real = os.path.realpath(path)
    stat = os.stat(real)
    return _cached_geometry(real, stat.st_size, stat.st_mtime_ns)


def same_image(a: str, b: str) -> bool:
    """:func:`same_file`, or both are images nibabel reads with equal shape, affine (to 1e-5) and voxels."""
    if same_file(a, b):
        return True
    geo_a, geo_b = _geometry(a), _geometry(b)
    if geo_a is None or geo_b is None or geo_a[0] != geo_b[0]:
        return False
    if not np.allclose(geo_a[1], geo_b[1], rtol=0.0, atol=1e-5):
        return False
    import nibabel as nib

    return bool(np.array_equal(np.asanyarray(nib.load(a).dataobj), np.asanyarray(nib.load(b).dataobj)))
