"""Tiny synthetic NIfTI datasets for the tests and the demos of the HybridMIM bundles.

The volumes are not real anatomy, but they look like it to the pipelines: CT in Hounsfield units (air -1000, a body
of soft tissue with a thin fat layer and a spine, organs as irregular blobs of distinct density), BraTS-like MRI with
four co-registered modalities (t1, t1ce, t2, flair) of a brain with a tumour labelled 0/1/2/4 as in BraTS, and an
unlabeled CT pool for pretraining. Each generator writes an MSD-form ``dataset.json`` (paths relative to ``out_dir``,
``training`` / ``validation`` / ``testing`` lists) and returns its path. Generation takes well under a second per
volume, and the same ``seed`` gives the same files.

Command line (python-fire)::

    python tools/data/make_demo_data.py ct    --out_dir demo_data/ct --num_classes 14
    python tools/data/make_demo_data.py brats --out_dir demo_data/brats
    python tools/data/make_demo_data.py pool  --out_dir demo_data/pool
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Sequence, Tuple

import numpy as np
from hybridmim_components.utils.atomic_files import atomic_open, atomic_path

__all__ = ["make_ct_dataset", "make_brats_dataset", "make_unlabeled_ct_pool", "BRATS_MODALITIES"]

BRATS_MODALITIES = ("t1", "t1ce", "t2", "flair")

AIR_HU = -1000
SOFT_TISSUE_HU = 40  # body background (muscle / soft tissue)
FAT_HU = -90
BONE_HU = 700

# Relative MRI intensities per tissue and modality (t1, t1ce, t2, flair); tumour tissues by BraTS label.
_MRI_TISSUE = {
    "csf": (200, 200, 900, 150),
    "gm": (450, 470, 550, 500),
    "wm": (600, 620, 400, 420),
    2: (380, 400, 800, 850),  # peritumoral edema
    1: (250, 230, 850, 300),  # necrotic / non-enhancing core
    4: (420, 900, 600, 650),  # enhancing tumour
}


def organ_hu(label: int) -> int:
    """Mean HU of the synthetic organ with label ``label`` (distinct for every label, well above soft tissue)."""
    return 70 + 30 * int(label)


# ----------------------------------------------------------------------------------------------------------------
# geometry helpers


def _as_triple(value, name: str, kind=int) -> Tuple:
    if isinstance(value, (int, float)):
        value = (value,) * 3
    value = tuple(kind(v) for v in value)
    if len(value) != 3 or any(v <= 0 for v in value):
        raise ValueError(f"{name} must be 3 positive numbers, got {value!r}.")
    return value


def _grid(shape: Sequence[int]):
    """Open index grids (x, y, z) as float32, broadcastable to ``shape``."""
    return [a.astype(np.float32) for a in np.ogrid[: shape[0], : shape[1], : shape[2]]]


def _wobble(grid, shape, rng: np.random.Generator, amplitude: float):
    """A smooth, low-frequency perturbation (sum of three sines) that makes ellipsoids look organic."""
    w = np.zeros((1, 1, 1), np.float32)
    for axis in range(3):
        freq = rng.uniform(1.0, 2.5)
        phase = rng.uniform(0, 2 * np.pi)
        w = w + np.sin(2 * np.pi * freq * grid[axis] / max(shape[axis], 1) + phase).astype(np.float32)
    return amplitude * w / 3.0


def _ellipsoid_distance(grid, centre, radii):
    """Normalised squared distance ``sum(((x - c) / r) ** 2)``: <= 1 inside the ellipsoid."""
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii))


def _affine(spacing: Sequence[float], shape: Sequence[int]) -> np.ndarray:
    """RAS affine with the given spacing and the volume centred on the world origin."""
    affine = np.diag([*map(float, spacing), 1.0])
    affine[:3, 3] = [-(n - 1) / 2.0 * s for n, s in zip(shape, spacing)]
    return affine


def _save(array: np.ndarray, affine: np.ndarray, path: str, dtype) -> None:
    import nibabel as nib

    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = nib.Nifti1Image(array.astype(dtype), affine)
    img.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm", "sec")
    with atomic_path(path) as tmp:  # keeps the extensions: nibabel picks the format by them
        nib.save(img, tmp)


def _write_datalist(out_dir: str, content: Dict) -> str:
    path = os.path.join(out_dir, "dataset.json")
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2)
    return os.path.abspath(path)


def _check_counts(**counts: int) -> None:
    for name, n in counts.items():
        if int(n) != n or n < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {n!r}.")
    if counts.get("n_train", 1) < 1:
        raise ValueError("n_train must be at least 1.")


# ----------------------------------------------------------------------------------------------------------------
# CT


def _place_organs(rng, shape, body_centre, body_axes, spine, n_organs) -> List[Tuple[Tuple[int, ...], Tuple[float, ...]]]:
    """Non-overlapping organ centres and radii (voxels), each organ fully inside the body and away from the spine."""
    if n_organs == 0:
        return []
    scale = 0.09 * min(1.0, (3.0 / n_organs) ** (1.0 / 3.0))
    for _attempt in range(12):
        organs = []
        for _ in range(n_organs):
            radii = tuple(max(1.0, scale * n * rng.uniform(0.8, 1.25)) for n in shape)
            for _try in range(400):
                centre = tuple(int(round(c + rng.uniform(-1, 1) * a)) for c, a in zip(body_centre, body_axes))
                inner = [a - r - 1.5 for a, r in zip(body_axes, radii)]
                if min(inner) <= 0 or sum(((c - b) / a) ** 2 for c, b, a in zip(centre, body_centre, inner)) > 1:
                    continue
                if np.hypot(centre[0] - spine[0], centre[1] - spine[1]) <= spine[2] + max(radii[:2]) + 1:
                    continue
                if any(
                    np.linalg.norm(np.subtract(centre, c2)) <= max(radii) + max(r2) + 1 for c2, r2 in organs
                ):
                    continue
                organs.append((centre, radii))
                break
            else:
                break
        if len(organs) == n_organs:
            return organs
        scale *= 0.85
    raise ValueError(f"cannot fit {n_organs} organs into a volume of shape {tuple(shape)}; use a larger shape.")


def _ct_case(shape, num_classes: int, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """One CT volume (int16 HU) and its label map (uint8, 0..num_classes-1)."""
    grid = _grid(shape)
    centre = tuple((n - 1) / 2.0 for n in shape)
    axes = tuple(f * n * rng.uniform(0.95, 1.0) for f, n in zip((0.43, 0.36, 0.45), shape))
    body_d = _ellipsoid_distance(grid, centre, axes)
    body_limit = 1.0 + _wobble(grid, shape, rng, 0.06)  # within 1 +- 0.06: stays inside the volume
    body = body_d <= body_limit
    fat = body & (body_d > 0.78 * body_limit)

    image = np.full(shape, AIR_HU, np.float32)
    label = np.zeros(shape, np.uint8)
    image[body] = SOFT_TISSUE_HU
    image[fat] = FAT_HU

    # spine: a cylinder along z at the posterior (+y) side of the body
    spine = (centre[0], centre[1] + 0.62 * axes[1], max(1.0, 0.13 * min(axes[0], axes[1])))
    spine_mask = body & (((grid[0] - spine[0]) ** 2 + (grid[1] - spine[1]) ** 2) <= spine[2] ** 2)
    image[spine_mask] = BONE_HU

    body_inner_axes = tuple(0.78 ** 0.5 * 0.94 ** 0.5 * a for a in axes)  # inside the fat layer
    for lab, (c, r) in enumerate(_place_organs(rng, shape, centre, body_inner_axes, spine, num_classes - 1), 1):
        lo = [max(0, int(np.floor(ci - ri - 1))) for ci, ri in zip(c, r)]
        hi = [min(n, int(np.ceil(ci + ri + 2))) for ci, ri, n in zip(c, r, shape)]
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        local = [g[tuple(slice(a, b) if i == ax else slice(None) for i in range(3))] for ax, (g, a, b) in
                 enumerate(zip(grid, lo, hi))]
        d = _ellipsoid_distance(local, c, r)
        organ = d <= 1.0 + _wobble(local, [b - a for a, b in zip(lo, hi)], rng, 0.25) * (d > 0.3)
        image[box][organ] = organ_hu(lab)
        label[box][organ] = lab

    noise = rng.normal(0.0, 8.0, size=shape).astype(np.float32)
    image[body] += noise[body]
    return np.round(image).astype(np.int16), label


def make_ct_dataset(
    out_dir: str,
    num_classes: int = 2,
    shape: Sequence[int] = (48, 48, 40),
    spacing: Sequence[float] = (1.5, 1.5, 2.0),
    n_train: int = 2,
    n_val: int = 1,
    n_test: int = 1,
    seed: int = 0,
    with_labels: bool = True,
) -> str:
    """Write a small synthetic CT segmentation dataset and return the path of its ``dataset.json``.

    Layout: ``imagesTr/ct_XXX.nii.gz`` and ``labelsTr/ct_XXX.nii.gz`` for the training and validation cases,
    ``imagesTs/ct_XXX.nii.gz`` for the testing cases (image only). Images are int16 HU: air -1000, soft tissue
    about 40 HU (noise std 8), a fat layer (-90), a spine (700) and ``num_classes - 1`` organ blobs, organ ``l`` at
    :func:`organ_hu` ``(l)`` HU with label ``l``, each fully inside the body. Labels are uint8 in ``0..num_classes-1``
    and every case holds every label. The affine is RAS with the given ``spacing`` (mm).
    """
    shape = _as_triple(shape, "shape")
    spacing = _as_triple(spacing, "spacing", float)
    num_classes = int(num_classes)
    if not 2 <= num_classes <= 255:
        raise ValueError(f"num_classes must be in 2..255 (background + organs), got {num_classes}.")
    _check_counts(n_train=n_train, n_val=n_val, n_test=n_test)
    affine = _affine(spacing, shape)
    lists: Dict[str, List] = {"training": [], "validation": [], "testing": []}
    splits = ["training"] * n_train + ["validation"] * n_val + ["testing"] * n_test
    for idx, split in enumerate(splits):
        image, label = _ct_case(shape, num_classes, np.random.default_rng([seed, idx]))
        name = f"ct_{idx:03d}.nii.gz"
        image_rel = os.path.join("imagesTs" if split == "testing" else "imagesTr", name)
        _save(image, affine, os.path.join(out_dir, image_rel), np.int16)
        entry = {"image": image_rel}
        if with_labels and split != "testing":
            entry["label"] = os.path.join("labelsTr", name)
            _save(label, affine, os.path.join(out_dir, entry["label"]), np.uint8)
        lists[split].append(entry)
    labels = {"0": "background", **{str(i): f"organ_{i}" for i in range(1, num_classes)}}
    return _write_datalist(out_dir, {
        "name": "HybridMIM synthetic CT demo",
        "description": "Synthetic CT-like volumes (HU) with blob organs, generated by tools/data/make_demo_data.py",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": labels if with_labels else {},
        "numTraining": n_train + n_val,
        "numTest": n_test,
        **lists,
    })


def make_unlabeled_ct_pool(
    out_dir: str,
    n_train: int = 3,
    n_val: int = 1,
    shape: Sequence[int] = (64, 64, 64),
    seed: int = 0,
    n_test: int = 1,
    spacing: Sequence[float] = (1.5, 1.5, 2.0),
) -> str:
    """Write an unlabeled synthetic CT pool for pretraining and return the path of its ``dataset.json``.

    Cases with an odd index are shorter along the last axis (``max(16, shape[2] * 5 // 8)`` slices, 40 for the
    default 64), so that padding to the crop size is exercised. All entries are ``{"image": ...}`` only.
    """
    shape = _as_triple(shape, "shape")
    spacing = _as_triple(spacing, "spacing", float)
    _check_counts(n_train=n_train, n_val=n_val, n_test=n_test)
    short = (shape[0], shape[1], max(16, shape[2] * 5 // 8))
    lists: Dict[str, List] = {"training": [], "validation": [], "testing": []}
    splits = ["training"] * n_train + ["validation"] * n_val + ["testing"] * n_test
    for idx, split in enumerate(splits):
        case_shape = short if idx % 2 else shape
        image, _ = _ct_case(case_shape, 5, np.random.default_rng([seed, idx]))
        rel = os.path.join("imagesTs" if split == "testing" else "imagesTr", f"pool_{idx:03d}.nii.gz")
        _save(image, _affine(spacing, case_shape), os.path.join(out_dir, rel), np.int16)
        lists[split].append({"image": rel})
    return _write_datalist(out_dir, {
        "name": "HybridMIM synthetic unlabeled CT pool",
        "description": "Synthetic CT-like volumes (HU) without labels, generated by tools/data/make_demo_data.py",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "numTraining": n_train + n_val,
        "numTest": n_test,
        **lists,
    })


# ----------------------------------------------------------------------------------------------------------------
# BraTS


def _brats_case(shape, rng: np.random.Generator) -> Tuple[List[np.ndarray], np.ndarray]:
    """Four modality volumes (float32, 0 outside the brain) and the BraTS label map (uint8, values 0, 1, 2, 4)."""
    grid = _grid(shape)
    centre = tuple((n - 1) / 2.0 for n in shape)
    axes = tuple(f * n * rng.uniform(0.95, 1.0) for f, n in zip((0.40, 0.45, 0.38), shape))
    brain_d = _ellipsoid_distance(grid, centre, axes)
    brain = brain_d <= 1.0 + _wobble(grid, shape, rng, 0.05)
    tissue = np.where(brain_d < 0.55, 2, 1).astype(np.uint8)  # 1 grey matter (cortex), 2 white matter
    ventricles = sum(
        _ellipsoid_distance(grid, (centre[0] + s * 0.12 * axes[0], centre[1], centre[2]),
                            (0.07 * axes[0], 0.3 * axes[1], 0.15 * axes[2])) <= 1 for s in (-1, 1))
    tissue[ventricles.astype(bool)] = 0  # 0 CSF

    # tumour in one hemisphere: edema (2) outside, enhancing ring (4), necrotic core (1); nested ellipsoids
    r_edema = 0.22 * min(shape) * rng.uniform(0.9, 1.1)
    side = rng.choice([-1, 1])
    t_centre = (centre[0] + side * 0.42 * axes[0], centre[1] + rng.uniform(-0.2, 0.2) * axes[1],
                centre[2] + rng.uniform(-0.2, 0.2) * axes[2])
    stretch = rng.uniform(0.85, 1.15, size=3)
    t_d = _ellipsoid_distance(grid, t_centre, tuple(r_edema * s for s in stretch))
    label = np.zeros(shape, np.uint8)
    label[t_d <= (1.0 + _wobble(grid, shape, rng, 0.2)) ** 2] = 2
    label[t_d <= 0.55 ** 2] = 4
    label[t_d <= 0.28 ** 2] = 1
    label[~brain] = 0

    bias = 1.0 + _wobble(grid, shape, rng, 0.08)
    images = []
    for m in range(len(BRATS_MODALITIES)):
        vol = np.zeros(shape, np.float32)
        for t, name in enumerate(("csf", "gm", "wm")):
            vol[tissue == t] = _MRI_TISSUE[name][m]
        for lab in (2, 4, 1):
            vol[label == lab] = _MRI_TISSUE[lab][m]
        vol = vol * bias + rng.normal(0.0, 15.0, size=shape).astype(np.float32)
        vol = np.clip(vol, 1.0, None)
        vol[~brain] = 0.0
        images.append(vol.astype(np.float32))
    return images, label


def make_brats_dataset(
    out_dir: str,
    shape: Sequence[int] = (48, 48, 48),
    n_train: int = 2,
    n_val: int = 1,
    n_test: int = 1,
    seed: int = 0,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> str:
    """Write a small synthetic BraTS-like dataset and return the path of its ``dataset.json``.

    Layout as in BraTS: ``<case>/<case>_{t1,t1ce,t2,flair}.nii.gz`` (float32, 0 outside the brain) and
    ``<case>/<case>_seg.nii.gz`` (uint8, BraTS labels 0 background, 2 edema, 4 enhancing tumour, 1 necrotic core,
    nested in that order from outside in; every labelled case holds all four values). Testing cases have no seg file.
    Datalist entries: ``{"image": [t1, t1ce, t2, flair], "label": seg}``.
    """
    shape = _as_triple(shape, "shape")
    spacing = _as_triple(spacing, "spacing", float)
    _check_counts(n_train=n_train, n_val=n_val, n_test=n_test)
    affine = _affine(spacing, shape)
    lists: Dict[str, List] = {"training": [], "validation": [], "testing": []}
    splits = ["training"] * n_train + ["validation"] * n_val + ["testing"] * n_test
    for idx, split in enumerate(splits):
        images, label = _brats_case(shape, np.random.default_rng([seed, idx]))
        case = f"BraTS20_Demo_{idx:03d}"
        entry = {"image": [os.path.join(case, f"{case}_{m}.nii.gz") for m in BRATS_MODALITIES]}
        for vol, rel in zip(images, entry["image"]):
            _save(vol, affine, os.path.join(out_dir, rel), np.float32)
        if split != "testing":
            entry["label"] = os.path.join(case, f"{case}_seg.nii.gz")
            _save(label, affine, os.path.join(out_dir, entry["label"]), np.uint8)
        lists[split].append(entry)
    return _write_datalist(out_dir, {
        "name": "HybridMIM synthetic BraTS demo",
        "description": "Synthetic 4-modality brain MRI with BraTS tumour labels, generated by tools/data/make_demo_data.py",
        "tensorImageSize": "4D",
        "modality": {str(i): m for i, m in enumerate(BRATS_MODALITIES)},
        "labels": {"0": "background", "1": "necrotic/non-enhancing tumour core", "2": "peritumoral edema",
                   "4": "GD-enhancing tumour"},
        "numTraining": n_train + n_val,
        "numTest": n_test,
        **lists,
    })


if __name__ == "__main__":
    import fire

    fire.Fire({"ct": make_ct_dataset, "brats": make_brats_dataset, "pool": make_unlabeled_ct_pool})
