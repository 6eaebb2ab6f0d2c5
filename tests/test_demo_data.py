"""tools/data/make_demo_data.py: readable NIfTI with the promised shapes, spacings, intensities and labels."""
import json
import os

import nibabel as nib
import numpy as np
import pytest

from hybridmim_components.workflow.data import load_datalist
from tools.data.make_demo_data import make_brats_dataset, make_ct_dataset, make_unlabeled_ct_pool, organ_hu


def _load(path):
    img = nib.load(path)
    return img, np.asanyarray(img.dataobj)


def test_ct_dataset_14_classes(tmp_path):
    datalist = make_ct_dataset(str(tmp_path), num_classes=14, shape=(48, 48, 40), spacing=(1.5, 1.5, 2.0))
    assert datalist == os.path.join(str(tmp_path), "dataset.json")
    raw = json.load(open(datalist))
    assert [len(raw[k]) for k in ("training", "validation", "testing")] == [2, 1, 1]
    assert all(not os.path.isabs(e["image"]) for k in ("training", "validation", "testing") for e in raw[k])
    assert raw["testing"][0].keys() == {"image"}

    train = load_datalist(str(tmp_path), "dataset.json", "training", required_keys=("image", "label"))
    load_datalist(str(tmp_path), "dataset.json", "validation", required_keys=("image", "label"))
    load_datalist(str(tmp_path), "dataset.json", "testing")
    for entry in train:
        img, image = _load(entry["image"])
        lab_img, label = _load(entry["label"])
        assert image.shape == label.shape == (48, 48, 40)
        np.testing.assert_allclose(img.header.get_zooms(), (1.5, 1.5, 2.0))
        np.testing.assert_allclose(np.abs(np.diag(img.affine)[:3]), (1.5, 1.5, 2.0))
        assert label.dtype == np.uint8 and lab_img.get_data_dtype() == np.uint8
        assert sorted(np.unique(label)) == list(range(14))  # every organ present
        # air background at the corners, organs inside the volume (not touching the border)
        assert image[0, 0, 0] == -1000 and image[-1, -1, -1] == -1000
        border = np.ones(label.shape, bool)
        border[1:-1, 1:-1, 1:-1] = False
        assert not label[border].any()
        # distinct organ HU, body soft tissue in 0..60 HU on average
        for lab in (1, 7, 13):
            assert abs(image[label == lab].mean() - organ_hu(lab)) < 10
        body = (image > -50) & (image < 100) & (label == 0)
        assert 0 < image[body].mean() < 60


def test_ct_dataset_deterministic_and_unlabeled(tmp_path):
    a = make_ct_dataset(str(tmp_path / "a"), seed=3, n_train=1, n_val=1, n_test=1)
    b = make_ct_dataset(str(tmp_path / "b"), seed=3, n_train=1, n_val=1, n_test=1)
    e_a = load_datalist(os.path.dirname(a), a, "training")[0]
    e_b = load_datalist(os.path.dirname(b), b, "training")[0]
    np.testing.assert_array_equal(_load(e_a["image"])[1], _load(e_b["image"])[1])
    c = make_ct_dataset(str(tmp_path / "c"), with_labels=False)
    assert all(e.keys() == {"image"} for e in load_datalist(str(tmp_path / "c"), c, "training"))
    assert not os.path.exists(tmp_path / "c" / "labelsTr")
    with pytest.raises(ValueError, match="num_classes"):
        make_ct_dataset(str(tmp_path / "d"), num_classes=1)


def test_brats_dataset(tmp_path):
    datalist = make_brats_dataset(str(tmp_path), shape=(48, 48, 48))
    train = load_datalist(str(tmp_path), datalist, "training", required_keys=("image", "label"))
    (test,) = load_datalist(str(tmp_path), datalist, "testing")
    assert len(train) == 2 and "label" not in test and len(test["image"]) == 4
    for entry in train:
        assert [os.path.basename(p).rsplit("_", 1)[1] for p in entry["image"]] == [
            "t1.nii.gz", "t1ce.nii.gz", "t2.nii.gz", "flair.nii.gz"]
        _, label = _load(entry["label"])
        assert label.shape == (48, 48, 48) and label.dtype == np.uint8
        assert sorted(np.unique(label)) == [0, 1, 2, 4]
        vols = [_load(p)[1] for p in entry["image"]]
        brain = vols[0] > 0
        assert all(v.shape == (48, 48, 48) for v in vols)
        assert (vols[0][0, 0, 0], vols[3][-1, -1, -1]) == (0, 0)  # zero background
        assert not label[~brain].any()  # tumour inside the brain
        # nesting: enhancing (4) and necrosis (1) have no background neighbours; t1ce bright in the ring
        core = np.isin(label, (1, 4))
        padded = np.pad(core, 1)
        dilated = core.copy()
        for ax in range(3):
            dilated |= np.roll(padded, 1, ax)[1:-1, 1:-1, 1:-1] | np.roll(padded, -1, ax)[1:-1, 1:-1, 1:-1]
        assert not (dilated & (label == 0)).any()
        assert vols[1][label == 4].mean() > vols[1][label == 2].mean() + 200
        assert vols[3][label == 2].mean() > vols[3][(label == 0) & brain].mean() + 200  # flair edema


def test_unlabeled_pool_has_small_volumes(tmp_path):
    datalist = make_unlabeled_ct_pool(str(tmp_path), n_train=3, n_val=1, shape=(64, 64, 64))
    train = load_datalist(str(tmp_path), datalist, "training")
    val = load_datalist(str(tmp_path), datalist, "validation")
    assert len(train) == 3 and len(val) == 1 and all(e.keys() == {"image"} for e in train + val)
    shapes = [_load(e["image"])[1].shape for e in train + val]
    assert (64, 64, 64) in shapes
    assert any(min(s) < 64 for s in shapes)
