"""Bad input stops a bundle before training, with one message naming the culprit.

The bundles call these functions first in ``initialize``, before any data is loaded or cached: a wrong file found
after hours of caching or at step 30,000 costs far more than one read of every file.

- :func:`check_datalist`: the datalist (via :func:`hybridmim_components.workflow.data.load_datalist`: valid JSON, non-empty
  sections, entries with the required keys, every file present) and then every referenced file, read once in full
  (a truncated ``.nii.gz`` only fails when its voxels are decompressed): readable, 3D, the number of image channels
  the network takes, finite voxels, labels among the bundle's classes and on the image's grid (same shape, and
  voxel centres within :data:`GRID_TOLERANCE_MM` of the image's, by the two affines). It reports *every*
  culprit found, at most :data:`MAX_NAMED_PROBLEMS` named, in one :class:`DataCheckError`. Images smaller than the
  crop are accepted (the bundles pad them).
- :func:`check_contrastive_batch`: warns when the dropout-contrastive term cannot learn anything (one crop per step
  over all processes: a positive and no negatives give a loss of exactly 0).

The crop settings of the pretraining bundles are checked by ``network_def.check_crop`` (networks.py) and those of the
finetuning bundles by ``workflow.finetune.check_roi_size``; both also run in ``initialize`` before any data.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from hybridmim_components.workflow.flags import config_flag
from hybridmim_components.workflow.data import load_datalist, resolve_datalist_path
from hybridmim_components.utils.distributed import rank_and_world_size

__all__ = ["DataCheckError", "check_datalist", "check_volume_files", "check_contrastive_batch", "MAX_NAMED_PROBLEMS",
           "GRID_TOLERANCE_MM"]

logger = logging.getLogger(__name__)

#: How many culprits the error message names before it summarises the rest.
MAX_NAMED_PROBLEMS = 20
#: How far (mm) a label's voxel centres may lie from its image's (float noise of the writers; a voxel is ~1 mm).
GRID_TOLERANCE_MM = 1e-3
_NIBABEL_SUFFIXES = (".nii", ".nii.gz", ".img", ".hdr", ".img.gz", ".mgh", ".mgz")


class DataCheckError(ValueError):
    """One or more datalist entries point at files the bundle cannot train on; the message names them all."""


def check_datalist(
    dataset_dir: str | None,
    data_list_file_path: str,
    sections: Sequence[str] = ("training", "validation"),
    image_channels: int = 1,
    label_values: Iterable[int] | None = None,
    required_keys: Sequence[str] = ("image",),
    label_fraction: float = 1.0,
    seed: int = 0,
    enabled: bool = True,
    num_threads: int = 4,
) -> dict[str, int]:
    """Check a datalist and read every file it references once; raise one error naming every culprit.

    Args:
        dataset_dir, data_list_file_path: as the bundles pass them to ``load_datalist``.
        sections: datalist keys to check (``"training"``, ``"validation"``, ...).
        image_channels: channels the network takes: a 3D file is 1 channel, a 4D file (channels last) has
            ``shape[3]``; a list of files (BraTS modalities) is stacked, so its channels add up.
        label_values: the allowed label values (finetuning: ``range(C)``; BraTS: ``(0, 1, 2, 4)``). ``None``: labels
            are not read (pretraining does not use them).
        required_keys: keys every entry must have (``("image", "label")`` for finetuning).
        label_fraction, seed: only the share of ``"training"`` the bundle trains on is checked (as ``load_datalist``).
        enabled: ``False`` skips the file scan (config key ``check_data``) but still checks the datalist itself.
        num_threads: files read in parallel (decompression and numpy release the GIL).

    Under ``torch.distributed`` each process reads a share of the files and the culprits are gathered, so every
    process raises the same error.

    Returns:
        ``{"entries": ..., "files": ...}`` checked (``files`` 0 when ``enabled`` is false).

    Raises:
        FileNotFoundError, ValueError: from ``load_datalist`` (missing file, invalid JSON, empty section, ...).
        DataCheckError: files that cannot be trained on, every one named (up to :data:`MAX_NAMED_PROBLEMS`).
    """
    enabled = config_flag(enabled, "check_data")
    read_keys = ("image", "label") if label_values is not None else ("image",)
    entries = []  # (section, index in the section as the datalist numbers it, entry)
    for section in sections:
        fraction = label_fraction if section == "training" else 1.0
        items = load_datalist(dataset_dir, data_list_file_path, section, label_fraction=fraction,
                              required_keys=required_keys, seed=seed)
        entries.extend((section, i, item) for i, item in enumerate(items))
    if not enabled:
        logger.info("check_data is false: the %d datalist entries were not read before training.", len(entries))
        return {"entries": len(entries), "files": 0}

    allowed = None if label_values is None else sorted({int(v) for v in label_values})
    rank, world = rank_and_world_size()
    mine = entries[rank::world]  # each process reads its share; the culprits are gathered below
    with ThreadPoolExecutor(max(1, int(num_threads))) as pool:
        results = list(pool.map(lambda e: _check_entry(*e, read_keys, int(image_channels), allowed), mine))
    problems = [p for found, _ in results for p in found]
    files = sum(n for _, n in results)
    if world > 1:
        import torch.distributed as dist

        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, (problems, files))
        problems = [p for found, _ in gathered for p in found]
        files = sum(n for _, n in gathered)

    if problems:
        datalist = resolve_datalist_path(dataset_dir, data_list_file_path)
        named = "\n".join(f"  - {p}" for p in problems[:MAX_NAMED_PROBLEMS])
        more = f"\n  ... and {len(problems) - MAX_NAMED_PROBLEMS} more" if len(problems) > MAX_NAMED_PROBLEMS else ""
        raise DataCheckError(
            f"datalist '{datalist}': {len(problems)} problem(s) found reading the {files} file(s) of "
            f"{list(sections)} before training:\n{named}{more}\nFix or remove these entries (check_data false skips this scan)."
        )
    logger.info("check_data: %d entries (%d files) of %s read; all usable.", len(entries), files, list(sections))
    return {"entries": len(entries), "files": files}


def check_volume_files(
    paths: str | Sequence[str], image_channels: int | None = None, allow_nonfinite: bool = False
) -> tuple[list[str], tuple[str, tuple[int, ...], np.ndarray] | None]:
    """Read one image (one file, or a list of files stacked as channels) in full.

    Returns:
        ``(problems, grid)``: what is wrong (empty when nothing), and ``(first file, spatial shape, 4x4 affine)``
        (``None`` when a file could not be read).
    """
    files = [paths] if isinstance(paths, str) else list(paths)
    problems: list[str] = []
    shapes, channels, first_affine = [], 0, None
    for path in files:
        try:
            data, affine = _read_voxels(path)
        except Exception as e:  # nibabel/gzip/zlib/ITK raise many types for truncated or corrupt files
            problems.append(f"'{path}': cannot read the voxel data (truncated or corrupt file?): "
                            f"{type(e).__name__}: {e}")
            continue
        if data.ndim not in (3, 4):
            problems.append(f"'{path}': {data.ndim}D data of shape {data.shape}; expected a 3D volume "
                            "(or 4D with the channels last)")
            continue
        shapes.append((path, tuple(data.shape[:3])))
        if first_affine is None:
            first_affine = affine
        channels += 1 if data.ndim == 3 else data.shape[3]
        if not allow_nonfinite and np.issubdtype(data.dtype, np.floating):
            bad = int(data.size - np.count_nonzero(np.isfinite(data)))
            if bad:
                problems.append(f"'{path}': {bad} NaN/inf voxel(s); expected finite intensities")
    if len({s for _, s in shapes}) > 1:
        problems.append("files of different shapes stacked as channels: "
                        + ", ".join(f"'{p}' {s}" for p, s in shapes))
    if problems:
        return problems, None
    if image_channels is not None and channels != image_channels:
        problems.append(f"{_short(paths)}: {channels} channel(s) from {len(files)} file(s); this bundle's network "
                        f"takes {image_channels} "
                        f"({'a list of the 4 modality files t1, t1ce, t2, flair' if image_channels == 4 else 'one 3D volume'})")
    return problems, (shapes[0][0], shapes[0][1], first_affine)


def check_contrastive_batch(contrastive_weight: float, batch_size: int, samples_per_volume: int) -> bool:
    """Warn (once, when a bundle starts) if the dropout-contrastive term is exactly 0 by construction.

    The term (NT-Xent over the global batch) needs negatives: with one crop per step over all processes
    (``batch_size × samples_per_volume × world_size == 1``) the only candidate is the positive, so the loss is
    ``-log(1) = 0`` and trains nothing. Returns whether it warned.
    """
    _, world = rank_and_world_size()
    crops = int(batch_size) * int(samples_per_volume) * world
    if float(contrastive_weight) > 0 and crops <= 1:
        logger.warning(
            "contrastive_weight=%s but each step has %d crop in total (batch_size %s x samples_per_volume %s x %d "
            "process): the dropout-contrastive term has one positive and no negatives, so it is exactly 0 and trains "
            "nothing. Use batch_size x samples_per_volume >= 2 (the bundle default is 2 x 2), or set "
            "loss#contrastive_weight 0.", contrastive_weight, crops, batch_size, samples_per_volume, world,
        )
        return True
    return False


# --- helpers ----------------------------------------------------------------------------------------------------
def _check_entry(section: str, index: int, item: dict, read_keys: Sequence[str], image_channels: int,
                 allowed: list[int] | None) -> tuple[list[str], int]:
    """Problems of one datalist entry (each prefixed with where it is) and how many files were read."""
    where = f"'{section}' entry {index}"
    problems, files = [], 0
    image_problems, image_grid = check_volume_files(item["image"], image_channels)
    files += 1 if isinstance(item["image"], str) else len(item["image"])
    problems += [f"{where} 'image' {p}" for p in image_problems]
    if "label" in read_keys and "label" in item:
        files += 1
        problems += [f"{where} 'label' {p}" for p in _check_label(item["label"], image_grid, allowed)]
    return problems, files


def _check_label(path: Any, image_grid: tuple[str, tuple[int, ...], np.ndarray] | None,
                 allowed: list[int] | None) -> list[str]:
    if not isinstance(path, str):
        return [f"{_short(path)}: a label must be one file, got a list of {len(path)}"]
    try:
        data, affine = _read_voxels(path)
    except Exception as e:
        return [f"'{path}': cannot read the voxel data (truncated or corrupt file?): {type(e).__name__}: {e}"]
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        return [f"'{path}': label of shape {data.shape}; expected one 3D label map"]
    problems = []
    if image_grid is not None:
        image, image_shape, image_affine = image_grid
        if tuple(data.shape) != tuple(image_shape):
            problems.append(f"'{path}': label shape {tuple(data.shape)} differs from its image's {tuple(image_shape)}; "
                            "expected a label on the image's voxel grid")
        else:
            apart = _grid_distance(image_affine, affine, image_shape)
            if apart > GRID_TOLERANCE_MM:
                problems.append(
                    f"'{path}': label affine {_rows(affine)} differs from the affine {_rows(image_affine)} of its "
                    f"image '{image}' (voxel centres up to {apart:.3g} mm apart); expected the image's voxel grid "
                    f"within {GRID_TOLERANCE_MM:g} mm")
    if allowed is not None:
        outside = ~np.isin(data, allowed)  # also catches NaN and non-integer values
        if outside.any():
            values = np.unique(data[outside])
            shown = ", ".join(f"{v:g}" for v in values[:10]) + (", ..." if len(values) > 10 else "")
            problems.append(f"'{path}': label values [{shown}] ({int(outside.sum())} voxels) are not among this "
                            f"bundle's classes {allowed}")
    return problems


def _read_voxels(path: str) -> tuple[np.ndarray, np.ndarray]:
    """All voxels of a file (spatial axes first, channels last) and its 4x4 RAS affine; raises when unreadable."""
    if os.path.isfile(path) and path.lower().endswith(_NIBABEL_SUFFIXES):
        import nibabel as nib

        image = nib.load(path)
        # dataobj applies the intensity scaling; np.asarray decompresses every byte (truncation fails here)
        return np.asarray(image.dataobj), np.asarray(image.affine, dtype=np.float64)
    from monai.transforms import LoadImage

    image = LoadImage(image_only=True)(path)  # other formats / DICOM folders: what the bundle uses (RAS affine)
    return np.asarray(image), np.asarray(image.affine, dtype=np.float64)


def _grid_distance(a: np.ndarray, b: np.ndarray, shape: Sequence[int]) -> float:
    """Largest distance (mm) between the positions the two affines give the corner voxels of ``shape``."""
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape[:3]], [1], indexing="ij")).reshape(4, -1)
    return float(np.linalg.norm((a @ corners - b @ corners)[:3], axis=0).max())


def _rows(affine: np.ndarray) -> str:
    """The top 3 rows of an affine, rounded to 0.0001 mm: ``[[r00, r01, r02, t0], ...]``."""
    return str([[round(float(v), 4) + 0.0 for v in row] for row in np.asarray(affine)[:3]])


def _short(paths: Any) -> str:
    if isinstance(paths, str):
        return f"'{paths}'"
    return "[" + ", ".join(f"'{p}'" for p in paths) + "]"
