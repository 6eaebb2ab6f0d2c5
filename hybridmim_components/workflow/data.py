"""Datalist loading for the HybridMIM bundles.

A datalist is a JSON file in the Medical Segmentation Decathlon (MSD) form::

    {"training":   [{"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"}, ...],
     "validation": [{"image": ..., "label": ...}, ...],
     "testing":    [{"image": "imagesTs/b.nii.gz"}, ...]}

Paths are relative to ``dataset_dir`` (absolute paths are kept as they are). A BraTS ``image`` is a list of the four
modality files (t1, t1ce, t2, flair), each resolved the same way. Entries may also be plain strings (the MSD
``"test"`` lists are lists of file names); they become ``{"image": path}``.

Every error names the datalist file, the key, the entry index and what was expected, so that a wrong
``dataset_dir`` or a typo in ``data_list_file_path`` fails before training starts, with a message that says what to fix.

This module imports only the standard library so that it can be imported by bundle configs and tools cheaply.
"""

from __future__ import annotations

import json
import math
import os
import random
from typing import Any, Dict, List, Optional, Sequence

__all__ = [
    "DEFAULT_PATH_KEYS", "load_datalist", "resolve_datalist_path", "select_fraction", "fraction_indices",
    "partition_for_rank",
]

#: Keys whose values are file paths (a string or a list of strings) and are resolved against ``dataset_dir``.
DEFAULT_PATH_KEYS = ("image", "label")

#: How many missing files an error message names before it summarises the rest.
_MAX_NAMED_MISSING = 5


def resolve_datalist_path(dataset_dir: Optional[str], data_list_file_path: str) -> str:
    """Return the path of the datalist file.

    ``data_list_file_path`` may be absolute, relative to ``dataset_dir`` or (as a fallback, when no such file exists
    under ``dataset_dir``) relative to the current directory.

    Raises:
        FileNotFoundError: naming every location that was tried.
    """
    if not isinstance(data_list_file_path, (str, os.PathLike)) or not str(data_list_file_path):
        raise ValueError(f"data_list_file_path must be a non-empty path, got {data_list_file_path!r}.")
    path = os.path.expanduser(str(data_list_file_path))
    if os.path.isabs(path):
        tried = [path]
    else:
        tried = []
        if dataset_dir:
            tried.append(os.path.join(os.path.expanduser(str(dataset_dir)), path))
        tried.append(os.path.abspath(path))
    for candidate in tried:
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    hint = ""
    if dataset_dir and not os.path.isdir(os.path.expanduser(str(dataset_dir))):
        hint = f" (dataset_dir '{dataset_dir}' does not exist either)"
    raise FileNotFoundError(
        f"datalist file '{data_list_file_path}' not found{hint}; tried: "
        + ", ".join(f"'{t}'" for t in tried)
        + ". Set data_list_file_path to an MSD-form JSON file (absolute or relative to dataset_dir)."
    )


def fraction_indices(n: int, fraction: float, seed: int = 0) -> List[int]:
    """Indices (sorted) of the entries kept when using ``fraction`` of ``n`` entries.

    ``k = max(1, round(fraction * n))`` (Python's ``round``) entries are kept: the first ``k`` of a permutation of
    ``range(n)`` drawn by ``random.Random(seed)``. The permutation depends only on ``n`` and ``seed``, so the selection
    is deterministic and nested: the entries kept at 20 % are a subset of those kept at 40 %.
    """
    _check_fraction(fraction, "label_fraction")
    if n <= 0:
        return []
    k = min(n, max(1, int(round(fraction * n))))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[:k])


def select_fraction(items: Sequence[Any], fraction: float, seed: int = 0) -> List[Any]:
    """Keep a deterministic, nested share of ``items`` in their original order (see :func:`fraction_indices`)."""
    return [items[i] for i in fraction_indices(len(items), fraction, seed)]


def load_datalist(
    dataset_dir: Optional[str],
    data_list_file_path: str,
    key: str,
    label_fraction: float = 1.0,
    required_keys: Sequence[str] = ("image",),
    check_files: bool = True,
    seed: int = 0,
    path_keys: Optional[Sequence[str]] = None,
) -> List[Dict[str, Any]]:
    """Read the list ``key`` of an MSD-form datalist and resolve its file paths.

    Args:
        dataset_dir: folder the relative paths of the datalist are relative to (``None`` or ``""``: the
            datalist's own folder).
        data_list_file_path: the datalist JSON, absolute or relative to ``dataset_dir``.
        key: which list to read (``"training"``, ``"validation"``, ``"testing"``, ...).
        label_fraction: share of the list to keep, in (0, 1]. ``1.0`` keeps everything; below 1,
            ``max(1, round(label_fraction * n))`` entries are kept, chosen by a permutation seeded with ``seed`` and
            returned in their original order. The choice is deterministic and nested (20 % is a subset of 40 %).
        required_keys: keys every entry must have (e.g. ``("image", "label")`` for training).
        check_files: check that every referenced file of the kept entries exists.
        seed: seed of the permutation used by ``label_fraction``.
        path_keys: keys whose values are paths to resolve; defaults to ``("image", "label")`` plus ``required_keys``.

    Returns:
        A list of dicts (new objects; the JSON is not modified) with absolute, normalised paths.

    Raises:
        FileNotFoundError: the datalist file or a referenced file does not exist.
        ValueError: invalid JSON, missing key, empty list, malformed entry, entry without a required key,
            ``label_fraction`` outside (0, 1].
    """
    _check_fraction(label_fraction, "label_fraction")
    path = resolve_datalist_path(dataset_dir, data_list_file_path)
    base = os.path.abspath(os.path.expanduser(str(dataset_dir))) if dataset_dir else os.path.dirname(path)
    path_keys = tuple(dict.fromkeys(tuple(DEFAULT_PATH_KEYS if path_keys is None else path_keys) + tuple(required_keys)))

    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"datalist '{path}' is not valid JSON: {e}.") from e
    if not isinstance(content, dict):
        raise ValueError(
            f"datalist '{path}': expected a JSON object with lists such as 'training', 'validation', 'testing', "
            f"got {type(content).__name__}."
        )
    if key not in content:
        raise ValueError(
            f"datalist '{path}' has no key '{key}'; keys present: {sorted(content)}. "
            "Expected the MSD form {\"training\": [...], \"validation\": [...], \"testing\": [...]}."
        )
    entries = content[key]
    if not isinstance(entries, list):
        raise ValueError(f"datalist '{path}', key '{key}': expected a list of entries, got {type(entries).__name__}.")
    if not entries:
        raise ValueError(f"datalist '{path}', key '{key}': the list is empty; expected at least one entry.")

    items = [_parse_entry(entry, i, path, key, required_keys, path_keys) for i, entry in enumerate(entries)]
    kept = fraction_indices(len(items), label_fraction, seed)

    result = []
    missing = []  # (index, key, path)
    for i in kept:
        item = dict(items[i])
        for k in path_keys:
            if k not in item:
                continue
            value = item[k]
            if isinstance(value, str):
                item[k] = _resolve(base, value)
                candidates = [item[k]]
            else:
                item[k] = [_resolve(base, v) for v in value]
                candidates = item[k]
            if check_files:
                missing.extend((i, k, c) for c in candidates if not os.path.exists(c))
        result.append(item)

    if missing:
        named = "; ".join(f"entry {i} '{k}': '{p}'" for i, k, p in missing[:_MAX_NAMED_MISSING])
        more = f" (and {len(missing) - _MAX_NAMED_MISSING} more)" if len(missing) > _MAX_NAMED_MISSING else ""
        hint = "" if os.path.isdir(base) else f" dataset_dir '{base}' does not exist."
        raise FileNotFoundError(
            f"datalist '{path}', key '{key}': {len(missing)} referenced file(s) do not exist: {named}{more}. "
            f"Relative paths are resolved against dataset_dir '{base}'.{hint}"
        )
    return result


def partition_for_rank(
    data: Sequence[Any], shuffle: bool = False, seed: int = 0, even_divisible: bool = False, what: str = "the list"
) -> List[Any]:
    """This process's share of ``data`` under ``torch.distributed`` (all of it without a process group).

    Each process then caches only its share (``CacheDataset``), instead of every process caching everything: host
    memory per process drops by the number of processes. Uses ``monai.data.partition_dataset``: shard ``r`` holds
    entries ``r, r + world, ...`` of the (seeded, if ``shuffle``) order; with ``even_divisible`` the first entries are
    repeated so that every shard has the same length (every process runs the same number of steps).

    Raises:
        ValueError: fewer entries than processes (a process would have nothing).
    """
    import torch.distributed as dist  # imported here: this module stays cheap to import

    if not (dist.is_available() and dist.is_initialized()):
        return list(data)
    rank, world = dist.get_rank(), dist.get_world_size()
    if len(data) < world:
        raise ValueError(f"{what} has {len(data)} entries for {world} processes; each process needs at least one.")
    from monai.data import partition_dataset

    return partition_dataset(data, num_partitions=world, shuffle=shuffle, seed=seed, even_divisible=even_divisible)[rank]


def _check_fraction(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not 0 < value <= 1:
        raise ValueError(f"{name} must be a number in (0, 1] (the share of the training list to use), got {value!r}.")


def _resolve(base: str, value: str) -> str:
    value = os.path.expanduser(value)
    return os.path.normpath(value if os.path.isabs(value) else os.path.join(base, value))


def _parse_entry(
    entry: Any, index: int, path: str, key: str, required_keys: Sequence[str], path_keys: Sequence[str]
) -> Dict[str, Any]:
    where = f"datalist '{path}', key '{key}', entry {index}"
    if isinstance(entry, str):
        entry = {"image": entry}
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a dict such as {{\"image\": ..., \"label\": ...}} or a path string, "
                         f"got {type(entry).__name__} {entry!r}.")
    absent = [k for k in required_keys if k not in entry]
    if absent:
        raise ValueError(f"{where}: missing required key(s) {absent}; the entry has keys {sorted(entry)}.")
    for k in path_keys:
        if k not in entry:
            continue
        value = entry[k]
        ok = (isinstance(value, str) and value) or (
            isinstance(value, list) and value and all(isinstance(v, str) and v for v in value)
        )
        if not ok:
            raise ValueError(f"{where}: '{k}' must be a path or a non-empty list of paths "
                             f"(BraTS: the 4 modality files), got {value!r}.")
    return entry
