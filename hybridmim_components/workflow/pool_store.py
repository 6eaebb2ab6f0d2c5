"""Training crops read from a preprocessed pool store: a pool of thousands of CTs without holding them in memory.

``tools/data/preprocess_pool.py`` applies the deterministic part of a pretraining bundle's own transforms
(``train#deterministic_transforms``: load, RAS, spacing, intensity window, foreground crop, pad, float32) once per
volume and writes the result to a store::

    <store_dir>/manifest.json          what is in the store (format, transforms, one record per volume of the
                                       training list (``volumes``) and of the validation list (``validation``),
                                       failures)
    <store_dir>/volumes/<id>.npy       the preprocessed volume, float32, C x H x W x D, uncompressed (memory-mapped)
    <store_dir>/volumes/<id>.json      its record (source, SHA-256, size, mtime, shape, spacing, affine)

A training step then needs only its crops: :class:`PoolRandCropSamplesd` memory-maps a volume, asks the kernel for
the bytes of its ``num_samples`` random crops all at once (``madvise(MADV_WILLNEED)``: a 96³ crop of a
1 x 274 x 274 x 150 volume is 96 contiguous runs of 96 x 150 voxels, read in parallel instead of one page fault
after the other), copies the crops out and unmaps the volume again, so no process keeps more than the crops it is working on and
its RAM does not grow with the pool. It draws the crop corners exactly as ``RandSpatialCropSamplesd`` does (same
generator calls), and sets the crop's affine the same way, so the bundle's remaining random transforms
(``HierarchicalMaskd``) get what they would get from the in-memory pipeline. :func:`pool_store_entries` lists the
store's volumes (training or validation), each process of a DDP run only its shard; :class:`PoolLoadd` loads a whole
stored volume (validation, center-cropped next).

A run from the store needs nothing else (no NIfTI file, no datalist): :func:`check_pool_store` checks it before
training, :func:`pool_store_identity` is the data part of the run identity (from the manifest's content, not paths).
The bundles use it through ``configs/pool_store.json`` (layered last on ``train.json``, and on
``multi_gpu_train.json`` under DDP).
"""
from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.utils import get_random_patch, get_valid_patch_size
from monai.transforms import MapTransform, Randomizable
from monai.utils import MAX_SEED
from monai.utils import ImageMetaKey

from .data import partition_for_rank
from .flags import config_flag

__all__ = ["STORE_FORMAT", "MANIFEST", "read_manifest", "pool_store_entries", "pool_store_identity",
           "check_pool_store", "PoolRandCropSamplesd", "PoolLoadd"]

logger = logging.getLogger(__name__)

#: ``format`` of a store's manifest; a reader refuses any other.
STORE_FORMAT = "hybridmim-pool-store/1"
MANIFEST = "manifest.json"
#: entry keys (besides the image key, which holds the ``.npy`` path) that :class:`PoolRandCropSamplesd` consumes
AFFINE_KEY, SOURCE_KEY = "pool_affine", "pool_source"


def read_manifest(store_dir: str) -> Dict[str, Any]:
    """The manifest of the store in ``store_dir`` (``manifest.json``), checked for the store format.

    Raises:
        FileNotFoundError: no manifest (not a store, or the preprocessor never finished a pass).
        ValueError: not JSON, or another format.
    """
    path = os.path.join(os.path.expanduser(str(store_dir)), MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"pool store '{store_dir}' has no {MANIFEST}; build it with "
            "`python tools/data/preprocess_pool.py <bundle_dir> <store_dir> --dataset_dir <data>` (pool_store_dir).")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"pool store manifest '{path}' is not valid JSON: {e}.") from e
    if not isinstance(manifest, dict) or manifest.get("format") != STORE_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"pool store manifest '{path}': format {found!r}, expected {STORE_FORMAT!r}.")
    return manifest


#: the manifest key of each list of the store
SECTIONS = {"training": "volumes", "validation": "validation"}


def _records(manifest: Mapping, root: str, section: str) -> List[Dict[str, Any]]:
    """The manifest's records of ``section`` (``"training"`` or ``"validation"``); raises when there are none."""
    if section not in SECTIONS:
        raise ValueError(f"pool store section must be one of {sorted(SECTIONS)}, got {section!r}.")
    if SECTIONS[section] not in manifest:  # a store written before validation volumes were stored
        raise ValueError(
            f"pool store '{root}' holds no {section} volumes (built by an older preprocess_pool.py); rerun "
            "`python tools/data/preprocess_pool.py <bundle_dir> <store_dir> --dataset_dir <data>` where the NIfTI "
            "files are: it keeps the finished training volumes and adds the validation list.")
    records = manifest[SECTIONS[section]] or []
    if not records:
        failed = len(manifest.get("failed") or [])
        raise ValueError(f"pool store '{root}' holds no {section} volumes ({failed} failed to preprocess; see its "
                         f"{MANIFEST}).")
    return records


def pool_store_entries(
    store_dir: str, roi_size: Optional[Sequence[int]] = None, seed: int = 0, shard: bool = True,
    section: str = "training",
) -> List[Dict[str, Any]]:
    """The volumes of a pool store as dataset entries ``{"image": <.npy path>, "pool_affine": 4x4, "pool_source"}``.

    Under ``torch.distributed`` (and ``shard``), only this process's shard (:func:`partition_for_rank`), so that each
    rank reads its own volumes: training with a seeded shuffle and equal lengths, validation in order without
    repeats (as ``multi_gpu_train.json`` splits the validation list).

    Args:
        store_dir: the store folder (holds ``manifest.json``).
        roi_size: the training crop; every volume must be at least this large in every spatial dimension (the
            store was padded to the crop size it was built with).
        seed: seed of the shard shuffle (the bundle's ``seed``: every rank must use the same).
        section: ``"training"`` (the manifest's ``volumes``) or ``"validation"``.

    Raises:
        ValueError: no volumes of ``section``, or a volume smaller than ``roi_size`` (named, with the fix).
        FileNotFoundError: a volume file the manifest lists is missing.
    """
    manifest = read_manifest(store_dir)
    root = os.path.abspath(os.path.expanduser(str(store_dir)))
    records = _records(manifest, root, section)
    entries = []
    for record in records:
        path = os.path.join(root, record["file"])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"pool store '{root}': volume file '{path}' of '{record['source']}' is missing; "
                                    "rerun the preprocessor to redo it.")
        spatial = list(record["shape"][1:])
        if roi_size is not None and any(s < r for s, r in zip(spatial, roi_size)):
            raise ValueError(
                f"pool store '{root}': volume '{record['file']}' (from '{record['source']}') is {spatial} voxels, "
                f"smaller than roi_size {list(roi_size)}; rebuild the store with the same --roi_size override as "
                "training (it pads every volume to at least the crop).")
        entries.append({"image": path, AFFINE_KEY: record["affine"], SOURCE_KEY: record["source"]})
    if shard and section == "training":
        return partition_for_rank(entries, shuffle=True, seed=seed, even_divisible=True, what=f"pool store '{root}'")
    if shard:
        return partition_for_rank(entries, what=f"pool store '{root}' {section} list")
    return entries


def pool_store_identity(store_dir: str) -> str:
    """SHA-256 of what a store holds, for the run identity of a run from the store (it has no datalist): per list,
    in order, each volume's source SHA-256 and transforms SHA-256. Paths are not part of it: the same pool stored
    from another folder, or a moved store, has the same identity; another volume or other transforms do not."""
    manifest = read_manifest(store_dir)
    root = os.path.abspath(os.path.expanduser(str(store_dir)))
    content = {"format": STORE_FORMAT}
    for section in SECTIONS:
        content[section] = [[r["sha256"], r["transforms_sha256"]] for r in _records(manifest, root, section)]
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode("utf-8")).hexdigest()


def check_pool_store(store_dir: str, roi_size: Sequence[int], image_channels: int = 1,
                     enabled: bool = True) -> Dict[str, int]:
    """Check a store before training (the stand-in for ``check_datalist`` when the bundle trains from the store):
    training and validation volumes listed, their files present, at least ``roi_size``, ``image_channels``
    channels; with ``enabled`` (config key ``check_data``) also each ``.npy`` file's header (float32, the recorded
    shape) and size (a truncated copy). Every culprit is named in one ``ValueError``.

    Returns:
        ``{"training": n, "validation": m}`` volumes.
    """
    enabled = config_flag(enabled, "check_data")
    root = os.path.abspath(os.path.expanduser(str(store_dir)))
    counts, problems = {}, []
    for section in SECTIONS:
        entries = pool_store_entries(store_dir, roi_size=roi_size, shard=False, section=section)
        counts[section] = len(entries)
        for entry, record in zip(entries, _records(read_manifest(store_dir), root, section)):
            if int(record["shape"][0]) != int(image_channels):
                problems.append(f"'{entry['image']}' (from '{record['source']}'): {record['shape'][0]} channel(s), "
                                f"this bundle's network takes {image_channels}")
            if enabled:
                problems += _npy_problems(entry["image"], record["shape"])
    if problems:
        raise ValueError(f"pool store '{root}': {len(problems)} problem(s):\n"
                         + "\n".join(f"  - {p}" for p in problems[:20])
                         + "\nRebuild the store with tools/data/preprocess_pool.py (same overrides as training).")
    logger.info(f"pool store '{root}': {counts['training']} training and {counts['validation']} validation volumes"
                + (", every file's header and size checked." if enabled else " (check_data false: files not read)."))
    return counts


def _npy_problems(path: str, shape: Sequence[int]) -> List[str]:
    """What is wrong with a stored ``.npy`` (header, dtype, shape, size), read without its voxels."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            found, fortran, dtype = read_header(f)
            offset = f.tell()
    except (OSError, ValueError) as err:
        return [f"'{path}': not a readable .npy ({type(err).__name__}: {err})"]
    if fortran or dtype != np.float32 or list(found) != list(shape):
        return [f"'{path}': {dtype} {'F' if fortran else 'C'}-order {list(found)}, expected float32 C-order "
                f"{list(shape)} (its record)"]
    expected = offset + int(np.prod(found)) * 4
    if os.path.getsize(path) < expected:
        return [f"'{path}': {os.path.getsize(path)} bytes, expected {expected} (truncated copy?)"]
    return []


class _mapped:
    """``with _mapped(file, path) as (mmap, array, offset)``: the ``.npy`` memory-mapped read-only, unmapped on exit (its
    pages then leave this process's RSS)."""

    def __init__(self, f, path: str) -> None:
        self.f, self.path = f, path

    def __enter__(self):
        version = np.lib.format.read_magic(self.f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(self.f)
        if fortran or dtype != np.float32:
            raise ValueError(f"pool store volume '{self.path}' is {dtype} {'F' if fortran else 'C'}-order, expected "
                             "float32 C-order (written by tools/data/preprocess_pool.py).")
        self.offset = self.f.tell()  # where the voxels start
        self.mapped = mmap.mmap(self.f.fileno(), 0, access=mmap.ACCESS_READ)
        self.array = np.ndarray(shape, dtype=dtype, buffer=self.mapped, offset=self.offset)
        return self.mapped, self.array, self.offset

    def __exit__(self, *exc) -> None:
        del self.array  # the last view of the map, so that it can close
        self.mapped.close()


def _will_need(mapped: mmap.mmap, volume: np.ndarray, base: int, slices) -> None:
    """Ask the kernel to read the bytes of a crop now, all runs at once (``MADV_WILLNEED``): from a cold page cache
    the copy would otherwise fault in one run after the other, one disk round trip each. A C-order crop of
    ``C x H x W x D`` is ``C * h`` runs, each from ``(c, x, y0, z0)`` to ``(c, x, y0 + w - 1, z0 + d)``."""
    if not hasattr(mmap, "MADV_WILLNEED"):
        return
    itemsize, (_, H, W, D) = volume.itemsize, volume.shape
    xs, ys, zs = slices
    page = mmap.PAGESIZE
    for c in range(volume.shape[0]):
        for x in range(xs.start, xs.stop):
            first = base + (((c * H + x) * W + ys.start) * D + zs.start) * itemsize
            last = base + (((c * H + x) * W + ys.stop - 1) * D + zs.stop) * itemsize
            start = first - first % page
            mapped.madvise(mmap.MADV_WILLNEED, start, last - start)


class PoolRandCropSamplesd(Randomizable, MapTransform):
    """``num_samples`` random ``roi_size`` crops of a store volume, read from its memory map: the store's stand-in
    for ``RandSpatialCropSamplesd`` after the deterministic transforms.

    Input: an entry of :func:`pool_store_entries` (``keys`` hold ``.npy`` paths of ``C x H x W x D`` float32
    volumes). Output: a list of ``num_samples`` dicts whose ``keys`` hold ``C x roi`` float32 ``MetaTensor`` crops
    with the crop's affine (volume affine moved to the crop's first voxel) and ``filename_or_obj`` = the source;
    other entry keys are copied, the ``pool_*`` keys dropped.

    Random draws: one ``sub_seed`` from ``self.R`` per call, then per sample the corner from a generator seeded
    with it, as ``RandSpatialCropSamplesd`` draws them; with equal generator states both crop the same places.
    """

    def __init__(self, keys: KeysCollection, roi_size: Sequence[int], num_samples: int = 1,
                 allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if int(num_samples) < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}.")
        self.roi_size = tuple(int(r) for r in roi_size)
        self.num_samples = int(num_samples)
        self.sub_seed = 0

    def randomize(self, data: Any = None) -> None:
        self.sub_seed = self.R.randint(MAX_SEED, dtype="uint32")

    def __call__(self, data: Mapping) -> List[Dict]:
        self.randomize()
        out: List[Dict] = [
            {k: v for k, v in data.items() if k not in (AFFINE_KEY, SOURCE_KEY) and k not in self.keys}
            for _ in range(self.num_samples)
        ]
        for key in self.key_iterator(dict(data)):
            path = data[key]
            if not isinstance(path, str) or not path.endswith(".npy"):
                raise ValueError(
                    f"PoolRandCropSamplesd: '{key}' must be the .npy path of a pool store volume, got {path!r}; "
                    "configs/pool_store.json must be listed after train.json and multi_gpu_train.json so that "
                    "train#dataset#data is pool_store_entries(...).")
            affine = np.asarray(data.get(AFFINE_KEY, np.eye(4)), dtype=np.float64)
            source = data.get(SOURCE_KEY, path)
            with open(path, "rb") as f, _mapped(f, path) as (mapped, volume, offset):
                spatial = volume.shape[1:]
                if len(spatial) != len(self.roi_size):
                    raise ValueError(f"PoolRandCropSamplesd: volume '{path}' has shape {volume.shape}, expected C + "
                                     f"{len(self.roi_size)} spatial dimensions (roi_size {list(self.roi_size)}).")
                size = get_valid_patch_size(spatial, self.roi_size)
                # a generator seeded like RandSpatialCropSamplesd's cropper: the same corners for the same state
                corners = np.random.RandomState(int(self.sub_seed))
                all_slices = [get_random_patch(spatial, size, corners) for _ in range(self.num_samples)]
                for slices in all_slices:  # ask for every run of every crop first: the reads overlap
                    _will_need(mapped, volume, offset, slices)
                for i, slices in enumerate(all_slices):
                    crop = np.array(volume[(slice(None), *slices)], dtype=np.float32)  # copy: the map is closed
                    shift = np.eye(4)
                    shift[:3, 3] = [s.start for s in slices]
                    out[i][key] = MetaTensor(torch.from_numpy(crop), affine=torch.as_tensor(affine @ shift),
                                             meta={ImageMetaKey.FILENAME_OR_OBJ: source, "patch_index": i})
        return out


class PoolLoadd(MapTransform):
    """A whole store volume as a ``MetaTensor``: the store's stand-in for ``train#deterministic_transforms`` in the
    validation pipeline (the validation crop is then ``CenterSpatialCropd``, as from the NIfTI).

    Input: an entry of :func:`pool_store_entries` (``keys`` hold ``.npy`` paths). Output: ``keys`` hold the
    ``C x H x W x D`` float32 volume with its affine and ``filename_or_obj`` = the source; the ``pool_*`` keys dropped.
    """

    def __call__(self, data: Mapping) -> Dict:
        out = {k: v for k, v in data.items() if k not in (AFFINE_KEY, SOURCE_KEY)}
        for key in self.key_iterator(dict(data)):
            path = data[key]
            if not isinstance(path, str) or not path.endswith(".npy"):
                raise ValueError(f"PoolLoadd: '{key}' must be the .npy path of a pool store volume, got {path!r}; "
                                 "configs/pool_store.json must be listed after train.json and multi_gpu_train.json.")
            with open(path, "rb") as f, _mapped(f, path) as (_, volume, _offset):
                array = np.array(volume, dtype=np.float32)  # copy: the map is closed
            affine = np.asarray(data.get(AFFINE_KEY, np.eye(4)), dtype=np.float64)
            out[key] = MetaTensor(torch.from_numpy(array), affine=torch.as_tensor(affine),
                                  meta={ImageMetaKey.FILENAME_OR_OBJ: data.get(SOURCE_KEY, path)})
        return out
