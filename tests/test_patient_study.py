"""The patient study (tools/experiments/patient_study.py): folds never leak a test patient, the paired bootstrap
against hand computations, the metrics on hand-made masks, and the --small preset end to end with resume."""
from __future__ import annotations

import csv
import itertools
import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest

from tools.experiments import folds, paired_stats, patient_study

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _nifti(path, value, shape=(6, 6, 4)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    nib.save(nib.Nifti1Image(np.full(shape, value, np.int16), np.eye(4)), path)
    return path


def _task(tmp_path, entries):
    """A task datalist of ``entries`` = ``[(name, patient or None), ...]``; images differ in content."""
    items = []
    for i, (name, patient) in enumerate(entries):
        item = {"image": _nifti(str(tmp_path / "img" / f"{name}.nii.gz"), i),
                "label": _nifti(str(tmp_path / "lab" / f"{name}.nii.gz"), 1)}
        if patient:
            item["patient"] = patient
        items.append(item)
    path = tmp_path / "task.json"
    path.write_text(json.dumps({"training": items[1:], "validation": items[:1]}))
    return str(path)


def _pool(tmp_path, images, validation=()):
    path = tmp_path / "pool.json"
    path.write_text(json.dumps({"training": [{"image": i} for i in images],
                                "validation": [{"image": i} for i in validation]}))
    return folds.read_pool(str(path))


# ------------------------------------------------------------------------------------------------------- folds
def test_leave_one_out_tests_every_patient_once_and_never_trains_on_it(tmp_path):
    patients = folds.read_patients(_task(tmp_path, [(f"p{i}", None) for i in range(4)]))
    pool = _pool(tmp_path, [_nifti(str(tmp_path / "pool" / "a.nii.gz"), 50)])
    fold_list = folds.build_folds(patients, pool)
    # patients in datalist order (training, then validation), each the test patient of one fold
    assert [[p.id for p in f.test] for f in fold_list] == [["p1"], ["p2"], ["p3"], ["p0"]]
    for fold in fold_list:
        assert not set(fold.test_images) & set(fold.train_images)
        assert len(fold.train) == 3 and not fold.pool_dropped


def test_k_folds_partition_patients_and_keep_a_patients_scans_together(tmp_path):
    task = _task(tmp_path, [("a1", "A"), ("a2", "A"), ("b1", "B"), ("c1", "C"), ("d1", "D"), ("e1", "E")])
    patients = folds.read_patients(task)
    assert sorted(p.id for p in patients) == ["A", "B", "C", "D", "E"]
    assert len(next(p for p in patients if p.id == "A").entries) == 2
    fold_list = folds.build_folds(patients, _pool(tmp_path, [_nifti(str(tmp_path / "q.nii.gz"), 99)]), k=2)
    tested = [p.id for f in fold_list for p in f.test]
    assert sorted(tested) == ["A", "B", "C", "D", "E"]  # each exactly once
    assert sorted(len(f.test) for f in fold_list) == [2, 3]
    for fold in fold_list:
        train_ids = {p.id for p in fold.train}
        assert not train_ids & {p.id for p in fold.test}
        assert not set(fold.test_images) & set(fold.train_images)


def test_the_pool_of_a_fold_loses_its_test_patient_by_path_and_by_copy(tmp_path):
    task = _task(tmp_path, [("p0", None), ("p1", None), ("p2", None)])
    patients = {p.id: p for p in folds.read_patients(task)}
    copy_of_p1 = str(tmp_path / "pool" / "renamed_copy.nii.gz")
    os.makedirs(os.path.dirname(copy_of_p1))
    shutil.copyfile(patients["p1"].images[0], copy_of_p1)
    other = _nifti(str(tmp_path / "pool" / "other.nii.gz"), 77)
    pool = _pool(tmp_path, [patients["p0"].images[0], copy_of_p1, other], validation=[patients["p2"].images[0]])
    fold_list = folds.build_folds(list(patients.values()), pool)
    by_test = {f.test[0].id: f for f in fold_list}
    kept = lambda f: [e["image"] for entries in f.pool.values() for e in entries]  # noqa: E731
    assert by_test["p0"].pool_dropped == [patients["p0"].images[0]]
    assert patients["p0"].images[0] not in kept(by_test["p0"])
    assert by_test["p1"].pool_dropped == [copy_of_p1] and copy_of_p1 not in kept(by_test["p1"])
    assert by_test["p2"].pool_dropped == [patients["p2"].images[0]] and by_test["p2"].pool["validation"] == []
    # the training patients' images may stay in the pool (unlabelled use is allowed)
    assert patients["p0"].images[0] in kept(by_test["p1"])
    # the written datalists agree
    task_path, pool_path = folds.write_fold_datalists(by_test["p1"], str(tmp_path / "fold"), shared_pool=False)
    written_task, written_pool = (json.loads(open(p).read()) for p in (task_path, pool_path))
    assert [e["image"] for e in written_task["testing"]] == patients["p1"].images
    assert all(e["image"] != patients["p1"].images[0] for e in written_task["training"] + written_task["validation"])
    assert copy_of_p1 not in [e["image"] for e in written_pool["training"]]


def test_distinct_files_with_one_name_are_distinct_patients_unless_a_patient_key_joins_them(tmp_path):
    entries = []
    for i, folder in enumerate(("a", "b", "c")):  # three different scans, all called ct.nii.gz
        entries.append({"image": _nifti(str(tmp_path / folder / "ct.nii.gz"), i),
                        "label": _nifti(str(tmp_path / folder / "gtv.nii.gz"), 1)})
    entries[2]["patient"] = "P"
    entries.append({"image": _nifti(str(tmp_path / "d" / "ct.nii.gz"), 3),
                    "label": _nifti(str(tmp_path / "d" / "gtv.nii.gz"), 1), "patient": "P"})
    path = tmp_path / "task.json"
    path.write_text(json.dumps({"training": entries}))
    patients = folds.read_patients(str(path))
    assert len(patients) == 3 and len({p.id for p in patients}) == 3  # a, b, and P (c + d)
    by_image = {i: p.id for p in patients for i in p.images}
    assert by_image[entries[0]["image"]] != by_image[entries[1]["image"]]
    assert by_image[entries[2]["image"]] == by_image[entries[3]["image"]] == "P"
    assert "a" in by_image[entries[0]["image"]] and "b" in by_image[entries[1]["image"]]  # ids say which file


def test_the_same_scan_saved_as_nii_and_nii_gz_is_caught_by_voxels_and_affine(tmp_path):
    task = _task(tmp_path, [("p0", None), ("p1", None), ("p2", None)])
    patients = {p.id: p for p in folds.read_patients(task)}
    as_nii = str(tmp_path / "pool" / "p1_resaved.nii")  # other bytes (uncompressed), same voxels and affine
    os.makedirs(os.path.dirname(as_nii))
    nib.save(nib.load(patients["p1"].images[0]), as_nii)
    assert open(as_nii, "rb").read() != open(patients["p1"].images[0], "rb").read()
    moved = nib.load(patients["p2"].images[0])  # same voxels, other affine: another scan
    shifted = str(tmp_path / "pool" / "p2_shifted.nii.gz")
    affine = moved.affine.copy()
    affine[0, 3] += 5.0
    nib.save(nib.Nifti1Image(np.asarray(moved.dataobj), affine), shifted)
    fold_list = folds.build_folds(list(patients.values()), _pool(tmp_path, [as_nii, shifted]))
    by_test = {f.test[0].id: f for f in fold_list}
    assert by_test["p1"].pool_dropped == [as_nii]
    assert by_test["p2"].pool_dropped == []
    leaked = folds.Fold(0, [patients["p0"], folds.Patient("copy", [{"image": as_nii, "label": as_nii}])],
                        [patients["p1"]], {"training": []}, [])
    with pytest.raises(folds.FoldError, match="p1_resaved.nii"):
        folds.check_no_leak(leaked)


def test_check_no_leak_refuses_a_test_image_in_training_or_pool(tmp_path):
    task = _task(tmp_path, [("p0", None), ("p1", None)])
    by_id = {p.id: p for p in folds.read_patients(task)}
    p0, p1 = by_id["p0"], by_id["p1"]
    leaked_train = folds.Fold(0, [p0, p1], [p1], {"training": []}, [])
    with pytest.raises(folds.FoldError, match="p1.nii.gz is also in the training"):
        folds.check_no_leak(leaked_train)
    leaked_pool = folds.Fold(0, [p0], [p1], {"training": [{"image": p1.images[0]}]}, [])
    with pytest.raises(folds.FoldError, match="pretraining pool"):
        folds.check_no_leak(leaked_pool)


def test_bad_fold_counts_and_an_emptied_pool_are_clear_errors(tmp_path):
    task = _task(tmp_path, [("p0", None), ("p1", None), ("p2", None)])
    patients = folds.read_patients(task)
    for k in (1, 4):
        with pytest.raises(folds.FoldError, match=f"--folds {k}: expected 2 to 3"):
            folds.make_folds([p.id for p in patients], k)
    pool = _pool(tmp_path, [patients[0].images[0]])  # the only pool image belongs to the first test patient
    with pytest.raises(folds.FoldError, match="nothing is left in the pretraining pool"):
        folds.build_folds(patients, pool)


# --------------------------------------------------------------------------------------------------- bootstrap
def test_exact_bootstrap_of_a_hand_computable_case():
    # differences (0, 0, 3): a resample's mean is k where k ~ Binomial(3, 1/3) draws of the 3, so
    # P(mean = 0, 1, 2, 3) = 8/27, 12/27, 6/27, 1/27; CDF 0.296, 0.741, 0.963, 1. The 2.5 % quantile is 0, the
    # 97.5 % quantile is 3 (the CDF first reaches 0.975 at 3).
    ci = paired_stats.paired_bootstrap_ci([0.0, 0.0, 3.0])
    assert ci == {"mean": 1.0, "low": 0.0, "high": 3.0, "n": 3, "method": "exact"}
    # at the 50 % level the quantiles are 25 % -> 0 and 75 % -> 2 (0.741 < 0.75 <= 0.963)
    half = paired_stats.paired_bootstrap_ci([0.0, 0.0, 3.0], level=0.5)
    assert (half["low"], half["high"]) == (0.0, 2.0)
    # (0, 1): means 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4
    assert paired_stats.paired_bootstrap_ci([0.0, 1.0], level=0.4)[("low")] == 0.5
    assert paired_stats.paired_bootstrap_ci([0.2, 0.2, 0.2, 0.2]) == pytest.approx(
        {"mean": 0.2, "low": 0.2, "high": 0.2, "n": 4, "method": "exact"})


def test_exact_bootstrap_equals_brute_force_over_all_ordered_resamples():
    d = np.array([0.31, -0.12, 0.05, 0.44])
    means = np.array([d[list(idx)].mean() for idx in itertools.product(range(4), repeat=4)])  # all 256 resamples
    low, high = np.quantile(means, [0.025, 0.975], method="inverted_cdf")
    ci = paired_stats.paired_bootstrap_ci(d)
    assert ci["low"] == pytest.approx(low) and ci["high"] == pytest.approx(high)
    assert ci["mean"] == pytest.approx(d.mean())


def test_monte_carlo_bootstrap_above_the_exact_limit_is_seeded_and_inside_the_data_range():
    d = np.linspace(-0.2, 0.4, paired_stats.EXACT_MAX_N + 2)
    a = paired_stats.paired_bootstrap_ci(d, seed=3)
    assert a == paired_stats.paired_bootstrap_ci(d, seed=3)
    assert a["method"].startswith("monte carlo")
    assert d.min() < a["low"] < a["mean"] < a["high"] < d.max()


def test_exact_sign_flip_p_values_of_hand_computable_cases():
    # 4 differences of one sign: only "all +" and "all -" reach |sum| = 1.0 of the 16 sign flips: p = 2/16
    t = paired_stats.sign_flip_test([0.1, 0.2, 0.3, 0.4])
    assert t["p"] == pytest.approx(2 / 16) and t["min_p"] == pytest.approx(2 / 16) and t["method"] == "exact"
    # (1, -1, 2, 3): |sum| = 5; of the 16 sums +-1 +-1 +-2 +-3 only 7, 5, 5 and their negatives reach 5: p = 6/16
    assert paired_stats.sign_flip_test([1.0, -1.0, 2.0, 3.0])["p"] == pytest.approx(6 / 16)
    # 6 of one sign: 2/64
    six = paired_stats.sign_flip_test([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    assert six["p"] == pytest.approx(2 / 64) and six["min_p"] == pytest.approx(2 / 64) and six["n"] == 6
    # all zero: every flip is as extreme, p = 1
    assert paired_stats.sign_flip_test([0.0, 0.0, 0.0])["p"] == 1.0


def test_monte_carlo_sign_flip_above_the_exact_limit_is_seeded():
    n = paired_stats.SIGN_FLIP_EXACT_MAX_N + 4
    d = np.linspace(0.1, 0.5, n)
    a = paired_stats.sign_flip_test(d, seed=3)
    assert a == paired_stats.sign_flip_test(d, seed=3) and a["method"].startswith("monte carlo")
    assert a["min_p"] == pytest.approx(2 / 2 ** n)
    assert a["p"] < 0.01  # every difference positive: almost no flip reaches the observed sum
    balanced = paired_stats.sign_flip_test(np.r_[d, -d], seed=3)  # mean exactly 0: p = 1
    assert balanced["p"] == 1.0


def test_verdict_says_helped_or_hurt_only_when_interval_and_sign_flip_agree():
    same_sign = [0.1, 0.2, 0.3, 0.4]
    ci = paired_stats.paired_bootstrap_ci(same_sign)
    assert ci["low"] > 0  # the percentile interval excludes 0 ...
    four = paired_stats.verdict(ci, paired_stats.sign_flip_test(same_sign), "Dice", True)
    assert four.startswith("no clear difference") and "0.125" in four  # ... but p = 2/16 cannot reach 5 %
    six = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    helped = paired_stats.verdict(paired_stats.paired_bootstrap_ci(six), paired_stats.sign_flip_test(six), "Dice",
                                  True)
    assert helped.startswith("pretraining helped") and "0.031" in helped
    worse = [-x for x in six]
    hurt = paired_stats.verdict(paired_stats.paired_bootstrap_ci(worse), paired_stats.sign_flip_test(worse), "Dice",
                                True)
    assert hurt.startswith("pretraining hurt")
    hd = paired_stats.verdict(paired_stats.paired_bootstrap_ci(six), paired_stats.sign_flip_test(six), "HD95", False)
    assert hd.startswith("pretraining hurt")  # higher HD95 is worse
    mixed = [0.2, -0.1, 0.05, -0.3]
    unclear = paired_stats.verdict(paired_stats.paired_bootstrap_ci(mixed), paired_stats.sign_flip_test(mixed), "Dice",
                                   True)
    assert unclear.startswith("no clear difference") and "lower on average" in unclear


def test_the_report_writes_p_and_the_smallest_p_beside_the_interval(tmp_path):
    diffs = {"dice": {"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4}, "hd95_mm": {"a": 1.0, "b": -1.0, "c": 2.0, "d": 3.0}}
    rows = patient_study.paired_results(diffs, "label")
    dice, hd = rows
    assert dice["mean"] == pytest.approx(0.25) and dice["ci_low"] > 0  # interval excludes 0 ...
    assert dice["sign_flip_p"] == pytest.approx(2 / 16) and dice["sign_flip_min_p"] == pytest.approx(2 / 16)
    assert dice["verdict"].startswith("no clear difference")  # ... the test cannot reach 5 % with 4 patients
    assert hd["sign_flip_p"] == pytest.approx(6 / 16)
    table = patient_study.paired_table(rows)
    assert "sign-flip p" in table and "smallest possible p" in table and "| 0.125 | 0.125 |" in table
    path = patient_study.tables.write_csv(str(tmp_path / "paired.csv"), rows, patient_study.PAIRED_COLUMNS)
    written = _read_csv(path)
    assert [r["metric"] for r in written] == ["dice", "hd95_mm"]
    assert float(written[0]["sign_flip_p"]) == pytest.approx(0.125)
    assert float(written[1]["sign_flip_min_p"]) == pytest.approx(0.125)


def test_the_committed_reports_verdict_follows_from_its_own_per_patient_numbers():
    # Dice differences of docs/experiments/patient_study: +0.041, -0.042, +0.016, +0.027, |sum| 0.042. In
    # thousandths, with +41 fixed (the other half is the negation): 41 +-42 +-16 +-27 = 126, 72, 94, 40, 42, -12, 10,
    # -44; |sum| >= 42 for 126, 72, 94, 42 and -44: 5 of 8, so 10 of 16: p = 0.625
    d = [0.041, -0.042, 0.016, 0.027]
    assert paired_stats.sign_flip_test(d)["p"] == pytest.approx(10 / 16)
    md = open(os.path.join(os.path.dirname(__file__), "..", "docs", "experiments", "patient_study",
                           "patient_study.md"), encoding="utf-8").read()
    dice_row = next(line for line in md.splitlines() if line.startswith("| Dice (higher is better)"))
    assert "| 0.625 | 0.125 | no clear difference" in dice_row and "pretraining helped" not in md


# ----------------------------------------------------------------------------------------------------- metrics
def test_dice_and_hd95_in_mm_on_hand_made_masks():
    truth = np.zeros((10, 10, 10), np.uint8)
    pred = np.zeros_like(truth)
    truth[4, 4, 2] = 1
    pred[4, 4, 4] = 1  # two slices away, slices 3 mm apart: every surface distance is 6 mm
    m = paired_stats.segmentation_metrics(pred, truth, (1.0, 1.0, 3.0))
    assert m["dice"] == 0.0 and m["hd95_mm"] == pytest.approx(6.0) and not m["empty"]
    truth[2:6, 2:6, 2:6] = 1  # 64 voxels
    pred[:] = 0
    pred[2:6, 2:6, 2:4] = 1  # 32 voxels, all inside
    m = paired_stats.segmentation_metrics(pred, truth, (1.0, 1.0, 1.0))
    assert m["dice"] == pytest.approx(2 * 32 / (32 + 64))
    empty = paired_stats.segmentation_metrics(np.zeros_like(truth), truth, (1.0, 2.0, 3.0))
    assert empty["empty"] and empty["dice"] == 0.0
    assert empty["hd95_mm"] == pytest.approx(np.sqrt(10 ** 2 + 20 ** 2 + 30 ** 2))


# ------------------------------------------------------------------------------------------------ predictions
def _fake_inference(predictions):
    """Stands in for ``run_stage``: writes ``{file name: mask}`` into the inference's output folder."""
    def run(title, command, log_path, total_steps=None):
        out = command[command.index("--output_dir") + 1]
        os.makedirs(out, exist_ok=True)
        for name, mask in predictions.items():
            nib.save(nib.Nifti1Image(mask.astype(np.uint8), np.eye(4)), os.path.join(out, name))
        return 1.0
    return run


def _inference(tmp_path, monkeypatch, names, test_names, predictions):
    items = {n: {"image": _nifti(str(tmp_path / "img" / f"{n}.nii.gz"), i),
                 "label": _nifti(str(tmp_path / "lab" / f"{n}.nii.gz"), 1)} for i, n in enumerate(names)}
    patients = [folds.Patient(n, [items[n]]) for n in names]
    fold = folds.Fold(0, [p for p in patients if p.id not in test_names],
                      [p for p in patients if p.id in test_names], {"training": []}, [])
    args = patient_study.parse_args(["--small", "--out_dir", str(tmp_path / "out")])
    task, _ = folds.write_fold_datalists(fold, str(tmp_path / "fold"), shared_pool=True)
    checkpoint = _nifti(str(tmp_path / "ckpt.nii.gz"), 0)
    monkeypatch.setattr(patient_study.runner, "run_stage", _fake_inference(predictions))
    runs = patient_study.runner.Runs(str(tmp_path / "out"))
    return patient_study.run_inference(args, runs, "infer", fold, task, checkpoint)


def test_a_prediction_is_found_by_its_exact_name_not_by_prefix(tmp_path, monkeypatch):
    full, empty = np.ones((6, 6, 4)), np.zeros((6, 6, 4))
    # pat_1 tested, only pat_10's prediction there: pat_1 must not be scored on it
    with pytest.raises(patient_study.runner.ExperimentError, match="pat_1_seg.nii.gz"):
        _inference(tmp_path / "a", monkeypatch, ["pat_1", "pat_10", "pat_2"], ["pat_1"],
                   {"pat_10_seg.nii.gz": empty})
    # both tested: each is scored on its own prediction (label all 1: Dice 1 for a full mask, 0 for an empty one)
    result = _inference(tmp_path / "b", monkeypatch, ["pat_1", "pat_10", "pat_2"], ["pat_1", "pat_10"],
                        {"pat_10_seg.nii.gz": empty, "pat_1_seg.nii.gz": full})
    assert result["patients"]["pat_1"]["dice"] == 1.0 and result["patients"]["pat_10"]["dice"] == 0.0


def test_two_test_scans_with_one_file_name_in_a_fold_are_refused_before_inference(tmp_path):
    a = folds.Patient("a/ct.nii.gz", [{"image": _nifti(str(tmp_path / "a" / "ct.nii.gz"), 1), "label": "x"}])
    b = folds.Patient("b/ct.nii.gz", [{"image": _nifti(str(tmp_path / "b" / "ct.nii.gz"), 2), "label": "y"}])
    fold = folds.Fold(3, [], [a, b], {"training": []}, [])
    args = patient_study.parse_args(["--small", "--out_dir", str(tmp_path / "out")])
    with pytest.raises(patient_study.runner.ExperimentError, match="fold 3: .*a/ct.nii.gz and .*b/ct.nii.gz"):
        patient_study.run_inference(args, patient_study.runner.Runs(str(tmp_path / "out")), "i", fold, "t.json", "c")


# ------------------------------------------------------------------------------------------------ end to end
def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_small_preset_end_to_end_with_a_leaking_pool_and_resume(tmp_path, capsys):
    from tools.data.make_demo_data import make_ct_dataset, make_unlabeled_ct_pool

    task = make_ct_dataset(str(tmp_path / "task"), num_classes=2, shape=(40, 40, 32), spacing=(3.0, 3.0, 3.0),
                           n_train=2, n_val=1, n_test=0, seed=0)
    pool = make_unlabeled_ct_pool(str(tmp_path / "pool"), n_train=1, n_val=1, n_test=0, shape=(40, 40, 32),
                                  spacing=(3.0, 3.0, 3.0), seed=1)
    # the user's pool also holds a copy of one task patient: each fold must pretrain without its test patient
    content = json.loads(open(pool).read())
    task_images = [e["image"] for e in json.loads(open(task).read())["training"]]
    shutil.copyfile(os.path.join(os.path.dirname(task), task_images[0]), str(tmp_path / "pool" / "copy.nii.gz"))
    content["training"].append({"image": "copy.nii.gz"})
    with open(pool, "w") as f:
        json.dump(content, f)
    out = tmp_path / "out"
    argv = ["--small", "--task", task, "--pool", pool, "--folds", "2", "--out_dir", str(out)]
    assert patient_study.main(argv) == 0

    rows = _read_csv(out / "patient_study_runs.csv")
    assert sorted((r["patient"], r["arm"]) for r in rows) == sorted(
        (p, a) for p in ("ct_000", "ct_001", "ct_002") for a in ("pretrained", "scratch"))
    for row in rows:
        assert 0.0 <= float(row["dice"]) <= 1.0 and float(row["hd95_mm"]) >= 0.0
    # one pretraining per fold, and none of them saw its fold's test patient (copy included)
    for fold in (0, 1):
        fold_dir = out / "folds" / f"fold{fold}"
        tested = {os.path.basename(e["image"]) for e in json.loads((fold_dir / "task.json").read_text())["testing"]}
        trained = {os.path.basename(e["image"]) for e in json.loads((fold_dir / "task.json").read_text())["training"]}
        pooled = json.loads((fold_dir / "pool.json").read_text())["training"]
        assert tested and not tested & trained
        if "ct_000.nii.gz" in tested:
            assert all(not e["image"].endswith("copy.nii.gz") for e in pooled)
        assert (out / "runs" / f"fold{fold}_pretrain" / "models" / "model.pt").is_file()
    # predictions are in each scan's original geometry
    result = json.loads((out / "runs" / "fold0_pretrained_seed0_infer" / "result.json").read_text())["result"]
    for patient in result["patients"].values():
        pred = nib.load(patient["predictions"][0])
        truth = nib.load(str(tmp_path / "task" / "labelsTr" / os.path.basename(patient["predictions"][0])
                             .replace("_seg", "")))
        assert pred.shape == truth.shape and np.allclose(pred.affine, truth.affine)
    summary = _read_csv(out / "patient_study.csv")
    assert len(summary) == 6 and all(r["provenance"].startswith("small preset") for r in summary)
    md = (out / "patient_study.md").read_text()
    paired = _read_csv(out / "patient_study_paired.csv")
    assert [r["n_patients"] for r in paired] == ["3", "3"] and float(paired[0]["sign_flip_min_p"]) == 0.25
    assert "95 % bootstrap interval" in md and "sign-flip p" in md and ("pretraining helped" in md or "pretraining hurt" in md
                                                or "no clear difference" in md)
    for png in ("patient_study_dice.png", "patient_study_overlay.png"):
        assert (out / png).read_bytes()[:8] == PNG_SIGNATURE

    # a rerun skips every finished run and writes the same table
    before = (out / "patient_study_runs.csv").read_text()
    capsys.readouterr()
    assert patient_study.main(argv) == 0
    printed = capsys.readouterr().out
    # 2 pretrainings; 2 folds x 2 arms x (finetune, inference)
    assert printed.count("finished earlier, skipped") == 2 + 2 * 2 * 2
    assert (out / "patient_study_runs.csv").read_text().replace("\r", "").split("\n")[1:] == \
        before.replace("\r", "").split("\n")[1:]


# ------------------------------------------------------------------------------------------------- presets
def test_paper_preset_overrides_only_paths_seeds_device_and_the_no_selection_rule(tmp_path):
    args = patient_study.parse_args(["--task", "t.json", "--pool", "p.json", "--out_dir", str(tmp_path)])
    assert args.preset == "paper" and args.device == "cuda" and args.seed_list == [0, 1, 2]
    pre = patient_study.pretrain_overrides(args, str(tmp_path / "pre"), str(tmp_path / "pool.json"))
    index = patient_study.validation_handler_index(args.pretrain_bundle)
    assert set(pre) == {"dataset_dir", "data_list_file_path", "ckpt_dir", "output_dir", "device", "amp", "seed",
                        f"train#handlers#{index}#exec_at_start"}
    default_epochs = patient_study.runner.bundle_default(args.finetune_bundle, "train#trainer#max_epochs")
    epochs = patient_study.finetune_epochs(args, n_train_cases=3)
    assert epochs == default_epochs  # the bundle's own schedule
    ft = patient_study.finetune_overrides(args, str(tmp_path / "ft"), str(tmp_path / "task.json"), None, 2, epochs)
    assert ft["val_interval"] == epochs + 1  # never validates: nothing is selected on the test patient
    assert ft["seed"] == 2 and ft["pretrained_path"] == ""
    for key in ("pixdim", "features", "roi_size", "learning_rate", "num_samples", "warmup_epochs"):
        assert key not in ft and key not in pre


def test_cpu_preset_is_the_default_without_task_and_spreads_steps_over_cases(tmp_path):
    args = patient_study.parse_args(["--out_dir", str(tmp_path)])
    assert args.preset == "cpu" and args.device == "cpu"
    assert patient_study.finetune_epochs(args, n_train_cases=3) == -(-args.finetune_steps // 3)
    small = patient_study.parse_args(["--small", "--seeds", "2"])
    assert small.preset == "small" and small.seed_list == [0, 1]


def test_cuda_requested_without_a_gpu_fails_before_any_download(tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    called = []
    monkeypatch.setattr(patient_study, "prepare_data", lambda args: called.append(args))
    assert patient_study.main(["--device", "cuda", "--out_dir", str(tmp_path)]) == 1
    assert not called
    assert "--device cuda: no CUDA device" in capsys.readouterr().err
