"""Build the MSD-form datalists of the HybridMIM bundles for the datasets users download themselves.

Nothing is downloaded here: point each command at the folder you downloaded. Each writes a JSON datalist
``{"training": [...], "validation": [...], "testing": [...]}`` with paths relative to ``dataset_dir`` (by default
``<dataset_dir>/datalist.json``; it never overwrites the MSD ``dataset.json``), prints the counts and returns the path.

==========  =========================================================================================================
``btcv``    BTCV (Synapse multi-organ) ``imagesTr/img00XX.nii.gz`` + ``labelsTr/label00XX.nii.gz`` (also the raw
            ``Training/img`` + ``Training/label`` layout). Split ``"swinunetr"`` (default): validation = cases
            0035-0040, training = the other 24 labelled cases, as in the UNETR / SwinUNETR ``dataset_0.json``;
            ``"random"``: a seeded ``val_fraction`` split. Testing: ``imagesTs`` (``Testing/img``) when present.
``msd``     MSD Task03_Liver / Task09_Spleen: the task's ``dataset.json``; a seeded ``val_fraction`` split of its
            ``training`` list, its ``test`` list as ``testing``.
``brats``   BraTS2020 ``MICCAI_BraTS2020_TrainingData/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz``; image lists
            in the order t1, t1ce, t2, flair; a seeded ``val_fraction`` split. Testing: the cases of
            ``MICCAI_BraTS2020_ValidationData`` when present (they have no seg).
``pool``    An unlabeled CT pool for pretraining: every ``*.nii.gz`` / ``*.nii`` under the given folders (label
            folders/files left out), a seeded ``val_fraction`` split.
==========  =========================================================================================================

Where a dataset has no unlabelled test images, ``testing`` holds the validation images (image only) so that the
bundles' inference runs out of the box; this is printed.

A seeded split of ``n`` cases puts ``max(1, round(val_fraction * n))`` of them in validation: the first ones of a
``random.Random(seed)`` permutation of the sorted case list; both lists keep the sorted order.

Command line (python-fire)::

    python tools/data/prepare_datalist.py btcv  /data/BTCV
    python tools/data/prepare_datalist.py msd   /data/Task09_Spleen --val_fraction 0.2
    python tools/data/prepare_datalist.py brats /data/BraTS2020
    python tools/data/prepare_datalist.py pool  /data/ct_a /data/ct_b --dataset_dir /data --val_fraction 0.05 \\
        --exclude /data/BTCV/datalist.json    # never pretrain on a downstream task's validation/testing images
        # (add --exclude_dataset_dir /data/BTCV when that datalist lives elsewhere: its paths are relative to it)
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a file: make ``tools`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tools.data.file_identity import same_image  # noqa: E402
from hybridmim_components.utils.atomic_files import atomic_open  # noqa: E402

__all__ = ["btcv", "msd", "brats", "pool", "split_indices", "BTCV_SWINUNETR_VALIDATION", "BRATS_MODALITIES"]

DEFAULT_OUTPUT = "datalist.json"
#: BTCV case numbers in validation in the UNETR / SwinUNETR split (dataset_0.json); the other 24 labelled cases
#: (0001-0010, 0021-0034) are training.
BTCV_SWINUNETR_VALIDATION = (35, 36, 37, 38, 39, 40)
BRATS_MODALITIES = ("t1", "t1ce", "t2", "flair")
_NII = (".nii.gz", ".nii")
_MAX_NAMED = 5


class LayoutError(FileNotFoundError):
    """The folder does not have the layout the command expects (the message names the folder and the layout)."""


# ----------------------------------------------------------------------------------------------------------------
# helpers


def split_indices(n: int, val_fraction: float, seed: int = 0) -> Tuple[List[int], List[int]]:
    """Seeded train/validation split of ``range(n)``: ``max(1, round(val_fraction * n))`` validation indices.

    Returns (training indices, validation indices), both sorted.
    """
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be a number in (0, 1), got {val_fraction!r}.")
    if n < 2:
        raise ValueError(f"need at least 2 cases to make a training/validation split, found {n}.")
    n_val = min(n - 1, max(1, int(round(val_fraction * n))))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val = sorted(order[:n_val])
    return sorted(order[n_val:]), val


def _is_nifti(name: str) -> bool:
    return name.endswith(_NII) and not name.startswith(".")  # skips macOS "._x.nii.gz" resource files


def _strip_nii(name: str) -> str:
    for ext in _NII:
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _rel(path: str, dataset_dir: str) -> str:
    return os.path.relpath(os.path.abspath(path), os.path.abspath(dataset_dir))


def _list_names(names: Iterable[str]) -> str:
    names = list(names)
    more = f" (and {len(names) - _MAX_NAMED} more)" if len(names) > _MAX_NAMED else ""
    return ", ".join(names[:_MAX_NAMED]) + more


def _require_dir(path: str, what: str) -> str:
    if not os.path.isdir(path):
        raise LayoutError(f"folder '{path}' not found; expected {what}.")
    return path


def _write(dataset_dir: str, content: Dict, output: Optional[str], name: str) -> str:
    output = output or DEFAULT_OUTPUT
    path = output if os.path.isabs(output) else os.path.join(dataset_dir, output)
    if os.path.basename(path) == "dataset.json" and os.path.exists(path):
        raise ValueError(f"{name}: refusing to overwrite '{path}' (it may be the dataset's own MSD dataset.json); "
                         "choose another output name.")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2)
    counts = ", ".join(f"{k} {len(v)}" for k, v in content.items() if isinstance(v, list))
    print(f"{name}: wrote {path} ({counts}); paths relative to {os.path.abspath(dataset_dir)}")
    return os.path.abspath(path)


def _testing_from_validation(validation: List[Dict], name: str) -> List[Dict]:
    print(f"{name}: no unlabelled test images found; 'testing' holds the {len(validation)} validation images.")
    return [{"image": e["image"]} for e in validation]


# ----------------------------------------------------------------------------------------------------------------
# BTCV


def _numbered(folder: str, prefix: str) -> Dict[int, str]:
    """``{case number: path}`` of ``<prefix><digits>.nii[.gz]`` files in ``folder``."""
    pattern = re.compile(rf"^{prefix}(\d+)$")
    found = {}
    for name in sorted(os.listdir(folder)):
        m = pattern.match(_strip_nii(name)) if _is_nifti(name) else None
        if m:
            found[int(m.group(1))] = os.path.join(folder, name)
    return found


def btcv(
    dataset_dir: str,
    split: str = "swinunetr",
    val_fraction: float = 0.2,
    seed: int = 0,
    output: Optional[str] = None,
) -> str:
    """Datalist for BTCV (13 abdominal organs + background).

    Args:
        dataset_dir: folder with ``imagesTr/img00XX.nii.gz`` and ``labelsTr/label00XX.nii.gz`` (optionally
            ``imagesTs``), or the raw ``Training/img``, ``Training/label`` (``Testing/img``) layout.
        split: ``"swinunetr"``: validation = cases 0035-0040 (:data:`BTCV_SWINUNETR_VALIDATION`), training = the
            other labelled cases (24 for the full BTCV); ``"random"``: seeded split with ``val_fraction``.
        val_fraction, seed: used by ``split="random"``.
        output: datalist file name (relative to ``dataset_dir``) or absolute path; default ``datalist.json``.
    """
    layouts = [("imagesTr", "labelsTr", "imagesTs"),
               (os.path.join("Training", "img"), os.path.join("Training", "label"), os.path.join("Testing", "img"))]
    for img_dir, lab_dir, test_dir in layouts:
        if os.path.isdir(os.path.join(dataset_dir, img_dir)):
            break
    else:
        raise LayoutError(
            f"BTCV: folder '{dataset_dir}' has neither 'imagesTr' (with labelsTr) nor 'Training/img' "
            "(with Training/label); expected imagesTr/img00XX.nii.gz and labelsTr/label00XX.nii.gz."
        )
    images = _numbered(os.path.join(dataset_dir, img_dir), "img")
    labels = _numbered(_require_dir(os.path.join(dataset_dir, lab_dir), "BTCV labels label00XX.nii.gz"), "label")
    if not images:
        raise LayoutError(f"BTCV: no img00XX.nii.gz files in '{os.path.join(dataset_dir, img_dir)}'.")
    unpaired = sorted(set(images) ^ set(labels))
    if unpaired:
        raise LayoutError(
            f"BTCV: images and labels in '{dataset_dir}' do not pair up; case numbers with only an image or only a "
            f"label: {_list_names(f'{c:04d}' for c in unpaired)} (expected img00XX.nii.gz with label00XX.nii.gz)."
        )
    cases = sorted(images)
    if split == "swinunetr":
        absent = [c for c in BTCV_SWINUNETR_VALIDATION if c not in images]
        if absent:
            raise LayoutError(
                f"BTCV: split 'swinunetr' needs validation cases 0035-0040, but {_list_names(f'{c:04d}' for c in absent)}"
                f" are not in '{os.path.join(dataset_dir, img_dir)}'; use split='random' for a partial dataset."
            )
        val_cases = list(BTCV_SWINUNETR_VALIDATION)
        train_cases = [c for c in cases if c not in val_cases]
        if not train_cases:
            raise LayoutError(f"BTCV: no training cases left in '{dataset_dir}' besides 0035-0040.")
    elif split == "random":
        train_idx, val_idx = split_indices(len(cases), val_fraction, seed)
        train_cases, val_cases = [cases[i] for i in train_idx], [cases[i] for i in val_idx]
    else:
        raise ValueError(f"BTCV: split must be 'swinunetr' or 'random', got {split!r}.")

    def entry(c):
        return {"image": _rel(images[c], dataset_dir), "label": _rel(labels[c], dataset_dir)}

    content = {"training": [entry(c) for c in train_cases], "validation": [entry(c) for c in val_cases]}
    test_folder = os.path.join(dataset_dir, test_dir)
    tests = _numbered(test_folder, "img") if os.path.isdir(test_folder) else {}
    content["testing"] = ([{"image": _rel(tests[c], dataset_dir)} for c in sorted(tests)] if tests
                          else _testing_from_validation(content["validation"], "btcv"))
    return _write(dataset_dir, content, output, "btcv")


# ----------------------------------------------------------------------------------------------------------------
# MSD


def msd(dataset_dir: str, val_fraction: float = 0.2, seed: int = 0, output: Optional[str] = None) -> str:
    """Datalist for an MSD task (Task03_Liver, Task09_Spleen, ...) from the task's own ``dataset.json``.

    The task's ``training`` list is split (seeded, ``val_fraction``) into training and validation; its ``test``
    list becomes ``testing``. Every listed file must exist (macOS ``._`` files in the folders are ignored since only
    listed files are used).
    """
    _require_dir(dataset_dir, "an MSD task folder (e.g. Task09_Spleen) with dataset.json, imagesTr, labelsTr")
    src = os.path.join(dataset_dir, "dataset.json")
    if not os.path.isfile(src):
        raise LayoutError(f"MSD: '{src}' not found; expected the task's dataset.json next to imagesTr and labelsTr.")
    try:
        with open(src, encoding="utf-8") as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"MSD: '{src}' is not valid JSON: {e}.") from e
    training = meta.get("training") if isinstance(meta, dict) else None
    if not isinstance(training, list) or not training:
        keys = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"MSD: '{src}' has no non-empty 'training' list (keys: {keys}).")

    def norm(p: str) -> str:
        return os.path.normpath(p)  # "./imagesTr/x.nii.gz" -> "imagesTr/x.nii.gz"

    entries, missing = [], []
    for i, e in enumerate(training):
        if not isinstance(e, dict) or "image" not in e or "label" not in e:
            raise ValueError(f"MSD: '{src}', key 'training', entry {i}: expected {{'image': ..., 'label': ...}}, "
                             f"got {e!r}.")
        entry = {"image": norm(e["image"]), "label": norm(e["label"])}
        missing += [p for p in entry.values() if not os.path.exists(os.path.join(dataset_dir, p))]
        entries.append(entry)
    tests = []
    for i, t in enumerate(meta.get("test", []) or []):
        t = t.get("image") if isinstance(t, dict) else t
        if not isinstance(t, str):
            raise ValueError(f"MSD: '{src}', key 'test', entry {i}: expected a path, got {t!r}.")
        tests.append({"image": norm(t)})
        if not os.path.exists(os.path.join(dataset_dir, tests[-1]["image"])):
            missing.append(tests[-1]["image"])
    if missing:
        raise LayoutError(f"MSD: {len(missing)} file(s) listed in '{src}' are missing under '{dataset_dir}': "
                          f"{_list_names(missing)}.")
    entries.sort(key=lambda e: e["image"])
    train_idx, val_idx = split_indices(len(entries), val_fraction, seed)
    content = {"training": [entries[i] for i in train_idx], "validation": [entries[i] for i in val_idx]}
    content["testing"] = tests or _testing_from_validation(content["validation"], "msd")
    return _write(dataset_dir, content, output, "msd")


# ----------------------------------------------------------------------------------------------------------------
# BraTS


def _brats_file(case_dir: str, case: str, suffix: str) -> Optional[str]:
    for ext in _NII:
        path = os.path.join(case_dir, f"{case}_{suffix}{ext}")
        if os.path.isfile(path):
            return path
    return None


def _brats_cases(folder: str, with_seg: bool) -> Tuple[List[Dict[str, object]], List[str]]:
    """Entries of the case folders in ``folder`` and the problems found (one line per incomplete case)."""
    entries, problems = [], []
    for case in sorted(os.listdir(folder)):
        case_dir = os.path.join(folder, case)
        if not os.path.isdir(case_dir) or case.startswith("."):
            continue
        suffixes = BRATS_MODALITIES + (("seg",) if with_seg else ())
        files = {s: _brats_file(case_dir, case, s) for s in suffixes}
        absent = [s for s, p in files.items() if p is None]
        if absent:
            problems.append(f"{case}: no {', '.join(f'{case}_{s}.nii.gz' for s in absent)}")
            continue
        entry = {"image": [files[m] for m in BRATS_MODALITIES]}
        if with_seg:
            entry["label"] = files["seg"]
        entries.append(entry)
    return entries, problems


def brats(dataset_dir: str, val_fraction: float = 0.2, seed: int = 0, output: Optional[str] = None) -> str:
    """Datalist for BraTS2020 (4 modalities; labels 0, 1, 2, 4).

    Args:
        dataset_dir: the folder holding ``MICCAI_BraTS2020_TrainingData`` (and optionally
            ``MICCAI_BraTS2020_ValidationData``), or the ``MICCAI_BraTS2020_TrainingData`` folder itself. Each case
            folder ``<case>`` holds ``<case>_{t1,t1ce,t2,flair,seg}.nii.gz`` (``.nii`` accepted too).
        val_fraction, seed: seeded training/validation split of the training cases.
        output: datalist file name (relative to ``dataset_dir``) or absolute path; default ``datalist.json``.

    Note: in the official BraTS2020 training data, case 355's segmentation is named ``W39_1998.09.19_Segm.nii``;
    rename it to ``BraTS20_Training_355_seg.nii`` first (the error message says so).
    """
    _require_dir(dataset_dir, "the BraTS2020 download with MICCAI_BraTS2020_TrainingData/<case>/<case>_t1.nii.gz")
    train_dir = os.path.join(dataset_dir, "MICCAI_BraTS2020_TrainingData")
    if not os.path.isdir(train_dir):
        train_dir = dataset_dir  # the training folder itself
    entries, problems = _brats_cases(train_dir, with_seg=True)
    if problems:
        hint = (" (BraTS2020 case 355 ships its seg as 'W39_1998.09.19_Segm.nii': rename it to "
                "'BraTS20_Training_355_seg.nii')") if any("355" in p for p in problems) else ""
        raise LayoutError(f"BraTS: {len(problems)} case folder(s) in '{train_dir}' are incomplete: "
                          f"{_list_names(problems)}{hint}.")
    if not entries:
        raise LayoutError(
            f"BraTS: no case folders in '{train_dir}'; expected MICCAI_BraTS2020_TrainingData/<case>/"
            "<case>_{t1,t1ce,t2,flair,seg}.nii.gz."
        )
    train_idx, val_idx = split_indices(len(entries), val_fraction, seed)

    def rel(e):
        out = {"image": [_rel(p, dataset_dir) for p in e["image"]]}
        if "label" in e:
            out["label"] = _rel(e["label"], dataset_dir)
        return out

    content = {"training": [rel(entries[i]) for i in train_idx], "validation": [rel(entries[i]) for i in val_idx]}
    val_dir = os.path.join(dataset_dir, "MICCAI_BraTS2020_ValidationData")
    tests = _brats_cases(val_dir, with_seg=False)[0] if os.path.isdir(val_dir) else []
    content["testing"] = [rel(e) for e in tests] or _testing_from_validation(content["validation"], "brats")
    return _write(dataset_dir, content, output, "brats")


# ----------------------------------------------------------------------------------------------------------------
# unlabeled pool

_LABEL_DIRS = {"labelstr", "labelsts", "labels", "label", "segmentations", "masks"}


def _looks_like_label(path: str) -> bool:
    parts = [p.lower() for p in path.split(os.sep)]
    name = _strip_nii(parts[-1])
    return (any(p in _LABEL_DIRS for p in parts[:-1]) or name.startswith("label") or name.endswith(("_seg", "_mask"))
            or name.startswith("segmentation"))


def _held_out_images(datalists: Sequence[str], dataset_dir: Optional[str] = None) -> List[str]:
    """Real paths of the validation/testing images of the downstream datalists, resolved as the bundles do
    (:func:`hybridmim_components.workflow.data.load_datalist`: relative to ``dataset_dir``, else the datalist's folder).

    Raises:
        FileNotFoundError: a datalist, or an image one of them lists, does not exist (naming it).
    """
    from hybridmim_components.workflow.data import load_datalist, resolve_datalist_path

    held_out: List[str] = []
    for datalist in datalists:
        try:
            path = resolve_datalist_path(dataset_dir, datalist)
        except FileNotFoundError as err:
            raise LayoutError(f"pool: --exclude datalist '{datalist}' not found ({err})") from err
        for section in ("validation", "testing"):
            try:
                entries = load_datalist(dataset_dir, path, section, path_keys=("image",))
            except FileNotFoundError as err:
                raise LayoutError(f"pool: --exclude {datalist}: {err} Pass --exclude_dataset_dir (the downstream "
                                  "bundle's dataset_dir) if its entries are relative to another folder.") from err
            except ValueError as err:
                if "has no key" in str(err) or "is empty" in str(err):
                    continue  # a datalist without that section holds out nothing there
                raise ValueError(f"pool: --exclude {datalist}: {err}") from err
            for entry in entries:
                images = entry["image"]
                for image in images if isinstance(images, list) else [images]:
                    real = os.path.realpath(image)
                    if real not in held_out:
                        held_out.append(real)
    return held_out


def _is_held_out(path: str, held_out: Sequence[str]) -> bool:
    """Same file, a copy, or the same scan saved another way (:func:`tools.data.file_identity.same_image`)."""
    return any(same_image(path, other) for other in held_out)


def pool(
    *dirs: str,
    dataset_dir: Optional[str] = None,
    val_fraction: float = 0.05,
    seed: int = 0,
    output: Optional[str] = None,
    skip_labels: bool = True,
    exclude: Sequence[str] = (),
    exclude_dataset_dir: Optional[str] = None,
) -> str:
    """Datalist of an unlabeled CT pool for pretraining: every NIfTI file under ``dirs`` (searched recursively).

    Args:
        dirs: one or more folders.
        dataset_dir: the folder the paths are relative to and the datalist goes into; default: the common parent
            of ``dirs``.
        val_fraction, seed: seeded training/validation split (sorted file list).
        output: datalist file name (relative to ``dataset_dir``) or absolute path; default ``datalist.json``.
        skip_labels: leave out label maps: files under ``labelsTr``/``labelsTs``/``labels``/``label``/
            ``segmentations``/``masks`` folders and files named ``label*``, ``segmentation*``, ``*_seg``, ``*_mask``.
        exclude: downstream datalists whose ``validation`` and ``testing`` images must not be pretrained on. A pool
            file is left out when it is one of those files, a byte-identical copy of one, or the same scan saved
            another way (equal shape, affine and voxels); the count and names are printed. An image they list that
            does not exist stops with an error naming it.
        exclude_dataset_dir: the folder their relative paths are relative to, as the downstream bundle's
            ``dataset_dir`` (default: each datalist's own folder, the bundles' rule without a ``dataset_dir``).
    """
    if isinstance(exclude, str):
        exclude = [exclude]
    held_out = _held_out_images(exclude, exclude_dataset_dir)
    if not dirs:
        raise ValueError("pool: give at least one folder with CT volumes (*.nii.gz).")
    for d in dirs:
        _require_dir(d, "a folder containing CT volumes (*.nii.gz)")
    dataset_dir = dataset_dir or os.path.commonpath([os.path.abspath(d) for d in dirs])
    files = set()
    for d in dirs:
        for root, subdirs, names in os.walk(d):
            subdirs[:] = sorted(s for s in subdirs if not s.startswith("."))
            for name in names:
                path = os.path.abspath(os.path.join(root, name))
                if _is_nifti(name) and not (skip_labels and _looks_like_label(_rel(path, d))):
                    files.add(path)
    if not files:
        raise LayoutError(f"pool: no *.nii.gz / *.nii images under {', '.join(repr(d) for d in dirs)}"
                          + (" (label files skipped)" if skip_labels else "") + ".")
    files = sorted(files)
    if held_out:
        kept = [f for f in files if not _is_held_out(f, held_out)]
        dropped = sorted(set(files) - set(kept))
        print(f"pool: excluded {len(dropped)} file(s) that are validation/testing images of "
              f"{', '.join(exclude)}" + (f": {_list_names(os.path.basename(f) for f in dropped)}" if dropped else ""))
        files = kept
    train_idx, val_idx = split_indices(len(files), val_fraction, seed)
    content = {"training": [{"image": _rel(files[i], dataset_dir)} for i in train_idx],
               "validation": [{"image": _rel(files[i], dataset_dir)} for i in val_idx]}
    content["testing"] = _testing_from_validation(content["validation"], "pool")
    return _write(dataset_dir, content, output, "pool")


if __name__ == "__main__":
    import fire

    try:
        fire.Fire({"btcv": btcv, "msd": msd, "brats": brats, "pool": pool})
    except (FileNotFoundError, ValueError) as err:  # layout / argument problems: the message says what to fix
        sys.exit(f"error: {err}")
