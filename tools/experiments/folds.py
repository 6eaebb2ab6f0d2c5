"""Patient-level folds for the patient study: who trains, who is tested, and what the pretraining pool may hold.

A *patient* is one labelled case of the task datalist, or several when entries share a ``"patient"`` key (follow-up
scans of one person must never sit on both sides of a split); distinct image files without that key are distinct
patients, even when their names are equal. Folds split patients, never entries. The pretraining
pool of a fold must not contain any image of that fold's test patients: :func:`pool_for_fold` drops them, comparing
files by path, by SHA-256 for copies and by shape, affine and voxels for the same scan saved another way
(:func:`tools.data.file_identity.same_image`), and :func:`check_no_leak` refuses a fold where a test image reaches
training or the pool.
"""
from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from hybridmim_components.utils.atomic_files import atomic_open
from hybridmim_components.workflow.data import load_datalist
from tools.data.file_identity import same_image


class FoldError(ValueError):
    pass


@dataclass
class Patient:
    """One patient of the task: ``id`` and its labelled entries ``[{"image": abs path, "label": abs path}, ...]``."""

    id: str
    entries: list[dict] = field(default_factory=list)

    @property
    def images(self) -> list[str]:
        return [e["image"] for e in self.entries]


def _stem(path: str) -> str:
    name = os.path.basename(path)
    for ext in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return os.path.splitext(name)[0]


def read_patients(task_datalist: str) -> list[Patient]:
    """The labelled patients of ``task_datalist`` (MSD form; ``training`` and ``validation`` with ``label``).

    Entries are grouped by their ``"patient"`` key, else each is its own patient named after its image file (its path
    from the images' common folder where names clash, e.g. ``a/ct.nii.gz`` and ``b/ct.nii.gz``). An
    image listed twice (training and validation) counts once; ``testing`` entries have no label and are ignored.
    """
    seen: dict[str, dict] = {}
    for section in ("training", "validation"):
        entries = _read_section(task_datalist, section, optional=section == "validation",
                                required_keys=("image", "label"))
        for entry in entries:
            if isinstance(entry["image"], (list, tuple)):
                raise FoldError(f"{task_datalist}: the patient study takes one image file per entry "
                                f"(got {entry['image']}).")
            seen.setdefault(os.path.realpath(entry["image"]), entry)
    patients: dict[str, Patient] = {}
    for entry, pid in zip(seen.values(), _patient_ids(list(seen.values()))):
        patients.setdefault(pid, Patient(pid)).entries.append(
            {"image": entry["image"], "label": entry["label"]})
    if len(patients) < 2:
        raise FoldError(f"{task_datalist}: {len(patients)} labelled patient(s); a patient-level split needs at "
                        "least 2.")
    return list(patients.values())


def _patient_ids(entries: list[dict]) -> list[str]:
    """Each entry's patient id: its ``"patient"`` key, else its image's stem, else (stem taken) its relative path."""
    keyed = [e.get("patient") not in (None, "") for e in entries]
    taken = {str(e["patient"]) for e, k in zip(entries, keyed) if k}
    stems = [_stem(e["image"]) for e in entries]
    unkeyed = [e["image"] for e, k in zip(entries, keyed) if not k]
    root = os.path.commonpath([os.path.dirname(i) for i in unkeyed]) if unkeyed else ""
    ids = []
    for entry, stem, k in zip(entries, stems, keyed):
        clash = stem in taken or sum(1 for s, kk in zip(stems, keyed) if s == stem and not kk) > 1
        ids.append(str(entry["patient"]) if k else
                   os.path.relpath(entry["image"], root).replace(os.sep, "/") if clash else stem)
    return ids


def make_folds(patient_ids: Sequence[str], k: int | None = None, seed: int = 0) -> list[list[str]]:
    """The test patients of each of ``k`` folds; every patient is tested exactly once.

    ``k`` = the number of patients (the default) is leave-one-patient-out, in the given order. A smaller ``k``
    shuffles the patients with ``seed`` and deals them round-robin, so fold sizes differ by at most one.
    """
    ids = list(patient_ids)
    n = len(ids)
    k = n if k is None else int(k)
    if not 2 <= k <= n:
        raise FoldError(f"--folds {k}: expected 2 to {n} (the number of patients; {n} is leave-one-patient-out).")
    if len(set(ids)) != n:
        raise FoldError(f"patient ids are not unique: {sorted(i for i in set(ids) if ids.count(i) > 1)}")
    if k == n:
        return [[pid] for pid in ids]
    order = ids[:]
    random.Random(seed).shuffle(order)
    return [order[i::k] for i in range(k)]


def _pool_images(entry: dict) -> list[str]:
    image = entry["image"]
    return list(image) if isinstance(image, (list, tuple)) else [image]


def pool_for_fold(pool: dict[str, list[dict]], test_images: Sequence[str]) -> tuple[dict[str, list[dict]], list[str]]:
    """``pool`` (``{"training": [...], "validation": [...]}``, absolute paths) without the images of ``test_images``.

    Returns the kept pool and the dropped image paths.
    """
    kept, dropped = {}, []
    for section, entries in pool.items():
        kept[section] = []
        for entry in entries:
            hits = [p for p in _pool_images(entry) if any(same_image(p, t) for t in test_images)]
            (dropped.extend(hits) if hits else kept[section].append(entry))
    return kept, dropped


def read_pool(pool_datalist: str) -> dict[str, list[dict]]:
    """``training`` and (if present) ``validation`` of a pretraining datalist, with absolute paths."""
    return {"training": _read_section(pool_datalist, "training"),
            "validation": _read_section(pool_datalist, "validation", optional=True)}


def _read_section(datalist: str, section: str, optional: bool = False, **kwargs) -> list[dict]:
    """``load_datalist`` of one section; an ``optional`` one may be missing or empty (then ``[]``)."""
    try:
        return load_datalist(None, datalist, section, **kwargs)
    except ValueError as err:
        if optional and ("has no key" in str(err) or "is empty" in str(err)):
            return []
        raise


@dataclass
class Fold:
    """Fold ``index``: the patients it trains on and tests on, and the pool its pretraining may use."""

    index: int
    train: list[Patient]
    test: list[Patient]
    pool: dict[str, list[dict]]
    pool_dropped: list[str]

    @property
    def train_images(self) -> list[str]:
        return [i for p in self.train for i in p.images]

    @property
    def test_images(self) -> list[str]:
        return [i for p in self.test for i in p.images]


def build_folds(patients: Sequence[Patient], pool: dict[str, list[dict]], k: int | None = None,
                seed: int = 0) -> list[Fold]:
    by_id = {p.id: p for p in patients}
    folds = []
    for index, test_ids in enumerate(make_folds([p.id for p in patients], k, seed)):
        test = [by_id[i] for i in test_ids]
        train = [p for p in patients if p.id not in test_ids]
        kept, dropped = pool_for_fold(pool, [i for p in test for i in p.images])
        if not kept.get("training"):
            raise FoldError(f"fold {index}: nothing is left in the pretraining pool once the test patients "
                            f"{test_ids} are removed.")
        fold = Fold(index, train, test, kept, dropped)
        check_no_leak(fold)
        folds.append(fold)
    return folds


def check_no_leak(fold: Fold) -> None:
    """Raise :class:`FoldError` if an image of a test patient is among the fold's training or pool images."""
    pool_images = [p for entries in fold.pool.values() for e in entries for p in _pool_images(e)]
    for test_image in fold.test_images:
        for where, images in (("training", fold.train_images), ("pretraining pool", pool_images)):
            hits = [i for i in images if same_image(i, test_image)]
            if hits:
                raise FoldError(f"fold {fold.index}: the test image {test_image} is also in the {where} "
                                f"({hits[0]}); a test patient must never be trained on.")


def write_fold_datalists(fold: Fold, folder: str, shared_pool: bool) -> tuple[str, str | None]:
    """Write ``task.json`` (and ``pool.json`` unless the pool is shared by all folds) into ``folder``.

    ``task.json``: ``training`` = the training patients; ``validation`` = the same (the bundles need the key; the
    study never validates, so no model is ever selected on the test patient); ``testing`` = the test images, which
    the finetune bundle's ``inference.json`` segments. Paths are absolute.
    """
    os.makedirs(folder, exist_ok=True)
    train = [dict(e) for p in fold.train for e in p.entries]
    task = {"training": train, "validation": train, "testing": [{"image": i} for i in fold.test_images]}
    task_path = os.path.join(folder, "task.json")
    _write_json(task_path, task)
    pool_path = None
    if not shared_pool:
        pool_path = os.path.join(folder, "pool.json")
        _write_json(pool_path, {k: v for k, v in fold.pool.items() if v})
    return task_path, pool_path


def _write_json(path: str, content) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=1)
