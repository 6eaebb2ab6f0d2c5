"""The experiment commands (tools/experiments): aggregation, outputs, presets, resume; end to end on tiny settings."""
from __future__ import annotations

import csv
import json
import math
import os

import pytest

from tools.experiments import label_efficiency, loss_ablation, runner, settings, tables

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY = ["--features", "[4,4,8,8,16,4]", "--pretrain_steps", "2", "--finetune_steps", "2"]


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def assert_png(path):
    import matplotlib.image

    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


# ------------------------------------------------------------------------------------------------ aggregation
def test_aggregate_mean_and_sample_std_per_fraction_match_hand_computation():
    rows = [
        {"arm": "pretrained", "label_fraction": 0.2, "dice": 0.5},
        {"arm": "scratch", "label_fraction": 0.2, "dice": 0.4},
        {"arm": "pretrained", "label_fraction": 0.2, "dice": 0.7},
        {"arm": "pretrained", "label_fraction": 0.2, "dice": 0.9},
        {"arm": "pretrained", "label_fraction": 1.0, "dice": 0.8},
        {"arm": "pretrained", "label_fraction": 1.0, "dice": 0.6},
    ]
    out = tables.aggregate(rows, ["arm", "label_fraction"], "dice")
    assert [(r["arm"], r["label_fraction"], r["n"]) for r in out] == [
        ("pretrained", 0.2, 3), ("scratch", 0.2, 1), ("pretrained", 1.0, 2)]
    # (0.5, 0.7, 0.9): mean 0.7, squared deviations 0.04 + 0 + 0.04 over n - 1 = 2 -> std 0.2
    assert out[0]["dice_mean"] == pytest.approx(0.7) and out[0]["dice_std"] == pytest.approx(0.2)
    # (0.8, 0.6): mean 0.7, (0.01 + 0.01) / 1 -> std sqrt(0.02)
    assert out[2]["dice_mean"] == pytest.approx(0.7) and out[2]["dice_std"] == pytest.approx(math.sqrt(0.02))
    assert out[1]["dice_mean"] == pytest.approx(0.4) and math.isnan(out[1]["dice_std"])  # one run: spread unknown


def test_aggregate_groups_list_values_and_formats_mean_std():
    rows = [{"region": [48, 48, 16], "dice": 0.25}, {"region": [48, 48, 16], "dice": 0.75}]
    (out,) = tables.aggregate(rows, ["region"], "dice")
    assert out["region"] == [48, 48, 16] and out["dice_mean"] == 0.5
    assert tables.mean_std(0.5, out["dice_std"]) == "0.500 ± 0.354"
    assert tables.mean_std(0.8123, float("nan")) == "0.812 (n=1)"


def test_write_csv_keeps_the_given_columns_in_order_and_writes_triples_as_text(tmp_path):
    path = tables.write_csv(str(tmp_path / "t.csv"), [{"b": 2, "a": [64, 64, 32], "ignored": 1}], ["a", "b"])
    with open(path, encoding="utf-8") as f:
        assert f.read() == "a,b\n64x64x32,2\n"
    assert not [p for p in os.listdir(tmp_path) if ".part" in p or ".tmp" in p]


def test_step_times_are_intervals_between_consecutive_iteration_lines_of_one_epoch():
    lines = [
        "2026-11-23 21:54:03,552 - INFO - Epoch: 1/2, Iter: 1/3 -- train_loss: 1.2",
        "Iteration: [1/3] 33%|###, loss=1.2 [00:00<?]2026-11-23 21:54:04,052 - INFO - Epoch: 1/2, Iter: 2/3 -- x",
        "2026-11-23 21:54:04,302 - some.logger - INFO - unrelated line",
        "2026-11-23 21:54:05,302 - INFO - Epoch: 1/2, Iter: 3/3 -- train_loss: 1.0",
        "2026-11-23 21:54:30,000 - INFO - Epoch: 2/2, Iter: 1/3 -- (after validation: not a step interval)",
        "2026-11-23 21:54:30,700 - INFO - Epoch: 2/2, Iter: 2/3 -- train_loss: 0.9",
        "2026-11-23 21:54:40,000 - INFO - Epoch: 2/2, Iter: 1/3 -- (a restart: not consecutive)",
    ]
    assert runner.step_times(lines) == pytest.approx([0.5, 1.25, 0.7])


def test_median_step_time_leaves_out_the_first_warm_up_interval(tmp_path):
    log = tmp_path / "run.log"
    stamps = ["00:00:00,000", "00:00:05,000", "00:00:05,500", "00:00:06,200", "00:00:06,800"]  # 5.0, 0.5, 0.7, 0.6
    log.write_text("".join(f"2026-01-01 {t} - INFO - Epoch: 1/1, Iter: {i + 1}/5 --\n" for i, t in enumerate(stamps)))
    assert runner.median_step_time(str(log)) == pytest.approx(0.6)  # median of 0.5, 0.7, 0.6
    log.write_text("".join(f"2026-01-01 {t} - INFO - Epoch: 1/1, Iter: {i + 1}/2 --\n"
                           for i, t in enumerate(stamps[:2])))
    assert runner.median_step_time(str(log)) == pytest.approx(5.0)  # one interval: all there is


# -------------------------------------------------------------------------------------------------- presets
def test_small_label_efficiency_uses_the_demo_preset_equal_steps_and_labels_data_as_synthetic(tmp_path):
    args = label_efficiency.parse_args(["--small", "--out_dir", str(tmp_path)])
    note = runner.prepare_data(args)
    assert "SYNTHETIC" in note and "not the paper's result" in runner.provenance(args, True)
    assert [runner.training_cases(args, f) for f in (0.2, 0.6, 1.0)] == [1, 3, 5]
    one = runner.finetune_overrides(args, str(tmp_path / "r"), None, seed=7, label_fraction=0.2)
    five = runner.finetune_overrides(args, str(tmp_path / "r"), "/w/model.pt", seed=7, label_fraction=1.0)
    # 80 steps either way: 80 epochs of 1 case, 16 epochs of 5 cases; one validation, at the end
    assert (one["train#trainer#max_epochs"], five["train#trainer#max_epochs"]) == (80, 16)
    assert one["val_interval"] == 80 and five["val_interval"] == 16
    assert one["pretrained_path"] == "" and five["pretrained_path"] == "/w/model.pt"
    assert (five["seed"], five["label_fraction"], five["pixdim"], five["roi_size"]) == (7, 1.0, [3.0] * 3, [64, 64, 32])
    assert five["features"] == [8, 8, 16, 32, 64, 8] and five["amp"] is False
    pre = runner.pretrain_overrides(args, str(tmp_path / "p"), 0, {"mask_ratio": 0.6})
    assert pre["mask_ratio"] == 0.6 and pre["sub_volume_size"] == 16 and pre["data_list_file_path"] == "dataset.json"
    assert pre["steps_per_epoch"] * pre["train#trainer#max_epochs"] == 60


def test_paper_scale_preset_overrides_only_paths_seed_fraction_and_device(tmp_path):
    data = tmp_path / "data"
    from tools.data.make_demo_data import make_ct_dataset

    make_ct_dataset(str(data), n_train=5, n_val=1, n_test=0)
    args = label_efficiency.parse_args(["--out_dir", str(tmp_path / "out"), "--dataset_dir", str(data),
                                        "--datalist", "dataset.json", "--pool_dir", str(data),
                                        "--pool_datalist", "dataset.json"])
    runner.prepare_data(args)
    assert (args.device, args.fractions, args.seeds) == ("cuda", [0.2, 0.4, 0.6, 0.8, 1.0], [0, 1, 2])
    ft = runner.finetune_overrides(args, "/r", "/w/model.pt", 1, 0.4)
    assert set(ft) == {"dataset_dir", "data_list_file_path", "ckpt_dir", "output_dir", "pretrained_path", "seed",
                       "label_fraction", "device", "amp"}
    assert ft["device"] == "$torch.device('cuda')" and ft["amp"] is True
    assert "paper-scale settings on your data" in runner.provenance(args, False)
    pre = runner.pretrain_overrides(args, "/p", 0)
    assert set(pre) == {"dataset_dir", "data_list_file_path", "ckpt_dir", "output_dir", "seed", "device", "amp"}


def test_loss_ablation_switches_terms_on_cumulatively_with_the_bundle_weights():
    args = loss_ablation.parse_args(["--small"])
    weights = {name: loss_ablation.loss_weights(args, terms) for name, terms in loss_ablation.ROWS.items() if terms}
    assert weights["rec"] == {"loss#reconstruction_weight": 1.0, "loss#number_weight": 0.0,
                              "loss#location_weight": 0.0, "loss#consistency_weight": 0.0,
                              "loss#contrastive_weight": 0.0}
    assert weights["rec+num+loc+cons"]["loss#consistency_weight"] == 0.01
    assert weights["rec+num+loc+cons"]["loss#contrastive_weight"] == 0.0
    assert list(weights["all"].values()) == [1.0, 0.1, 0.1, 0.01, 0.1]
    on = [sum(v > 0 for v in weights[n].values()) for n in ("rec", "rec+num", "rec+num+loc", "rec+num+loc+cons", "all")]
    assert on == [1, 2, 3, 4, 5]


def test_settings_vary_one_axis_at_a_time_and_paper_scale_lists_follow_the_crop():
    args = settings.parse_args([])
    assert args.region_sizes == [[128] * 3, [96] * 3, [64] * 3] and args.sub_volume_sizes == [64, 32, 16]
    small = settings.parse_args(["--small"])
    base = {"mask_ratio": 0.4, "region_size": [48, 48, 16], "sub_volume_size": 16}
    grid = settings.settings_grid(base, small)
    names = [settings.slug(s) for _, _, s in grid]
    assert len(grid) == 6 and len(set(names)) == 5  # the base appears on both axes, pretrained once
    assert {"mr0.2_rs48x48x16_sv16", "mr0.4_rs32x32x16_sv16", "mr0.4_rs64x64x32_sv16"} <= set(names)
    assert all(s["patch_size"] == s["sub_volume_size"] // 2 for _, _, s in grid)


# ---------------------------------------------------------------------------------------------------- plots
def test_plots_are_valid_pngs(tmp_path):
    nan = float("nan")
    le = [{"arm": a, "label_fraction": f, "dice_mean": d, "dice_std": s}
          for a, f, d, s in [("pretrained", 0.2, 0.5, 0.1), ("pretrained", 1.0, 0.8, nan), ("scratch", 0.2, 0.4, 0.05),
                             ("scratch", 1.0, 0.7, 0.02)]]
    assert_png(label_efficiency.plot(str(tmp_path / "le.png"), le, "t"))
    ab = [{"losses": "supervised (from scratch)", "dice_mean": 0.5, "dice_std": nan},
          {"losses": "L_rec + L_num", "dice_mean": 0.6, "dice_std": 0.1}]
    assert_png(loss_ablation.plot(str(tmp_path / "ab.png"), ab, "t"))
    st = [{"axis": "mask_ratio", "value": v, "dice_mean": 0.5, "dice_std": nan, "pretrain_step_s": 0.3,
           "scratch_dice_mean": 0.4} for v in (0.2, 0.4)]
    st += [{"axis": "region_size", "value": "48x48x16", "dice_mean": 0.6, "dice_std": 0.01, "pretrain_step_s": 0.2,
            "scratch_dice_mean": 0.4}]
    assert_png(settings.plot(str(tmp_path / "st.png"), st, "t"))


# --------------------------------------------------------------------------------------------------- resume
class FakeBundle:
    """Stands in for ``run_stage``: writes what a bundle would (scalars, model.pt, log) and counts the runs."""

    def __init__(self):
        self.titles = []
        self.model_bytes = b""  # what a pretraining writes as model.pt

    def __call__(self, title, command, log_path, total_steps=None):
        from torch.utils.tensorboard import SummaryWriter

        self.titles.append(title)
        value = {command[i]: command[i + 1] for i in range(len(command) - 1) if command[i].startswith("--")}
        writer = SummaryWriter(log_dir=value["--output_dir"])
        if "pretrain" in value["--bundle_root"]:
            os.makedirs(value["--ckpt_dir"])
            with open(os.path.join(value["--ckpt_dir"], "model.pt"), "wb") as f:
                f.write(self.model_bytes)
            writer.add_scalar("val_recon_mse", 0.01, 1)
        else:  # a Dice that depends on the run: seed and fraction
            writer.add_scalar("val_mean_dice", int(value["--seed"]) / 10 + float(value["--label_fraction"]) / 4, 1)
        writer.close()
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        with open(log_path, "w", encoding="utf-8") as f:
            f.write("2026-01-01 00:00:00,000 - INFO - Epoch: 1/1, Iter: 1/2 --\n"
                    "2026-01-01 00:00:00,250 - INFO - Epoch: 1/1, Iter: 2/2 --\n")
        return 1.0


def test_interrupted_experiment_resumes_and_skips_finished_runs(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "out")
    argv = ["--small", "--out_dir", out, "--fractions", "0.2", "1.0", "--seeds", "0", "1"]
    fake = FakeBundle()
    monkeypatch.setattr(runner, "run_stage", fake)
    assert label_efficiency.main(argv) == 0
    assert len(fake.titles) == 1 + 2 * 2 * 2  # pretraining, then 2 fractions x 2 arms x 2 seeds
    first = read_csv(os.path.join(out, "runs.csv"))
    assert [float(r["dice"]) for r in first[:4]] == pytest.approx([0.05, 0.15, 0.05, 0.15])
    summary = read_csv(os.path.join(out, "label_efficiency.csv"))
    assert list(summary[0]) == label_efficiency.SUMMARY_COLUMNS
    assert float(summary[0]["dice_mean"]) == pytest.approx(0.1)
    assert float(summary[0]["dice_std"]) == pytest.approx(math.sqrt(0.005))  # (0.05, 0.15): sample std

    # interrupt one finetune: its folder is there, its result.json is not
    broken = os.path.join(out, "runs", "finetune_scratch_f1_s1")
    os.remove(os.path.join(broken, "result.json"))
    open(os.path.join(broken, "partial_checkpoint.pt"), "wb").close()
    fake.titles.clear()
    capsys.readouterr()
    assert label_efficiency.main(argv) == 0
    assert fake.titles == ["finetune_scratch_f1_s1 (5 cases)"]  # only the unfinished run ran again
    assert not os.path.exists(os.path.join(broken, "partial_checkpoint.pt"))
    assert capsys.readouterr().out.count("finished earlier, skipped") == 8
    assert read_csv(os.path.join(out, "runs.csv")) == first

    # the same out_dir with other settings: refused, naming the file and the override
    fake.titles.clear()
    assert label_efficiency.main(argv + ["--finetune_lr", "0.01"]) == 1
    err = capsys.readouterr().err
    assert "result.json" in err and "learning_rate" in err and fake.titles == []


def test_runs_are_keyed_by_the_content_of_weights_and_data(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "out")
    argv = ["--small", "--out_dir", out, "--fractions", "1.0", "--seeds", "0"]
    fake = FakeBundle()
    monkeypatch.setattr(runner, "run_stage", fake)
    assert label_efficiency.main(argv) == 0
    assert len(fake.titles) == 3  # pretraining, 2 finetunes
    pretrain_marker = os.path.join(out, "runs", "pretrain", "result.json")

    # pretraining redone, same bytes of model.pt: the finetunes still skip
    os.remove(pretrain_marker)
    fake.titles.clear()
    assert label_efficiency.main(argv) == 0
    assert len(fake.titles) == 1 and fake.titles[0].startswith("pretrain")

    # pretraining redone with new weights: the finetune from them runs again, the one from scratch does not
    os.remove(pretrain_marker)
    fake.titles.clear()
    fake.model_bytes = b"new weights"
    assert label_efficiency.main(argv) == 0
    assert len(fake.titles) == 2 and fake.titles[0].startswith("pretrain") and "pretrained" in fake.titles[1]

    # a changed training image (same path, new bytes): every finetune runs again, the pretraining (pool) does not
    fake.titles.clear()
    image = json.load(open(os.path.join(out, "data", "ct", "dataset.json")))["training"][0]["image"]
    with open(os.path.join(out, "data", "ct", image), "ab") as f:
        f.write(b"\0")
    capsys.readouterr()
    assert label_efficiency.main(argv) == 0
    assert len(fake.titles) == 2 and all(t.startswith("finetune") for t in fake.titles)
    assert image.split("/")[-1] in capsys.readouterr().out  # says which file changed


def test_runs_are_keyed_by_the_bundle_config_and_the_package_version(tmp_path, monkeypatch, capsys):
    """A finished run is reused only while the config file it ran and the code versions are the same: a changed value
    in the finetune bundle's train.json reruns the finetunes (not the pretraining); another package version reruns
    everything; nothing changed reuses everything."""
    import shutil

    import hybridmim_components
    from tools.bundles import bundle_runner

    bundles = tmp_path / "bundles"
    for name in (runner.SMALL_PRETRAIN, runner.SMALL_FINETUNE):
        shutil.copytree(os.path.join(runner.BUNDLES, name, "configs"), bundles / name / "configs")
    monkeypatch.setattr(runner, "BUNDLES", str(bundles))
    monkeypatch.setattr(bundle_runner, "BUNDLES", str(bundles))
    out = str(tmp_path / "out")
    argv = ["--small", "--out_dir", out, "--fractions", "1.0", "--seeds", "0"]
    fake = FakeBundle()
    monkeypatch.setattr(runner, "run_stage", fake)
    assert label_efficiency.main(argv) == 0
    assert len(fake.titles) == 3  # pretraining, 2 finetunes

    fake.titles.clear()
    assert label_efficiency.main(argv) == 0
    assert fake.titles == []  # same configs, data and versions: reused

    train = bundles / runner.SMALL_FINETUNE / "configs" / "train.json"
    config = json.loads(train.read_text())
    config["weight_decay"] = config["weight_decay"] * 2  # a value no override sets
    train.write_text(json.dumps(config, indent=4))
    capsys.readouterr()
    assert label_efficiency.main(argv) == 0
    assert len(fake.titles) == 2 and all(t.startswith("finetune") for t in fake.titles)
    assert "train.json" in capsys.readouterr().out  # says what changed

    fake.titles.clear()
    monkeypatch.setattr(hybridmim_components, "__version__", hybridmim_components.__version__ + ".post1")
    assert label_efficiency.main(argv) == 0
    assert len(fake.titles) == 3
    assert "hybridmim_components" in capsys.readouterr().out


def test_a_marker_without_content_key_runs_again(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    argv = ["--small", "--out_dir", out, "--fractions", "1.0", "--seeds", "0"]
    fake = FakeBundle()
    monkeypatch.setattr(runner, "run_stage", fake)
    assert label_efficiency.main(argv) == 0
    marker = os.path.join(out, "runs", "finetune_scratch_f1_s0", "result.json")
    done = json.load(open(marker))
    done.pop("content", None)  # written before runs were keyed by content: what it consumed is unknown
    json.dump(done, open(marker, "w"))
    fake.titles.clear()
    assert label_efficiency.main(argv) == 0
    assert len(fake.titles) == 1 and "scratch" in fake.titles[0]


# -------------------------------------------------------------------------------------- end to end (bundles)
@pytest.mark.slow
def test_label_efficiency_end_to_end_is_reproducible_and_resumes(tmp_path, capsys):
    argv = ["--small", *TINY, "--fractions", "0.4", "--seeds", "3"]
    results = []
    for name in ("a", "b"):
        assert label_efficiency.main(argv + ["--out_dir", str(tmp_path / name)]) == 0
        results.append(read_csv(str(tmp_path / name / "runs.csv")))
    for path in ("label_efficiency.csv", "runs.csv"):
        assert list(read_csv(str(tmp_path / "a" / path))[0]) == (
            label_efficiency.SUMMARY_COLUMNS if path != "runs.csv" else label_efficiency.RUN_COLUMNS)
    assert [r["arm"] for r in results[0]] == ["pretrained", "scratch"]
    assert [r["train_cases"] for r in results[0]] == ["2", "2"]  # 40 % of 5 synthetic training cases
    assert [r["dice"] for r in results[0]] == [r["dice"] for r in results[1]]  # same seed, same numbers
    from tools.bundles.bundle_runner import read_scalars

    # and the same losses, step by step (a Dice of 0 in both would prove little on its own)
    for run, tag in (("pretrain", "train_loss"), ("pretrain", "val_recon_mse"),
                     ("finetune_pretrained_f0.4_s3", "train_loss"), ("finetune_scratch_f0.4_s3", "train_loss")):
        a, b = (read_scalars(str(tmp_path / name / "runs" / run / "eval"))[tag] for name in ("a", "b"))
        assert a == b and len(a) >= 1
    assert all(0.0 <= float(r["dice"]) <= 1.0 for r in results[0])
    assert_png(str(tmp_path / "a" / "label_efficiency.png"))
    md = (tmp_path / "a" / "label_efficiency.md").read_text()
    assert "synthetic data" in md and "not the paper's result" in md

    logs = tmp_path / "a" / "logs"
    stamps = {p.name: p.stat().st_mtime_ns for p in logs.iterdir()}
    capsys.readouterr()
    assert label_efficiency.main(argv + ["--out_dir", str(tmp_path / "a")]) == 0
    assert capsys.readouterr().out.count("finished earlier, skipped") == 3
    assert {p.name: p.stat().st_mtime_ns for p in logs.iterdir()} == stamps  # nothing ran again


@pytest.mark.slow
def test_loss_ablation_and_settings_end_to_end(tmp_path):
    out = tmp_path / "ablation"
    assert loss_ablation.main(["--small", *TINY, "--rows", "scratch", "rec", "--out_dir", str(out)]) == 0
    rows = read_csv(str(out / "loss_ablation.csv"))
    assert list(rows[0]) == loss_ablation.SUMMARY_COLUMNS
    assert [(r["row"], r["number_weight"], r["reconstruction_weight"]) for r in rows] == [
        ("scratch", "0.0", "0.0"), ("rec", "0.0", "1.0")]
    overrides = json.loads((out / "runs" / "pretrain_rec" / "result.json").read_text())["overrides"]
    assert overrides["loss#contrastive_weight"] == 0.0 and overrides["loss#reconstruction_weight"] == 1.0
    assert_png(str(out / "loss_ablation.png"))

    out = tmp_path / "settings"
    assert settings.main(["--small", *TINY, "--mask_ratios", "0.6", "--region_sizes", "[48,48,16]",
                          "--out_dir", str(out)]) == 0
    rows = read_csv(str(out / "settings.csv"))
    assert list(rows[0]) == settings.SUMMARY_COLUMNS
    assert [(r["axis"], r["value"]) for r in rows] == [("mask_ratio", "0.6"), ("region_size", "48x48x16")]
    assert all(float(r["pretrain_step_s"]) > 0 and 0 <= float(r["dice_mean"]) <= 1 for r in rows)
    assert_png(str(out / "settings.png"))


def test_find_output_matches_the_exact_case_name_not_a_prefix(tmp_path):
    """Old code matched by prefix: ``pat_1`` also found ``pat_10_seg.nii.gz`` (another patient's prediction)."""
    from tools.bundles.bundle_runner import StageFailed, find_output

    for stem in ("pat_10", "pat_1"):  # pat_10 first: a prefix match returns it for pat_1
        (tmp_path / stem).mkdir()
        (tmp_path / stem / f"{stem}_seg.nii.gz").write_bytes(b"x")
    assert find_output(str(tmp_path), "pat_1", "seg") == str(tmp_path / "pat_1" / "pat_1_seg.nii.gz")
    with pytest.raises(StageFailed, match="pat_2_seg.nii.gz"):
        find_output(str(tmp_path), "pat_2", "seg")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "pat_1_seg.nii.gz").write_bytes(b"y")
    with pytest.raises(StageFailed, match="2 outputs"):
        find_output(str(tmp_path), "pat_1", "seg")
