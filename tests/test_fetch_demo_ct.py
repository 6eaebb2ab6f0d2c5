"""tools/data/fetch_demo_ct.py: class mapping, hash check, registry errors, and the files and datalists it writes.

The fast tests build a miniature TotalSegmentator source distribution (same member paths, a class table written
here, small volumes); one slow test downloads the real one from PyPI and checks the mapping against its table.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import tarfile

import nibabel as nib
import numpy as np
import pytest

from tools.data import fetch_demo_ct as demo

# the TotalSegmentator v2 "total" ids of the 13 BTCV organs, read by hand from map_to_binary.py of 2.18.0
REAL_TOTAL_IDS = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "gallbladder": 4, "liver": 5, "stomach": 6,
                  "pancreas": 7, "adrenal_gland_right": 8, "adrenal_gland_left": 9, "esophagus": 15, "aorta": 52,
                  "inferior_vena_cava": 63, "portal_vein_and_splenic_vein": 64}
BTCV_ORDER = ["spleen", "kidney_right", "kidney_left", "gallbladder", "esophagus", "liver", "stomach", "aorta",
              "inferior_vena_cava", "portal_vein_and_splenic_vein", "pancreas", "adrenal_gland_right",
              "adrenal_gland_left"]


def _nifti_bytes(array: np.ndarray, affine: np.ndarray) -> bytes:
    return gzip.compress(nib.Nifti1Image(array, affine).to_bytes())


def _class_table_source(total: dict[int, str]) -> str:
    # the layout of the real file: a dict of tasks, an older task first
    return "class_map = {\n    'total_v1': {1: 'spleen', 7: 'aorta'},\n    'total': %r,\n}\n" % (total,)


def make_fake_sdist(path: str, n_ct: int = 12, n_labelled: int = 30, n_aorta: int = 70) -> dict:
    """A tar.gz with the members the tool reads; returns what was put in it."""
    rng = np.random.default_rng(0)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    ct = rng.integers(-1000, 1000, size=(6, 5, n_ct + n_labelled)).astype(np.int16)
    labelled = ct[:, :, n_ct:]
    seg = np.zeros(labelled.shape, np.uint8)
    seg[0, 0, :] = 1  # spleen in every slice
    seg[1, 1, :] = 52  # aorta
    seg[2, 2, :] = 10  # a lung lobe: not a BTCV organ, must become 0
    seg[3, 3, :] = 15  # esophagus
    aorta = rng.integers(-1000, 1000, size=(4, 4, n_aorta)).astype(np.int16)
    table = {10: "lung_upper_lobe_left", **{v: k for k, v in REAL_TOTAL_IDS.items()}}
    members = {
        "ct": _nifti_bytes(ct, affine),
        "ct_labelled": _nifti_bytes(labelled, affine),
        "seg": _nifti_bytes(seg, affine),
        "aorta_ct": _nifti_bytes(aorta, np.diag([1.5, 1.5, 1.5, 1.0])),
        "class_table": _class_table_source(table).encode(),
        "license": b"Apache License 2.0 (test)",
    }
    with tarfile.open(path, "w:gz") as tar:
        for key, data in members.items():
            info = tarfile.TarInfo(demo.MEMBERS[key])
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return {"ct": ct, "seg": seg, "aorta": aorta, "table": table}


def add_build_trap(path: str, root: str, marker) -> None:
    """Rewrite the tar.gz at ``path`` with a ``setup.py`` and an in-tree build backend under ``root/`` that both
    write ``marker`` when run: any tool that builds the sdist (e.g. ``pip download`` reading its metadata) runs them."""
    trap = f"open({str(marker)!r}, 'w').write('ran')\n"
    extra = {
        f"{root}/pyproject.toml": '[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n',
        f"{root}/backend.py": trap,
        f"{root}/setup.py": trap,
        f"{root}/PKG-INFO": "Metadata-Version: 2.1\nName: {}\nVersion: {}\n".format(*root.rsplit("-", 1)),
    }
    with tarfile.open(path, "r:gz") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    with tarfile.open(path, "w:gz") as tar:
        for name, data in {**members, **{k: v.encode() for k, v in extra.items()}}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def local_index_at(root, monkeypatch):
    """A PEP 503 simple index in the folder ``root`` (``file://``), set as the only index for pip and for
    tools/data/pypi_archive.py; returns ``add(package, file)``, which lists a file on it."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", root.as_uri())
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)

    def add(package: str, file: str) -> None:
        folder = root / package
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / os.path.basename(file)
        if not target.exists():
            os.link(file, target)
        links = "".join(f'<a href="{name}">{name}</a><br/>\n' for name in sorted(os.listdir(folder))
                        if name != "index.html")
        (folder / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{links}</body></html>\n")

    return add


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    return local_index_at(tmp_path / "simple", monkeypatch)


@pytest.fixture
def trapped_sdist(tmp_path, local_index):
    """``(sdist, marker)``: a fake TotalSegmentator sdist on the local index whose build backend would write ``marker``."""
    sdist = str(tmp_path / "served" / demo.SDIST_FILE)
    os.makedirs(os.path.dirname(sdist))
    make_fake_sdist(sdist)
    marker = tmp_path / "build_backend_ran"
    add_build_trap(sdist, f"{demo.SDIST_NAME}-{demo.SDIST_VERSION}", marker)
    local_index(demo.SDIST_NAME, sdist)
    return sdist, marker


def test_tampered_sdist_is_refused_before_any_of_its_code_runs(tmp_path, trapped_sdist):
    """An sdist whose hash is not the pinned one is deleted unopened: its setup.py / build backend never run."""
    sdist, marker = trapped_sdist
    cache = tmp_path / "cache"
    with pytest.raises(demo.DemoDataError) as err:
        demo.fetch_sdist(cache_dir=str(cache))  # the real distribution's hash is expected
    message = str(err.value)
    assert demo.SDIST_FILE in message and demo.SDIST_SHA256 in message and demo.sha256_of(sdist) in message
    assert not marker.exists()
    assert not cache.exists() or os.listdir(cache) == []  # nothing unverified is kept for the next run


def test_verified_sdist_is_downloaded_into_the_cache_without_building_it(tmp_path, trapped_sdist):
    sdist, marker = trapped_sdist
    cache = tmp_path / "cache"
    path = demo.fetch_sdist(cache_dir=str(cache), expected_sha256=demo.sha256_of(sdist))
    assert path == str(cache / demo.SDIST_FILE) and demo.sha256_of(path) == demo.sha256_of(sdist)
    assert os.listdir(cache) == [demo.SDIST_FILE]
    demo.prepare(str(tmp_path / "data"), cache_dir=str(cache), expected_sha256=demo.sha256_of(sdist))
    assert not marker.exists()


def test_file_missing_from_the_index_names_the_file_and_the_index(tmp_path, local_index):
    other = tmp_path / "totalsegmentator-2.17.0.tar.gz"
    make_fake_sdist(str(other))
    local_index(demo.SDIST_NAME, str(other))
    with pytest.raises(demo.DemoDataError, match="could not download totalsegmentator==2.18.0.*--sdist") as err:
        demo.fetch_sdist(cache_dir=str(tmp_path / "cache"))
    assert demo.SDIST_FILE in str(err.value) and (tmp_path / "simple").as_uri() in str(err.value)


def test_read_class_table_parses_without_importing():
    source = _class_table_source({1: "spleen", 52: "aorta"}) + "import does_not_exist\n"
    assert demo.read_class_table(source) == {1: "spleen", 52: "aorta"}
    assert demo.read_class_table(source, "total_v1") == {1: "spleen", 7: "aorta"}
    with pytest.raises(demo.DemoDataError, match="no task 'total_mr'"):
        demo.read_class_table(source, "total_mr")


def test_label_mapping_by_name_and_relabelling():
    table = {v: k for k, v in REAL_TOTAL_IDS.items()}
    mapping = demo.label_mapping(table, demo.BTCV_FROM_TOTALSEGMENTATOR)
    # BTCV label k is the k-th organ of the BTCV order, whatever TotalSegmentator's id is
    assert mapping == {REAL_TOTAL_IDS[name]: k for k, name in enumerate(BTCV_ORDER, start=1)}
    seg = np.array([0, 1, 52, 10, 64, 15, 200], dtype=np.uint8)
    assert demo.map_labels(seg, mapping).tolist() == [0, 1, 8, 0, 10, 5, 0]
    assert demo.map_labels(seg, demo.label_mapping(table, {1: "spleen"})).tolist() == [0, 1, 0, 0, 0, 0, 0]
    with pytest.raises(demo.DemoDataError, match="no class named \\['aorta'\\]"):
        demo.label_mapping({1: "spleen"}, {1: "spleen", 2: "aorta"})


def test_prepare_writes_split_volumes_labels_and_datalists(tmp_path):
    sdist = str(tmp_path / demo.SDIST_FILE)
    fake = make_fake_sdist(sdist)
    out = tmp_path / "data"
    paths = demo.prepare(str(out), sdist=sdist, expected_sha256=demo.sha256_of(sdist))
    assert set(paths) == {"btcv", "spleen", "pool"}
    n_ct = fake["ct"].shape[2] - fake["seg"].shape[2]
    train = nib.load(out / "images/abdomen_train.nii.gz")
    val = nib.load(out / "images/abdomen_val.nii.gz")
    np.testing.assert_array_equal(np.asarray(train.dataobj), fake["ct"][:, :, n_ct:n_ct + demo.TRAIN_SLICES])
    np.testing.assert_array_equal(np.asarray(val.dataobj), fake["ct"][:, :, n_ct + demo.TRAIN_SLICES:])
    # the slabs keep their place in patient space: origin moved by 3 mm per slice
    assert train.affine[2, 3] == pytest.approx(3.0 * n_ct)
    assert val.affine[2, 3] == pytest.approx(3.0 * (n_ct + demo.TRAIN_SLICES))
    btcv = np.asarray(nib.load(out / "labels/btcv_val.nii.gz").dataobj)
    assert btcv[0, 0, 0] == 1 and btcv[1, 1, 0] == 8 and btcv[2, 2, 0] == 0 and btcv[3, 3, 0] == 5
    assert set(np.unique(np.asarray(nib.load(out / "labels/spleen_train.nii.gz").dataobj))) == {0, 1}
    pool_lower = np.asarray(nib.load(out / "images/pool_lower_body.nii.gz").dataobj)
    np.testing.assert_array_equal(pool_lower, fake["ct"][:, :, :n_ct])
    top = np.asarray(nib.load(out / "images/pool_aorta_ct_top.nii.gz").dataobj)
    assert top.shape[2] == demo.POOL_VAL_SLICES
    # no leakage: the finetune validation image is never in the pretraining pool
    pool = json.loads((out / "datalist_pool.json").read_text())
    spleen = json.loads((out / "datalist_spleen.json").read_text())
    val_images = {e["image"] for e in spleen["validation"]}
    assert val_images.isdisjoint(e["image"] for e in pool["training"] + pool["validation"])
    for datalist in (pool, spleen):
        for section in datalist.values():
            for entry in section:
                for key in ("image", "label"):
                    assert key not in entry or (out / entry[key]).is_file()


def test_wrong_hash_names_both_hashes(tmp_path):
    sdist = str(tmp_path / demo.SDIST_FILE)
    make_fake_sdist(sdist)
    with pytest.raises(demo.DemoDataError) as err:
        demo.fetch_sdist(sdist=sdist)  # the real distribution's hash is expected
    assert demo.SDIST_SHA256 in str(err.value) and demo.sha256_of(sdist) in str(err.value)


def test_unreachable_registry_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(demo.DemoDataError, match="could not download totalsegmentator==2.18.0.*--sdist"):
        demo.fetch_sdist(cache_dir=str(tmp_path / "cache"))
    assert demo.main(["--out_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache")]) == 1


@pytest.mark.slow
def test_real_distribution_class_table(tmp_path):
    """Download the real source distribution (PyPI), check its hash, and map with its own class table."""
    cache = os.environ.get("HYBRIDMIM_CACHE") or str(tmp_path / "cache")
    sdist = demo.fetch_sdist(cache_dir=cache)
    with tarfile.open(sdist) as tar:
        table = demo.read_class_table(tar.extractfile(demo.MEMBERS["class_table"]).read().decode())
    mapping = demo.label_mapping(table, demo.BTCV_FROM_TOTALSEGMENTATOR)
    assert mapping == {REAL_TOTAL_IDS[name]: k for k, name in enumerate(BTCV_ORDER, start=1)}
    out = tmp_path / "data"
    demo.prepare(str(out), sdist=sdist)
    labels = np.asarray(nib.load(out / "labels/btcv_train.nii.gz").dataobj)
    # the real scan's upper abdomen shows spleen, both kidneys and the liver
    assert {1, 2, 3, 6} <= set(np.unique(labels).tolist()) <= set(range(14))
