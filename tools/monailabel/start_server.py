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
"""
from __future__ import annotations

import glob
import importlib.util
import os
import sys

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


def main(argv: list[str] | None = None) -> None:
    declare_missing_torchvision_ops()
    from monailabel.main import Main

    sys.argv = ["monailabel", *(sys.argv[1:] if argv is None else argv)]
    Main().run()


if __name__ == "__main__":
    main()
