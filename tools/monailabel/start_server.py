"""``monailabel`` on a CPU-only torch: the same command line as MONAI Label's ``monailabel``, e.g.

    python tools/monailabel/start_server.py start_server --app apps/monaibundle --studies <images> \\
        --conf models <bundle> --conf zoo_source local --host 127.0.0.1 --port 8000

Why this wrapper exists: MONAI Label 0.8.5 imports ``torchvision.utils`` (``make_grid``, ``save_image``; pure Python)
for its post-transforms. PyPI has only the CUDA build of torchvision (0.28.0 for torch 2.13); next to the CPU build of
torch its C++ library does not load (it links ``libc10_cuda.so``), torchvision carries on without its operators, but
``torchvision/_meta_registrations.py`` then registers fake kernels for ``torchvision::nms`` and ``torchvision::qnms`` unconditionally and
the import fails with ``RuntimeError: operator torchvision::nms does not exist``. Declaring the schemas of those two
operators first (only when the library cannot load) lets the import succeed; the detection operators stay unavailable,
which neither MONAI Label's ``monaibundle`` app nor the HybridMIM bundles use. With a CUDA torch (what pip installs
for ``pip install monailabel``) the wrapper does nothing beyond running ``monailabel.main``.

With ``--studies`` a DICOMweb URL (a PACS, ``docs/pacs.md``), the wrapper also puts this environment's scripts folder
on PATH and requires dcmqi's ``itkimage2segimage`` there (:func:`dcmqi_on_path`), instead of MONAI Label's download of
it from GitHub at start-up.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import sys
import sysconfig

import torch


def declare_missing_torchvision_ops() -> bool:
    """Declare ``torchvision::nms`` and ``qnms`` when torchvision's C++ library cannot be loaded; True if it was declared."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    libraries = glob.glob(os.path.join(spec.submodule_search_locations[0], "_C*.so"))
    try:
        if libraries:
            torch.ops.load_library(libraries[0])
            return False
    except (OSError, ImportError):
        pass
    if hasattr(torch.ops.torchvision, "nms"):
        return False
    # the schemas torchvision's own library registers (torchvision/csrc/ops/nms.cpp, quantized/cpu/qnms_kernel.cpp)
    for name in ("nms", "qnms"):
        torch.library.define(f"torchvision::{name}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return True


def dcmqi_on_path(argv: list[str]) -> str | None:
    """Make dcmqi's ``itkimage2segimage`` (``pip install dcmqi``) findable and require it when ``--studies`` is a
    DICOMweb URL; returns its path (None when the studies are a folder).

    MONAI Label converts a label saved to a PACS into DICOM SEG with that tool; when ``shutil.which`` does not find it,
    it downloads dcmqi 1.2.4 from GitHub at start-up and dies on a network without GitHub. pip puts the tool into the
    environment's scripts folder, which is on PATH only in an activated environment: it is added here, so that
    ``.venv/bin/python start_server.py ...`` finds it too. Without it the server stops here, naming the package."""
    scripts = sysconfig.get_path("scripts")
    spec = importlib.util.find_spec("dcmqi")
    # dcmqi's wheel keeps the executables in its package (dcmqi/bin); the scripts folder has Python launchers of them
    package_bin = os.path.join(spec.submodule_search_locations[0], "bin") if spec and spec.submodule_search_locations else ""
    for folder in (scripts, package_bin):
        if folder and os.path.isdir(folder) and folder not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = folder + os.pathsep + os.environ.get("PATH", "")
    studies = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--studies", "-s")), "")
    if not studies.startswith(("http://", "https://")):
        return None
    tool = shutil.which("itkimage2segimage")
    if tool is None:
        sys.exit(f"--studies {studies} is a DICOMweb server: saving a label there as DICOM SEG needs dcmqi's "
                 f"itkimage2segimage, which is not on PATH nor in {scripts}. Install it with `pip install "
                 f"dcmqi==1.5.7` (tools/monailabel/requirements.txt) into this environment ({sys.prefix}); "
                 f"without it MONAI Label would try to download dcmqi from GitHub.")
    return tool


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    declare_missing_torchvision_ops()
    dcmqi_on_path(argv)
    from monailabel.main import Main

    sys.argv = ["monailabel", *argv]
    Main().run()


if __name__ == "__main__":
    main()
