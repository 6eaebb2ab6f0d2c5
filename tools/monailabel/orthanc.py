"""A PACS for MONAI Label on this machine: Orthanc with its DICOMweb and GDCM plugins, its configuration, uploads, a
check of a series before it is served, and a lossless JPEG 2000 copy of a series.

Orthanc 1.10 and its plugins come from Debian (``apt-get install orthanc orthanc-dicomweb orthanc-gdcm``). What the
configuration (:func:`orthanc_configuration`) must hold for MONAI Label (``docs/pacs.md``):

- the DICOMweb plugin (QIDO-RS, WADO-RS, STOW-RS under ``/dicom-web/``): MONAI Label's ``--studies`` URL;
- MONAI Label's WADO-RS retrieve asks for the instances without a transfer syntax, which DICOMweb defines as
  Explicit VR Little Endian, so Orthanc decodes a compressed series. Its own decoders (DCMTK) read JPEG-LS and JPEG;
  JPEG 2000 needs the GDCM plugin, named by the configuration (installing ``orthanc-gdcm`` is not enough when
  Orthanc runs with a configuration of one's own); without it such a retrieve answers HTTP 500 ("Cannot transcode
  image"). The plugin is restricted to the JPEG 2000 syntaxes: Debian 12's build crashes Orthanc now and then in a
  transcoding (``docs/pacs.md``);
- storage, index and port of its own, the DICOM (DIMSE) server off, remote access off: a test PACS on 127.0.0.1.

Command line (a PACS for trying the set-up by hand; Ctrl-C stops it)::

    python tools/monailabel/orthanc.py serve --storage /tmp/pacs --port 8042
    python tools/monailabel/orthanc.py upload --url http://127.0.0.1:8042 path/to/series/*.dcm
    python tools/monailabel/orthanc.py check path/to/series        # before serving a series
    python tools/monailabel/orthanc.py soak --url http://127.0.0.1:8042 --times 10   # retrieve as MONAI Label does
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence

if __package__ in (None, ""):  # run as a file: make ``tools`` and the package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from hybridmim_components.utils.atomic_files import atomic_open  # noqa: E402
from tools.monailabel.server import log_tail, stop_process_group  # noqa: E402

__all__ = ["ORTHANC_PLUGIN_DIRS", "OrthancError", "find_orthanc", "orthanc_configuration", "running_orthanc",
           "upload", "series_problems", "lossless_copy", "soak"]

ORTHANC_PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc/plugins", "/usr/local/share/orthanc/plugins")
PLUGINS = ("libOrthancDicomWeb.so", "libOrthancGdcm.so")
START_TIMEOUT_S = 60
#: the JPEG 2000 transfer syntaxes (lossless, lossy, and Part 2 of each) given to the GDCM plugin
JPEG2000_SYNTAXES = ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.92",
                     "1.2.840.10008.1.2.4.93")


class OrthancError(RuntimeError):
    """Orthanc or one of its plugins is missing, or did not start."""


def find_orthanc() -> tuple[str, dict[str, str]]:
    """The ``Orthanc`` executable and ``{plugin file: path}`` of the two plugins; an error names what is missing and
    the Debian package that brings it."""
    exe = shutil.which("Orthanc")
    if exe is None:
        raise OrthancError("Orthanc is not installed (no 'Orthanc' on PATH): apt-get install orthanc orthanc-dicomweb "
                           "orthanc-gdcm")
    found = {}
    for name, package in zip(PLUGINS, ("orthanc-dicomweb", "orthanc-gdcm")):
        paths = [os.path.join(d, name) for d in ORTHANC_PLUGIN_DIRS if os.path.isfile(os.path.join(d, name))]
        if not paths:
            raise OrthancError(f"Orthanc's plugin {name} was not found in {', '.join(ORTHANC_PLUGIN_DIRS)}: "
                               f"apt-get install {package}")
        found[name] = paths[0]
    return exe, found


def orthanc_configuration(storage_dir: str, http_port: int, plugins: Sequence[str]) -> dict:
    """Orthanc's JSON configuration for a PACS that MONAI Label reads from and saves DICOM SEG into."""
    return {
        "Name": "hybridmim-pacs",
        "StorageDirectory": storage_dir,
        "IndexDirectory": storage_dir,
        "HttpPort": int(http_port),
        "RemoteAccessAllowed": False,  # 127.0.0.1 only
        "AuthenticationEnabled": False,
        "DicomServerEnabled": False,  # DICOMweb only: no DIMSE port to collide with another PACS
        "Plugins": list(plugins),
        # "Host": the host Orthanc writes into the RetrieveURL of STOW-RS answers, which MONAI Label reads back
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Host": "127.0.0.1"},
        # GDCM decodes JPEG 2000 (Orthanc's own DCMTK does not) when a client asks for uncompressed instances; it is
        # kept to those syntaxes: Debian 12's orthanc-gdcm 1.5 crashes Orthanc now and then in a transcoding
        # (docs/pacs.md), so every other syntax stays on Orthanc's own decoders, which are stable
        "Gdcm": {"Enable": True, "RestrictTransferSyntaxes": list(JPEG2000_SYNTAXES)},
    }


def _get(url: str, timeout: float = 10) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


@contextlib.contextmanager
def running_orthanc(work_dir: str, port: int, log_path: str | None = None) -> Iterator[str]:
    """Start Orthanc with its own storage and configuration under ``work_dir`` on 127.0.0.1:``port``; yields its base
    URL (DICOMweb at ``<url>/dicom-web``); stopped (SIGTERM, then SIGKILL) when the block ends, whatever happens."""
    exe, plugins = find_orthanc()
    storage = os.path.join(work_dir, "storage")
    os.makedirs(storage, exist_ok=True)
    config_path = os.path.join(work_dir, "orthanc.json")
    with atomic_open(config_path, "w") as f:
        json.dump(orthanc_configuration(storage, port, list(plugins.values())), f, indent=2)
    log_path = log_path or os.path.join(work_dir, "orthanc.log")
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([exe, config_path], cwd=work_dir, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                if proc.poll() is not None:
                    raise OrthancError(f"Orthanc exited ({proc.returncode}):\n{log_tail(log_path, 4000)}")
                try:
                    system = json.loads(_get(f"{url}/system", timeout=2))
                    plugins_loaded = json.loads(_get(f"{url}/plugins", timeout=2))
                    break
                except (urllib.error.URLError, ConnectionError):
                    if time.monotonic() > deadline:
                        raise OrthancError(f"Orthanc did not answer in {START_TIMEOUT_S} s:\n"
                                           f"{log_tail(log_path, 4000)}")
                    time.sleep(0.3)
            missing = {"dicom-web", "gdcm"} - set(plugins_loaded)
            if missing:
                raise OrthancError(f"Orthanc {system.get('Version')} started without its plugin(s) {sorted(missing)}"
                                   f":\n{log_tail(log_path, 4000)}")
            yield url
        finally:
            stop_process_group(proc, timeout=20)


def upload(url: str, paths: Sequence[str]) -> list[dict]:
    """POST each DICOM file to Orthanc's REST API (``/instances``); returns Orthanc's answers (``ID``, ``Status``).
    An answer other than 200 raises, naming the file."""
    answers = []
    for path in paths:
        with open(path, "rb") as f:
            request = urllib.request.Request(f"{url}/instances", data=f.read(), method="POST",
                                             headers={"Content-Type": "application/dicom"})
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                answers.append(json.load(r))
        except urllib.error.HTTPError as e:
            raise OrthancError(f"Orthanc refused {path}: HTTP {e.code} {e.read()[:500]!r}") from e
    return answers


def series_problems(paths: Sequence[str]) -> list[str]:
    """What stops a series on its way through MONAI Label into a DICOM SEG (empty: nothing found). Checked per file:
    the UIDs dcmqi copies into the SEG (study, series, SOP instance, frame of reference: missing or empty ones make
    ``itkimage2segimage`` fail with "Tag not found" / "Invalid Value"), the geometry the volume is built from
    (position, orientation, pixel spacing), one series and one orientation in the folder."""
    import pydicom

    problems, series, orientations, images = [], set(), set(), 0
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if "ImagePositionPatient" not in ds and getattr(ds, "Modality", "") != "CT":
            continue  # not an image slice (e.g. an RTSTRUCT next to the CT): MONAI Label's filter leaves it out
        images += 1
        name = os.path.basename(path)
        for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID",
                    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if key not in ds or ds.get(key) in (None, "") or str(ds.get(key)).strip() == "":
                problems.append(f"{name}: {key} is missing or empty")
        series.add(str(ds.get("SeriesInstanceUID", "")))
        if ds.get("ImageOrientationPatient"):
            orientations.add(tuple(round(float(v), 4) for v in ds.ImageOrientationPatient))
    if images == 0:
        problems.append("no image slices (no CT file with ImagePositionPatient)")
    if len(series) > 1:
        problems.append(f"{len(series)} series in one folder: {sorted(series)}")
    if len(orientations) > 1:
        problems.append(f"slices with {len(orientations)} different orientations: {sorted(orientations)}")
    return problems


#: the lossless transfer syntaxes :func:`lossless_copy` writes: name -> (UID, encoder of one frame)
LOSSLESS = {
    "jpegls": "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless: Orthanc's own DCMTK decodes it
    "jpeg2000": "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless (reversible wavelet): only the GDCM plugin decodes it
}


def _encode(pixels, codec: str) -> bytes:
    import imagecodecs

    if codec == "jpegls":
        return imagecodecs.jpegls_encode(pixels, level=0)
    return imagecodecs.jpeg2k_encode(pixels, level=0, codecformat="J2K", reversible=True, mct=False, numthreads=1)


def lossless_copy(paths: Sequence[str], out_dir: str, codec: str = "jpegls") -> list[str]:
    """Write each uncompressed single-frame DICOM file into ``out_dir`` with its pixels compressed losslessly
    (``codec``: ``jpegls`` or ``jpeg2000``, :data:`LOSSLESS`), everything else unchanged (same UIDs): a compressed copy
    of a public series, as a PACS that stores compressed serves it. Needs ``imagecodecs``; the stream decoded back is
    checked equal to the original pixels before a file is written. Files without pixels (e.g. an RTSTRUCT) are left."""
    import imagecodecs
    import numpy as np
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID

    if codec not in LOSSLESS:
        raise ValueError(f"codec {codec!r}: expected one of {sorted(LOSSLESS)}")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for path in paths:
        ds = pydicom.dcmread(path)
        if "PixelData" not in ds:
            continue
        if ds.file_meta.TransferSyntaxUID.is_compressed or int(ds.get("NumberOfFrames", 1)) != 1:
            raise ValueError(f"{path}: expected an uncompressed single-frame image, got transfer syntax "
                             f"{ds.file_meta.TransferSyntaxUID} with {ds.get('NumberOfFrames', 1)} frame(s)")
        pixels = ds.pixel_array
        stream = _encode(pixels, codec)
        decoder = imagecodecs.jpegls_decode if codec == "jpegls" else imagecodecs.jpeg2k_decode
        if not np.array_equal(decoder(stream), pixels):
            raise ValueError(f"{path}: the {codec} stream does not decode to the same pixels")
        ds.PixelData = encapsulate([stream])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.file_meta.TransferSyntaxUID = UID(LOSSLESS[codec])
        ds.is_little_endian, ds.is_implicit_VR = True, False
        out = os.path.join(out_dir, os.path.basename(path))
        with atomic_open(out, "wb") as f:
            ds.save_as(f, write_like_original=False)
        written.append(out)
    return written


def soak(url: str, times: int) -> tuple[int, str]:
    """Retrieve every CT series of the PACS ``times`` times over WADO-RS as MONAI Label does (no transfer syntax
    asked for, so Orthanc hands out Explicit VR Little Endian, decoding where stored compressed); returns (series
    retrieved, the error that stopped it or ""). How a decoder that fails now and then shows up (docs/pacs.md)."""
    from dicomweb_client.api import DICOMwebClient
    from pydicom.dataset import Dataset

    client = DICOMwebClient(f"{url}/dicom-web")
    done = 0
    try:
        for _ in range(times):
            for found in client.search_for_series(search_filters={"Modality": "CT"}):
                ds = Dataset.from_json(found)
                client.retrieve_series(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))
                done += 1
    except Exception as e:  # noqa: BLE001 (reported, whatever it is)
        return done, f"{type(e).__name__}: {str(e)[:300]}"
    return done, ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run Orthanc + DICOMweb + GDCM on 127.0.0.1 until Ctrl-C")
    serve.add_argument("--storage", required=True, help="folder for its database and files (created)")
    serve.add_argument("--port", type=int, default=8042)
    up = sub.add_parser("upload", help="upload DICOM files")
    up.add_argument("--url", default="http://127.0.0.1:8042")
    up.add_argument("files", nargs="+")
    check = sub.add_parser("check", help="check a series folder before serving it")
    check.add_argument("folder")
    repeat = sub.add_parser("soak", help="retrieve every CT series N times as MONAI Label does")
    repeat.add_argument("--url", default="http://127.0.0.1:8042")
    repeat.add_argument("--times", type=int, default=10)
    args = parser.parse_args(argv)
    if args.command == "serve":
        with running_orthanc(args.storage, args.port) as url:
            print(f"Orthanc at {url}; MONAI Label: --studies {url}/dicom-web (Ctrl-C stops)", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(3600)
        return 0
    if args.command == "upload":
        answers = upload(args.url, args.files)
        print(f"uploaded {len(answers)} file(s) to {args.url}")
        return 0
    if args.command == "soak":
        done, error = soak(args.url, args.times)
        print(f"{done} series retrieved" + (f", then {error}" if error else ""))
        return 1 if error else 0
    files = sorted(p for p in glob.glob(os.path.join(args.folder, "**", "*"), recursive=True) if os.path.isfile(p))
    problems = series_problems(files)
    for p in problems:
        print(p)
    print(f"{args.folder}: {'ready' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
