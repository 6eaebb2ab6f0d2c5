"""hybridmim-components as a release: one version (``__version__``), read by setup.cfg without importing torch, named
by every bundle and by CHANGELOG.md; the wheel and sdist carry LICENSE, README.md and CHANGELOG.md and no tests,
bundles or tools. (CI's release step also builds both in isolation and runs ``twine check``.)"""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLES_DIR = os.path.join(REPO_ROOT, "bundles")
DIST_NAME = "hybridmim-components"
DOC_FILES = ("LICENSE", "README.md", "CHANGELOG.md")


def _package_version() -> str:
    """``__version__`` as written in hybridmim_components/__init__.py (read, not imported)."""
    with open(os.path.join(REPO_ROOT, "hybridmim_components", "__init__.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("no __version__ in hybridmim_components/__init__.py")


def test_version_is_semantic_and_the_next_release():
    version = _package_version()
    assert re.fullmatch(r"\d+\.\d+\.\d+", version), version
    assert tuple(int(p) for p in version.split(".")) >= (0, 2, 0), version


def test_setup_cfg_reads_the_version_statically_without_torch():
    """``version = attr: hybridmim_components.__version__``, resolved by setuptools from the source: a build
    environment has no torch, so an import of the package there would fail. torch (and monai) are made
    unimportable in the child process to prove it."""
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['monai'] = None\n"
        "from setuptools.config.setupcfg import read_configuration\n"
        "meta = read_configuration('setup.cfg')['metadata']\n"
        "print(meta['version'])\n"
        "assert 'hybridmim_components' not in sys.modules, 'the package was imported'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == _package_version()


def test_changelog_has_the_version_in_keep_a_changelog_form():
    with open(os.path.join(REPO_ROOT, "CHANGELOG.md"), encoding="utf-8") as f:
        text = f.read()
    headings = re.findall(r"^## \[(\d+\.\d+\.\d+)\] - (\d{4}-\d{2}-\d{2})$", text, flags=re.M)
    versions = [v for v, _ in headings]
    assert versions and versions[0] == _package_version(), headings  # newest first
    assert versions[-1] == "0.1.0", headings


def test_license_is_the_apache_2_text():
    with open(os.path.join(REPO_ROOT, "LICENSE"), encoding="utf-8") as f:
        text = f.read()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_every_bundle_requires_this_package_version():
    """The bundles import hybridmim_components: their metadata must say which release (the model zoo's CI turns each
    entry into ``pip install name==version``, so a bare version, not a specifier)."""
    version = _package_version()
    names = sorted(d for d in os.listdir(BUNDLES_DIR) if os.path.isfile(os.path.join(BUNDLES_DIR, d, "configs",
                                                                                           "metadata.json")))
    assert len(names) == 12, names
    for name in names:
        with open(os.path.join(BUNDLES_DIR, name, "configs", "metadata.json"), encoding="utf-8") as f:
            meta = json.load(f)
        assert meta["required_packages_version"].get(DIST_NAME) == version, (name, meta["required_packages_version"])
        assert meta["version"] in meta["changelog"], name
        assert meta["version"] == version, name


def _build(tmp: str) -> tuple[str, str]:
    """sdist, then the wheel from the sdist (as ``python -m build`` does), built with this environment's setuptools
    (no download) from a copy of the files a source release starts from, so nothing is written into the checkout."""
    pytest.importorskip("build")
    src, outdir = os.path.join(tmp, "src"), os.path.join(tmp, "dist")
    shutil.copytree(os.path.join(REPO_ROOT, "hybridmim_components"), os.path.join(src, "hybridmim_components"),
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("setup.cfg", "pyproject.toml", "MANIFEST.in", *DOC_FILES):
        shutil.copy2(os.path.join(REPO_ROOT, name), src)
    os.makedirs(os.path.join(src, "tests"))
    shutil.copy2(os.path.abspath(__file__), os.path.join(src, "tests"))  # setuptools' default would include it
    out = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", outdir, src],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    files = sorted(os.listdir(outdir))
    wheels = [f for f in files if f.endswith(".whl")]
    sdists = [f for f in files if f.endswith(".tar.gz")]
    assert len(wheels) == 1 and len(sdists) == 1, files
    return os.path.join(outdir, sdists[0]), os.path.join(outdir, wheels[0])


def test_wheel_and_sdist_carry_the_documents_and_only_the_package(tmp_path):
    version = _package_version()
    sdist, wheel = _build(str(tmp_path))
    assert os.path.basename(wheel).startswith(f"hybridmim_components-{version}-"), wheel

    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        dist_info = f"hybridmim_components-{version}.dist-info"
        metadata = zf.read(f"{dist_info}/METADATA").decode()
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {"hybridmim_components", dist_info}, sorted(tops)  # no tests/, bundles/, tools/
    for doc in DOC_FILES:
        assert f"{dist_info}/licenses/{doc}" in names, (doc, [n for n in names if n.startswith(dist_info)])
    assert f"Version: {version}" in metadata
    assert "Description-Content-Type: text/markdown" in metadata

    with tarfile.open(sdist) as tf:
        members = [m.name.split("/", 1)[1] for m in tf.getmembers() if "/" in m.name]
    for doc in DOC_FILES:
        assert doc in members, (doc, sorted(members)[:40])
    # the tests need the repository's bundles and tools: a source release is the package and its documents
    assert not [m for m in members if m.split("/", 1)[0] in ("tests", "bundles", "tools")], sorted(members)[:40]
