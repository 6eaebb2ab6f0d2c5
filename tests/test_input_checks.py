"""Bad input stops a bundle before training with one message naming the culprit (hybridmim_components.workflow.input_checks).

Fast tests call :func:`check_datalist` on tiny NIfTI files written with nibabel in tmp dirs; the slow ones drive the
same bad inputs through ``python -m monai.bundle run`` for a pretraining and a finetuning bundle and check that the
run stops (non-zero exit) before any volume is cached, naming the culprit. A small image (smaller than the crop)
must train: the bundles pad it.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from hybridmim_components.workflow.input_checks import DataCheckError, check_contrastive_batch, check_datalist

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLES = os.path.join(REPO_ROOT, "bundles")
SIDE = 16  # voxels per side of the test volumes


# --- writing test data ------------------------------------------------------------------------------------------
AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])  # the grid of every test volume unless a test says otherwise


def _save(path, array, dtype=None, affine=AFFINE):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    array = np.asarray(array, dtype=dtype or array.dtype)
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


def _ct(shape=(SIDE,) * 3, seed=0):
    """int16 HU volume: air around a soft-tissue box (foreground after the CT window)."""
    img = np.full(shape, -1000, np.int16)
    s = tuple(slice(n // 4, n - n // 4) for n in shape)
    img[s] = np.random.default_rng(seed).integers(0, 80, size=img[s].shape)
    return img


def _label(shape=(SIDE,) * 3, classes=3):
    lab = np.zeros(shape, np.uint8)
    for c in range(1, classes):
        lab[2 * c: 2 * c + 3, 4:10, 4:10] = c
    return lab


def _truncate(path, keep=0.5):
    """Cut a .nii.gz: the header still parses, the voxel data ends early."""
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])


def _write_datalist(root, content, name="datalist.json"):
    path = os.path.join(root, name)
    with open(path, "w") as f:
        f.write(content if isinstance(content, str) else json.dumps(content))
    return path


@pytest.fixture
def ct(tmp_path):
    """3 training + 1 validation CT cases (image, 3-class label) and datalist.json; returns the folder."""
    root = str(tmp_path / "ct")
    lists = {"training": [], "validation": []}
    for i in range(4):
        entry = {"image": f"imagesTr/c{i}.nii.gz", "label": f"labelsTr/c{i}.nii.gz"}
        _save(os.path.join(root, entry["image"]), _ct(seed=i))
        _save(os.path.join(root, entry["label"]), _label())
        lists["training" if i < 3 else "validation"].append(entry)
    _write_datalist(root, lists)
    return root


@pytest.fixture
def brats(tmp_path):
    """2 BraTS-like cases (4 modality files, labels 0/1/2/4) and datalist.json; returns the folder."""
    root = str(tmp_path / "brats")
    lists = {"training": [], "validation": []}
    for i in range(2):
        mods = [f"case{i}/case{i}_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair")]
        for m in mods:
            _save(os.path.join(root, m), np.random.default_rng(i).random((SIDE,) * 3, dtype=np.float32))
        lab = _label(classes=3)
        lab[lab == 2] = 4
        _save(os.path.join(root, f"case{i}/case{i}_seg.nii.gz"), lab)
        lists["training" if i == 0 else "validation"].append({"image": mods, "label": f"case{i}/case{i}_seg.nii.gz"})
    _write_datalist(root, lists)
    return root


def _finetune_check(root, **kw):
    kw.setdefault("label_values", range(3))
    return check_datalist(root, "datalist.json", image_channels=kw.pop("image_channels", 1),
                          required_keys=("image", "label"), **kw)


# --- fast: the checker in-process -------------------------------------------------------------------------------
def test_clean_datasets_pass(ct, brats):
    assert _finetune_check(ct) == {"entries": 4, "files": 8}
    assert check_datalist(ct, "datalist.json") == {"entries": 4, "files": 4}  # pretraining: labels not read
    assert _finetune_check(brats, image_channels=4, label_values=(0, 1, 2, 4)) == {"entries": 2, "files": 10}


def test_invalid_json_names_line_and_column(tmp_path):
    _write_datalist(str(tmp_path), '{"training": [\n  {"image": "a.nii.gz"},\n]}')
    with pytest.raises(ValueError, match=r"datalist\.json' is not valid JSON: .*line 3 column 1"):
        check_datalist(str(tmp_path), "datalist.json")


def test_empty_section_named(ct):
    _write_datalist(ct, {"training": [{"image": "imagesTr/c0.nii.gz"}], "validation": []})
    with pytest.raises(ValueError, match=r"key 'validation': the list is empty"):
        check_datalist(ct, "datalist.json")


def test_missing_file_named(ct):
    os.remove(os.path.join(ct, "labelsTr", "c2.nii.gz"))
    with pytest.raises(FileNotFoundError, match=r"key 'training'.*entry 2 'label'.*labelsTr/c2\.nii\.gz"):
        _finetune_check(ct)


def test_truncated_gzip_named_although_its_header_reads(ct):
    path = os.path.join(ct, "imagesTr", "c1.nii.gz")
    _truncate(path)
    assert nib.load(path).shape == (SIDE,) * 3  # only reading the voxels shows the truncation
    with pytest.raises(DataCheckError) as err:
        check_datalist(ct, "datalist.json")
    msg = str(err.value)
    assert "1 problem(s)" in msg and "'training' entry 1 'image'" in msg and path in msg
    assert "truncated or corrupt" in msg and "datalist.json" in msg


def test_corrupt_file_named(ct):
    path = os.path.join(ct, "imagesTr", "c0.nii.gz")
    with open(path, "wb") as f:
        f.write(b"not an image at all" * 10)
    with pytest.raises(DataCheckError, match=r"'training' entry 0 'image' '.*c0\.nii\.gz': cannot read the voxel data"):
        check_datalist(ct, "datalist.json")


def test_every_culprit_reported_with_count(ct):
    _truncate(os.path.join(ct, "imagesTr", "c0.nii.gz"))
    _save(os.path.join(ct, "labelsTr", "c3.nii.gz"), _label(classes=5))  # values 3, 4 outside 0..2
    with pytest.raises(DataCheckError) as err:
        _finetune_check(ct)
    msg = str(err.value)
    assert "2 problem(s) found reading the 8 file(s)" in msg
    assert "'training' entry 0 'image'" in msg and "c0.nii.gz" in msg
    assert "'validation' entry 0 'label'" in msg and "label values [3, 4]" in msg and "classes [0, 1, 2]" in msg


def test_long_lists_of_culprits_are_summarised(tmp_path):
    root = str(tmp_path)
    entries = []
    for i in range(23):
        path = _save(os.path.join(root, f"i{i}.nii.gz"), _ct())
        _truncate(path)
        entries.append({"image": f"i{i}.nii.gz"})
    _write_datalist(root, {"training": entries})
    with pytest.raises(DataCheckError) as err:
        check_datalist(root, "datalist.json", sections=("training",))
    msg = str(err.value)
    assert "23 problem(s)" in msg and "... and 3 more" in msg and "i19.nii.gz" in msg and "i22.nii.gz" not in msg


def test_label_values_outside_the_classes(ct):
    lab = _label()
    lab[0, 0, 0] = 7
    _save(os.path.join(ct, "labelsTr", "c1.nii.gz"), lab)
    with pytest.raises(DataCheckError, match=r"'training' entry 1 'label' .*label values \[7\] \(1 voxels\) are not "
                                             r"among this bundle's classes \[0, 1, 2\]"):
        _finetune_check(ct)


def test_brats_labels_0_1_2_4_and_not_3(brats):
    path = os.path.join(brats, "case1", "case1_seg.nii.gz")
    lab = np.asarray(nib.load(path).dataobj).copy()
    lab[0, 0, 0] = 3
    _save(path, lab)
    with pytest.raises(DataCheckError, match=r"'validation' entry 0 'label'.*values \[3\].*\[0, 1, 2, 4\]"):
        _finetune_check(brats, image_channels=4, label_values=(0, 1, 2, 4))


def test_label_on_another_grid(ct):
    _save(os.path.join(ct, "labelsTr", "c0.nii.gz"), _label(shape=(SIDE, SIDE, SIDE - 2)))
    with pytest.raises(DataCheckError, match=r"entry 0 'label'.*shape \(16, 16, 14\) differs from its image's"):
        _finetune_check(ct)


def test_label_of_the_same_shape_on_a_shifted_grid(ct):
    shifted = AFFINE.copy()
    shifted[:3, 3] = [3.0, 0.0, 0.0]  # two voxels along x: same shape, another place in the patient
    label = _save(os.path.join(ct, "labelsTr", "c1.nii.gz"), _label(), affine=shifted)
    with pytest.raises(DataCheckError) as err:
        _finetune_check(ct)
    message = str(err.value)
    assert "1 problem(s)" in message and "'training' entry 1 'label'" in message
    assert f"'{label}'" in message and f"'{os.path.join(ct, 'imagesTr', 'c1.nii.gz')}'" in message
    # both affines (their first row: 1.5 0 0 and the origins 0 / 3) and the distance of the voxel centres
    assert "[1.5, 0.0, 0.0, 3.0]" in message and "[1.5, 0.0, 0.0, 0.0]" in message and "3 mm" in message


def test_label_on_a_grid_with_another_spacing_or_axis_order(ct):
    _save(os.path.join(ct, "labelsTr", "c0.nii.gz"), _label(), affine=np.diag([1.5, 1.5, 2.5, 1.0]))
    swapped = np.array([[0, 1.5, 0, 0], [1.5, 0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]])  # x and y exchanged
    _save(os.path.join(ct, "labelsTr", "c2.nii.gz"), _label(), affine=swapped)
    with pytest.raises(DataCheckError, match="2 problem") as err:
        _finetune_check(ct)
    assert "'training' entry 0 'label'" in str(err.value) and "'training' entry 2 'label'" in str(err.value)
    # far corner (15, 15, 15): z 15 * 2.5 = 37.5 mm instead of 30 -> 7.5 mm apart
    assert "7.5 mm" in str(err.value)


def test_label_affine_within_the_tolerance_passes(ct):
    nearly = AFFINE.copy()
    nearly[:3, 3] = [2e-4, -2e-4, 1e-4]  # well under 0.001 mm (float noise of another writer)
    _save(os.path.join(ct, "labelsTr", "c0.nii.gz"), _label(), affine=nearly)
    assert _finetune_check(ct) == {"entries": 4, "files": 8}


def test_one_file_for_a_four_modality_bundle(brats):
    _write_datalist(brats, {"training": [{"image": "case0/case0_t1.nii.gz", "label": "case0/case0_seg.nii.gz"}],
                            "validation": [{"image": [f"case1/case1_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair")],
                                            "label": "case1/case1_seg.nii.gz"}]})
    with pytest.raises(DataCheckError, match=r"'training' entry 0 'image' '.*case0_t1\.nii\.gz': 1 channel\(s\) from "
                                             r"1 file\(s\); this bundle's network takes 4"):
        _finetune_check(brats, image_channels=4, label_values=(0, 1, 2, 4))


def test_a_4d_image_for_a_one_channel_bundle(ct):
    _save(os.path.join(ct, "imagesTr", "c2.nii.gz"), np.stack([_ct(), _ct()], axis=-1))
    with pytest.raises(DataCheckError, match=r"'training' entry 2 'image' .*2 channel\(s\) from 1 file\(s\); this "
                                             r"bundle's network takes 1"):
        check_datalist(ct, "datalist.json")


def test_modalities_of_different_shapes(brats):
    _save(os.path.join(brats, "case0", "case0_t2.nii.gz"), np.zeros((SIDE, SIDE, 12), np.float32))
    with pytest.raises(DataCheckError, match=r"'training' entry 0 'image' files of different shapes"):
        check_datalist(brats, "datalist.json", image_channels=4)


def test_nan_and_inf_voxels(ct):
    img = _ct().astype(np.float32)
    img[1, 2, 3], img[4, 5, 6] = np.nan, np.inf
    _save(os.path.join(ct, "imagesTr", "c3.nii.gz"), img)
    with pytest.raises(DataCheckError, match=r"'validation' entry 0 'image' .*c3\.nii\.gz': 2 NaN/inf voxel"):
        check_datalist(ct, "datalist.json")


def test_images_smaller_than_the_crop_are_accepted(tmp_path):
    root = str(tmp_path)
    _save(os.path.join(root, "tiny.nii.gz"), _ct(shape=(6, 7, 5)))
    _write_datalist(root, {"training": ["tiny.nii.gz"], "validation": ["tiny.nii.gz"]})
    assert check_datalist(root, "datalist.json") == {"entries": 2, "files": 2}


def test_check_data_false_skips_the_scan_not_the_datalist(ct):
    _truncate(os.path.join(ct, "imagesTr", "c0.nii.gz"))
    assert check_datalist(ct, "datalist.json", enabled=False) == {"entries": 4, "files": 0}
    os.remove(os.path.join(ct, "imagesTr", "c1.nii.gz"))
    with pytest.raises(FileNotFoundError, match="c1.nii.gz"):
        check_datalist(ct, "datalist.json", enabled=False)


@pytest.mark.parametrize("off", [False, "false", "False", 0])
def test_check_data_false_as_the_cli_passes_it(ct, off):
    _truncate(os.path.join(ct, "imagesTr", "c0.nii.gz"))
    assert check_datalist(ct, "datalist.json", enabled=off)["files"] == 0  # `--check_data false` is the string


def test_check_data_neither_true_nor_false(ct):
    with pytest.raises(ValueError, match=r"check_data must be true or false, got 'maybe'"):
        check_datalist(ct, "datalist.json", enabled="maybe")


def test_only_the_label_fraction_trained_on_is_read(ct):
    from hybridmim_components.workflow.data import fraction_indices

    kept = fraction_indices(3, 1 / 3, seed=0)  # one of the three training cases
    dropped = next(i for i in range(3) if i not in kept)
    _truncate(os.path.join(ct, "imagesTr", f"c{dropped}.nii.gz"))
    assert _finetune_check(ct, label_fraction=1 / 3) == {"entries": 2, "files": 4}
    with pytest.raises(DataCheckError, match=f"c{dropped}.nii.gz"):
        _finetune_check(ct)


@pytest.mark.parametrize("weight,batch,samples,warns", [(0.1, 1, 1, True), (0.1, 2, 1, False), (0.1, 1, 2, False),
                                                        (0.0, 1, 1, False)])
def test_contrastive_term_without_negatives_warns(caplog, weight, batch, samples, warns):
    with caplog.at_level(logging.WARNING, logger="hybridmim_components.workflow.input_checks"):
        assert check_contrastive_batch(weight, batch, samples) is warns
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if warns:
        assert len(messages) == 1 and "exactly 0" in messages[0] and "contrastive_weight=0.1" in messages[0]
    else:
        assert not messages


def test_contrastive_term_is_zero_with_one_crop():
    """Why the warning: with one crop, NT-Xent has a positive and no negatives, -log(1) = 0."""
    import torch

    from hybridmim_components import DropoutContrastiveLoss

    z1, z2 = torch.randn(1, 8), torch.randn(1, 8)
    assert DropoutContrastiveLoss()(z1, z2).item() == 0.0
    assert DropoutContrastiveLoss()(torch.randn(2, 8), torch.randn(2, 8)).item() > 0


# --- slow: the same through the bundles' CLI ----------------------------------------------------------------------
PRETRAIN, FINETUNE = "hybridmim_unet_pretrain", "hybridmim_unet_msd_liver"  # liver: 3 classes
PRETRAIN_BRATS, FINETUNE_BRATS = "hybridmim_unet_pretrain_brats", "hybridmim_unet_brats"
SMALL = ["--features", "[4,4,8,8,16,4]", "--amp", "false", "--train#dataloader#num_workers", "0"]


def _crop(bundle):
    """A 32³ crop (pretraining: with a 16³ reconstructed region)."""
    return ["--roi_size", "[32,32,32]"] + (["--region_size", "[16,16,16]"] if "pretrain" in bundle else [])


def _cli(bundle, root, overrides, timeout=300):
    args = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
            os.path.join(BUNDLES, bundle, "configs", "train.json"), "--bundle_root", os.path.join(BUNDLES, bundle),
            "--dataset_dir", root, "--data_list_file_path", "datalist.json",
            "--ckpt_dir", os.path.join(root, "_models"), "--output_dir", os.path.join(root, "_eval"), *SMALL,
            *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def _bad_json(root):
    _write_datalist(root, '{"training": [\n  {"image": "imagesTr/c0.nii.gz"}\n  {"image": "x"}]}')
    return r"not valid JSON: Expecting ',' delimiter: line 3 column 3"


def _empty_validation(root):
    content = json.load(open(os.path.join(root, "datalist.json")))
    content["validation"] = []
    _write_datalist(root, content)
    return "key 'validation': the list is empty"


def _missing(root):
    os.remove(os.path.join(root, "imagesTr", "c1.nii.gz"))
    return "entry 1 'image': '" + os.path.join(root, "imagesTr", "c1.nii.gz")


def _truncated(root):
    _truncate(os.path.join(root, "imagesTr", "c2.nii.gz"))
    return "'training' entry 2 'image' '" + os.path.join(root, "imagesTr", "c2.nii.gz") + "': cannot read the voxel data"


def _nan(root):
    img = _ct().astype(np.float32)
    img[8, 8, 8] = np.nan  # inside the body (the bundles crop the air away)
    _save(os.path.join(root, "imagesTr", "c3.nii.gz"), img)
    return "'validation' entry 0 'image' '" + os.path.join(root, "imagesTr", "c3.nii.gz") + "': 1 NaN/inf voxel"


def _four_d(root):
    _save(os.path.join(root, "imagesTr", "c0.nii.gz"), np.stack([_ct()] * 3, axis=-1))
    return "'training' entry 0 'image' '" + os.path.join(root, "imagesTr", "c0.nii.gz") + "': 3 channel(s) from 1 file(s)"


def _label_value(root):
    lab = _label()
    lab[0, 0, 0] = 9
    _save(os.path.join(root, "labelsTr", "c1.nii.gz"), lab)
    return "'training' entry 1 'label' '" + os.path.join(root, "labelsTr", "c1.nii.gz") + "': label values [9]"


BAD_INPUTS = {"bad_json": _bad_json, "empty_section": _empty_validation, "missing_file": _missing,
              "truncated_gz": _truncated, "nan_voxels": _nan, "4d_image": _four_d}


def _assert_stopped_before_caching(rc, out, culprit):
    assert rc != 0, out[-3000:]
    assert culprit in out, out[-3000:]
    assert "Loading dataset" not in out, "the check must run before CacheDataset caches anything"


# each bad input once through the CLI, each of the two bundles three times: the check is wired into a bundle's
# ``initialize`` once for all inputs, and every message is checked in process above (a CLI start costs ~10 s)
CLI_BAD_INPUTS = [(PRETRAIN, "bad_json"), (PRETRAIN, "missing_file"), (PRETRAIN, "nan_voxels"),
                  (FINETUNE, "empty_section"), (FINETUNE, "truncated_gz"), (FINETUNE, "4d_image")]
assert sorted(case for _, case in CLI_BAD_INPUTS) == sorted(BAD_INPUTS)


@pytest.mark.slow
@pytest.mark.parametrize("bundle,case", CLI_BAD_INPUTS)
def test_cli_bad_input_stops_before_caching(bundle, case, ct):
    culprit = BAD_INPUTS[case](ct)
    _assert_stopped_before_caching(*_cli(bundle, ct, _crop(bundle)), culprit)


@pytest.mark.slow
def test_cli_finetune_label_outside_classes(ct):
    culprit = _label_value(ct)
    _assert_stopped_before_caching(*_cli(FINETUNE, ct, ["--roi_size", "[32,32,32]"]), culprit)
    culprit = culprit.replace("label values [9]", "label values [2]")  # spleen: classes 0, 1
    _assert_stopped_before_caching(*_cli("hybridmim_unet_msd_spleen", ct, ["--roi_size", "[32,32,32]"]),
                                   culprit.replace("[2]", "[2, 9]"))


@pytest.mark.slow
@pytest.mark.parametrize("bundle", [PRETRAIN_BRATS, FINETUNE_BRATS])
def test_cli_one_file_for_four_modalities(bundle, brats):
    _write_datalist(brats, {"training": [{"image": "case0/case0_flair.nii.gz", "label": "case0/case0_seg.nii.gz"}],
                            "validation": [{"image": [f"case1/case1_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair")],
                                            "label": "case1/case1_seg.nii.gz"}]})
    culprit = "'training' entry 0 'image' '" + os.path.join(brats, "case0", "case0_flair.nii.gz") + \
        "': 1 channel(s) from 1 file(s); this bundle's network takes 4"
    _assert_stopped_before_caching(*_cli(bundle, brats, _crop(bundle)), culprit)


@pytest.mark.slow
def test_cli_crop_not_a_multiple_of_the_sub_volume(ct):
    rc, out = _cli(PRETRAIN, ct, ["--roi_size", "[48,48,48]", "--region_size", "[16,16,16]"])
    _assert_stopped_before_caching(rc, out, "roi_size=(48, 48, 48) must be positive multiples of sub_volume_size=32")
    rc, out = _cli(FINETUNE, ct, ["--roi_size", "[40,40,40]"])
    _assert_stopped_before_caching(rc, out, "roi_size=[40, 40, 40] must be 3 positive multiples of 16")


@pytest.mark.slow
def test_cli_image_smaller_than_the_crop_trains(tmp_path):
    """A 12×10×8 volume (smaller than the 32³ crop in every direction) is padded and trains: not refused."""
    root = str(tmp_path)
    _save(os.path.join(root, "small.nii.gz"), _ct(shape=(12, 10, 8)))
    _write_datalist(root, {"training": ["small.nii.gz"], "validation": ["small.nii.gz"]})
    rc, out = _cli(PRETRAIN, root, ["--roi_size", "[32,32,32]", "--region_size", "[16,16,16]", "--batch_size", "2",
                                    "--samples_per_volume", "1", "--steps_per_epoch", "1",
                                    "--train#trainer#max_epochs", "1", "--validate#dataloader#num_workers", "0"])
    assert rc == 0, out[-3000:]
    assert "check_data: 2 entries (2 files)" in out and "Epoch[1] Complete" in out


@pytest.mark.slow
def test_cli_nan_loss_stops_after_max_nonfinite_steps(ct):
    """NaN voxels with check_data false: every loss is NaN, each step is skipped, the run stops after 2 in a row."""
    _nan(ct)
    _write_datalist(ct, {"training": [{"image": "imagesTr/c3.nii.gz"}], "validation": [{"image": "imagesTr/c3.nii.gz"}]})
    rc, out = _cli(PRETRAIN, ct, ["--roi_size", "[32,32,32]", "--region_size", "[16,16,16]", "--check_data", "false",
                                  "--max_nonfinite_steps", "2", "--steps_per_epoch", "5", "--batch_size", "1",
                                  "--cache_rate", "0", "--train#trainer#max_epochs", "1"])
    assert rc != 0, out[-3000:]
    assert "iteration 1: loss nan; optimizer step skipped (1 in a row" in out
    assert "non-finite (NaN/inf) in 2 iterations in a row (max_nonfinite_steps=2)" in out, out[-3000:]
    assert "iteration 3:" not in out
