"""tools/data/prepare_datalist.py on fake dataset layouts (empty files named as in the real downloads)."""
import json
import os

import pytest

from hybridmim_components.workflow.data import load_datalist
from tools.data import prepare_datalist as prep

BTCV_LABELLED = list(range(1, 11)) + list(range(21, 41))  # the 30 labelled BTCV cases


def _touch(root, *rels):
    for rel in rels:
        path = os.path.join(str(root), rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "wb").close()


def _read(path):
    with open(path) as f:
        return json.load(f)


def _all_paths(content):
    for k in ("training", "validation", "testing"):
        for e in content[k]:
            for v in e.values():
                yield from (v if isinstance(v, list) else [v])


def _btcv(root, cases=BTCV_LABELLED, tests=(61, 62)):
    _touch(root, *[f"imagesTr/img{c:04d}.nii.gz" for c in cases], *[f"labelsTr/label{c:04d}.nii.gz" for c in cases],
           *[f"imagesTs/img{c:04d}.nii.gz" for c in tests])


def test_btcv_swinunetr_split(tmp_path, capsys):
    _btcv(tmp_path)
    path = prep.btcv(str(tmp_path))
    assert path == os.path.join(str(tmp_path), "datalist.json")
    content = _read(path)
    assert [len(content[k]) for k in ("training", "validation", "testing")] == [24, 6, 2]
    assert [e["image"] for e in content["validation"]] == [f"imagesTr/img{c:04d}.nii.gz" for c in range(35, 41)]
    assert content["training"][0] == {"image": "imagesTr/img0001.nii.gz", "label": "labelsTr/label0001.nii.gz"}
    assert content["testing"] == [{"image": "imagesTs/img0061.nii.gz"}, {"image": "imagesTs/img0062.nii.gz"}]
    assert not any(os.path.isabs(p) for p in _all_paths(content))
    assert "training 24, validation 6, testing 2" in capsys.readouterr().out
    assert len(load_datalist(str(tmp_path), "datalist.json", "training", required_keys=("image", "label"))) == 24


def test_btcv_random_split_and_raw_layout(tmp_path):
    cases = [1, 2, 3, 4, 5]
    _touch(tmp_path, *[f"Training/img/img{c:04d}.nii.gz" for c in cases],
           *[f"Training/label/label{c:04d}.nii.gz" for c in cases])
    with pytest.raises(FileNotFoundError, match=r"0035, 0036.*split='random'"):
        prep.btcv(str(tmp_path))
    a = _read(prep.btcv(str(tmp_path), split="random", val_fraction=0.4, seed=1))
    b = _read(prep.btcv(str(tmp_path), split="random", val_fraction=0.4, seed=1, output="again.json"))
    assert a == b and len(a["validation"]) == 2 and len(a["training"]) == 3
    assert a["training"][0]["image"].startswith(os.path.join("Training", "img"))
    assert a["testing"] == [{"image": e["image"]} for e in a["validation"]]  # no test images: validation images


def test_btcv_errors_name_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}.*imagesTr"):
        prep.btcv(str(tmp_path))
    _btcv(tmp_path)
    os.remove(tmp_path / "labelsTr" / "label0003.nii.gz")
    with pytest.raises(FileNotFoundError, match=r"do not pair up.*0003"):
        prep.btcv(str(tmp_path))


def _msd(root, n=10, n_test=3):
    train = [{"image": f"./imagesTr/spleen_{i}.nii.gz", "label": f"./labelsTr/spleen_{i}.nii.gz"} for i in range(n)]
    test = [f"./imagesTs/spleen_{100 + i}.nii.gz" for i in range(n_test)]
    _touch(root, *[e[k] for e in train for k in e], *test, "imagesTr/._spleen_0.nii.gz")
    with open(os.path.join(str(root), "dataset.json"), "w") as f:
        json.dump({"name": "Spleen", "training": train, "test": test, "numTraining": n}, f)


def test_msd_split(tmp_path):
    _msd(tmp_path)
    content = _read(prep.msd(str(tmp_path), val_fraction=0.2, seed=0))
    assert [len(content[k]) for k in ("training", "validation", "testing")] == [8, 2, 3]
    train_imgs = {e["image"] for e in content["training"]}
    val_imgs = {e["image"] for e in content["validation"]}
    assert not train_imgs & val_imgs and len(train_imgs | val_imgs) == 10
    assert all(p.startswith(("imagesTr/", "labelsTr/", "imagesTs/")) for p in _all_paths(content))  # "./" removed
    assert content["testing"][0] == {"image": "imagesTs/spleen_100.nii.gz"}
    assert _read(prep.msd(str(tmp_path), seed=0, output="b.json")) == content  # seeded: reproducible
    other = _read(prep.msd(str(tmp_path), seed=5, output="c.json"))
    assert {e["image"] for e in other["validation"]} != val_imgs
    assert "name" in _read(tmp_path / "dataset.json")  # the MSD file is left alone
    for key in ("training", "validation", "testing"):
        load_datalist(str(tmp_path), "datalist.json", key)


def test_msd_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dataset\.json"):
        prep.msd(str(tmp_path))
    _msd(tmp_path)
    with pytest.raises(ValueError, match="refusing to overwrite"):
        prep.msd(str(tmp_path), output="dataset.json")
    with pytest.raises(ValueError, match="val_fraction"):
        prep.msd(str(tmp_path), val_fraction=1.0)
    os.remove(tmp_path / "labelsTr" / "spleen_4.nii.gz")
    with pytest.raises(FileNotFoundError, match=r"labelsTr/spleen_4\.nii\.gz"):
        prep.msd(str(tmp_path))


def _brats(root, n=5, n_val=2):
    for i in range(1, n + 1):
        case = f"BraTS20_Training_{i:03d}"
        _touch(root, *[f"MICCAI_BraTS2020_TrainingData/{case}/{case}_{s}.nii.gz"
                       for s in ("t1", "t1ce", "t2", "flair", "seg")])
    for i in range(1, n_val + 1):
        case = f"BraTS20_Validation_{i:03d}"
        _touch(root, *[f"MICCAI_BraTS2020_ValidationData/{case}/{case}_{s}.nii.gz"
                       for s in ("t1", "t1ce", "t2", "flair")])
    _touch(root, "MICCAI_BraTS2020_TrainingData/name_mapping.csv")


def test_brats_layout(tmp_path):
    _brats(tmp_path)
    content = _read(prep.brats(str(tmp_path), val_fraction=0.2))
    assert [len(content[k]) for k in ("training", "validation", "testing")] == [4, 1, 2]
    entry = content["training"][0]
    case = "BraTS20_Training_001"
    assert entry["image"] == [f"MICCAI_BraTS2020_TrainingData/{case}/{case}_{m}.nii.gz"
                              for m in ("t1", "t1ce", "t2", "flair")]
    assert entry["label"] == f"MICCAI_BraTS2020_TrainingData/{case}/{case}_seg.nii.gz"
    assert content["testing"][0]["image"][0].startswith("MICCAI_BraTS2020_ValidationData/")
    assert "label" not in content["testing"][0]
    items = load_datalist(str(tmp_path), "datalist.json", "training", required_keys=("image", "label"))
    assert len(items) == 4 and len(items[0]["image"]) == 4


def test_brats_training_folder_itself_and_errors(tmp_path):
    _brats(tmp_path, n_val=0)
    train_dir = str(tmp_path / "MICCAI_BraTS2020_TrainingData")
    content = _read(prep.brats(train_dir, val_fraction=0.4))
    assert len(content["validation"]) == 2
    assert content["training"][0]["image"][0] == "BraTS20_Training_001/BraTS20_Training_001_t1.nii.gz"
    os.remove(os.path.join(train_dir, "BraTS20_Training_003", "BraTS20_Training_003_seg.nii.gz"))
    with pytest.raises(FileNotFoundError, match=r"BraTS20_Training_003: no BraTS20_Training_003_seg\.nii\.gz"):
        prep.brats(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"no case folders.*MICCAI_BraTS2020_TrainingData"):
        os.makedirs(tmp_path / "empty")
        prep.brats(str(tmp_path / "empty"))


def test_pool(tmp_path):
    _touch(tmp_path, *[f"a/scan{i}.nii.gz" for i in range(6)], *[f"b/sub/vol{i}.nii" for i in range(4)],
           "b/labelsTr/x.nii.gz", "b/sub/vol0_seg.nii.gz", "a/notes.txt", "a/._scan0.nii.gz")
    path = prep.pool(str(tmp_path / "a"), str(tmp_path / "b"), val_fraction=0.2, seed=0)
    assert path == os.path.join(str(tmp_path), "datalist.json")  # common parent of the folders
    content = _read(path)
    assert [len(content[k]) for k in ("training", "validation")] == [8, 2]
    paths = set(_all_paths(content))
    assert "b/sub/vol0.nii" in paths and not any("labelsTr" in p or "_seg" in p or "._" in p for p in paths)
    assert all(e.keys() == {"image"} for e in content["training"])
    assert len(load_datalist(str(tmp_path), path, "training")) == 8
    with pytest.raises(FileNotFoundError, match=r"no \*\.nii\.gz"):
        os.makedirs(tmp_path / "c")
        prep.pool(str(tmp_path / "c"))
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        prep.pool(str(tmp_path / "missing_dir"))


def test_split_indices():
    train, val = prep.split_indices(10, 0.2, seed=0)
    assert len(val) == 2 and sorted(train + val) == list(range(10))
    assert prep.split_indices(10, 0.2, seed=0) == (train, val)
    assert len(prep.split_indices(2, 0.01)[1]) == 1
    with pytest.raises(ValueError, match="at least 2"):
        prep.split_indices(1, 0.2)


def _write_bytes(root, rel, data: bytes):
    path = os.path.join(str(root), rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


def test_pool_excludes_downstream_validation_and_testing_cases(tmp_path, capsys):
    # pool: six scans; two are the downstream task's validation/testing images (one by path, one a copy elsewhere)
    for i in range(6):
        _write_bytes(tmp_path, f"pool/scan{i}.nii.gz", f"scan {i}".encode())
    task = tmp_path / "task"
    _write_bytes(task, "imagesTr/train0.nii.gz", b"scan 0")  # a training case of the task: may stay in the pool
    _write_bytes(task, "imagesTs/test0.nii.gz", b"scan 4")  # same bytes as pool/scan4: a copy of a test case
    downstream = {
        "training": [{"image": "imagesTr/train0.nii.gz", "label": "imagesTr/train0.nii.gz"}],
        "validation": [{"image": os.path.join(str(tmp_path), "pool", "scan2.nii.gz"), "label": "x.nii.gz"}],
        "testing": [{"image": "imagesTs/test0.nii.gz"}],
    }
    with open(task / "datalist.json", "w") as f:
        json.dump(downstream, f)
    path = prep.pool(str(tmp_path / "pool"), val_fraction=0.25, seed=0, exclude=[str(task / "datalist.json")])
    content = _read(path)
    paths = set(_all_paths(content))
    assert paths == {f"scan{i}.nii.gz" for i in (0, 1, 3, 5)}, paths
    out = capsys.readouterr().out
    assert "excluded 2" in out and "scan2.nii.gz" in out and "scan4.nii.gz" in out
    # BraTS-style list images are excluded file by file; a missing exclude datalist is named
    downstream["validation"] = [{"image": ["../pool/scan1.nii.gz", "../pool/scan3.nii.gz"]}]
    downstream["testing"] = []
    with open(task / "datalist.json", "w") as f:
        json.dump(downstream, f)
    content = _read(prep.pool(str(tmp_path / "pool"), val_fraction=0.25, exclude=[str(task / "datalist.json")]))
    assert set(_all_paths(content)) == {f"scan{i}.nii.gz" for i in (0, 2, 4, 5)}
    with pytest.raises(FileNotFoundError, match="nope.json"):
        prep.pool(str(tmp_path / "pool"), exclude=[str(task / "nope.json")])


def test_pool_exclude_resolves_like_the_bundles_and_names_an_entry_that_matches_no_file(tmp_path, capsys):
    for i in range(4):
        _write_bytes(tmp_path, f"pool/scan{i}.nii.gz", f"scan {i}".encode())
    task = tmp_path / "task"
    _write_bytes(task, "imagesTs/test0.nii.gz", b"scan 1")  # a copy of pool/scan1
    lists = tmp_path / "lists"  # the datalist lives outside the task's dataset_dir, as a bundle allows
    os.makedirs(lists)
    with open(lists / "task.json", "w") as f:
        json.dump({"training": [{"image": "imagesTs/test0.nii.gz"}], "testing": [{"image": "imagesTs/test0.nii.gz"}]},
                  f)
    # relative entries are relative to the task's dataset_dir, as the bundles resolve them
    content = _read(prep.pool(str(tmp_path / "pool"), val_fraction=0.25, exclude=[str(lists / "task.json")],
                              exclude_dataset_dir=str(task)))
    assert set(_all_paths(content)) == {f"scan{i}.nii.gz" for i in (0, 2, 3)}
    assert "excluded 1" in capsys.readouterr().out
    # without it they resolve against the datalist's folder, where there is no such file: a clear error, not silence
    with pytest.raises(FileNotFoundError, match=r"imagesTs/test0.nii.gz.*exclude_dataset_dir|exclude_dataset_dir.*"
                                                r"imagesTs/test0.nii.gz"):
        prep.pool(str(tmp_path / "pool"), exclude=[str(lists / "task.json")])
