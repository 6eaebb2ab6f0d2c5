"""A Python whose only install of this project is the wheel built from the checkout (tests of shared bundles).

``wheel_python(work)`` builds the wheel (``pip wheel --no-deps`` from a copy of the package's files, so the checkout
gets no ``build/``), makes a venv without pip, installs the wheel into it (not editable) and makes the test
environment's packages (torch, MONAI, MONAI Label, ...) visible through a plain path line in a ``.pth`` file: a path
line adds the folder to ``sys.path`` without processing that folder's own ``.pth`` files, so the checkout's editable
install is not loaded there. Asserted: ``hybridmim_components`` comes from the venv, and the checkout's ``tools`` are
not importable. Commands run with it must not set ``PYTHONPATH`` and should run outside the checkout.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import sysconfig

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# what the wheel is built from
PACKAGE_FILES = ("setup.cfg", "pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md", "MANIFEST.in",
                 "hybridmim_components")


def clean_env() -> dict:
    """This process's environment without ``PYTHONPATH`` (nothing of the checkout on the path)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    env.pop("BUNDLE_DOWNLOAD_SRC", None)
    return env


def _run(args: list[str], cwd: str, what: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{what} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}"
    return proc


def wheel_python(work: str) -> str:
    """Build the wheel and the venv under ``work``; returns the venv's ``python``."""
    src = os.path.join(work, "src")
    os.makedirs(src)
    for name in PACKAGE_FILES:
        path = os.path.join(REPO_ROOT, name)
        if os.path.isdir(path):
            shutil.copytree(path, os.path.join(src, name), ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif os.path.isfile(path):
            shutil.copy(path, os.path.join(src, name))
    dist = os.path.join(work, "dist")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, src], work,
         "pip wheel")
    (wheel,) = glob.glob(os.path.join(dist, "hybridmim_components-*.whl"))
    venv = os.path.join(work, "venv")
    _run([sys.executable, "-m", "venv", "--without-pip", venv], work, "venv")
    python = os.path.join(venv, "bin", "python")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", wheel], work,
         "pip install the wheel")
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], work, "site").stdout
    with open(os.path.join(site.strip(), "test_environment.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    found = _run([python, "-c", "import hybridmim_components as h; print(h.__file__)"], work, "import").stdout
    assert found.startswith(venv), f"hybridmim_components imported from {found.strip()}, not from the wheel in {venv}"
    checkout = subprocess.run([python, "-c", "import tools.bundles"], cwd=work, env=clean_env(), capture_output=True,
                              text=True)
    assert "ModuleNotFoundError" in checkout.stderr, "the checkout's tools/ must not be importable from the wheel venv"
    return python
