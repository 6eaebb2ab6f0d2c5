"""HybridMIM on a real CT in one command: pretrain, finetune from the weights and from scratch, infer, compare.

Every stage drives a bundle through ``python -m monai.bundle run`` with overrides only, exactly as a user would; the
full log of each run is kept in ``<out_dir>/logs/``. The overrides shrink the paper's GPU settings to a CPU demo:
3 mm voxels, 64×64×32 pretraining crops with 16-voxel sub-volumes (48 mm, the paper's sub-volume at 1.5 mm is 48 mm
too), a narrow UNet, a few hundred steps. Data: :mod:`tools.data.fetch_demo_ct` (a real TotalSegmentator test CT).

Stages::

    1 data        tools/data/fetch_demo_ct.py (download once, hash check, labels mapped to BTCV / spleen)
    2 pretrain    bundles/hybridmim_unet_pretrain/configs/train.json on the unlabelled pool
    3 reconstruct bundles/hybridmim_unet_pretrain/configs/inference.json (masked input and reconstruction)
    4 finetune    bundles/hybridmim_unet_<task>/configs/train.json from the pretrained weights
    5 finetune    the same from scratch (same seed, steps and augmentations)
    6 infer       inference.json of both finetunes on the held-out slices; Dice against the ground truth

It prints the pretext metrics at the first and last validation against their trivial baselines and the Dice of both
finetunes, writes ``summary.json`` / ``summary.md`` and two PNGs (``segmentation.png``, ``reconstruction.png``).
A tiny CPU demo: one scan, minutes of training; not the paper's experiment.

    python tools/demo.py                       # CPU, ~10 minutes on 2 cores
    python tools/demo.py --device cuda --pretrain_steps 2000 --finetune_steps 1000
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from hybridmim_components.utils.atomic_files import atomic_open, atomic_path  # noqa: E402
from tools.bundles.bundle_runner import (  # noqa: E402
    StageFailed,
    bundle_command,
    device_overrides,
    dice_per_class,
    find_output,
    read_scalars,
    run_stage,
    validation_handler_index,
)
from tools.data import fetch_demo_ct  # noqa: E402
from tools.common.pictures import axial, region_offset  # noqa: E402

PRETRAIN = "hybridmim_unet_pretrain"
FINETUNE = {"spleen": "hybridmim_unet_msd_spleen", "btcv": "hybridmim_unet_btcv"}
# BTCV organ names in label order (background first), as the BTCV bundles name them
BTCV_NAMES = ["spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
              "inferior vena cava", "portal and splenic veins", "pancreas", "right adrenal", "left adrenal"]


# ------------------------------------------------------------------------------------------------------- settings
def _run_overrides(args, run_dir: str, data_list: str) -> dict:
    """What every training run of the demo shares: data, output folders, 3 mm voxels, width, device."""
    return {
        "dataset_dir": args.data_dir,
        "data_list_file_path": data_list,
        "ckpt_dir": os.path.join(run_dir, "models"),
        "output_dir": os.path.join(run_dir, "eval"),
        "pixdim": [3.0, 3.0, 3.0],
        "features": args.features,
        "train#dataloader#num_workers": 0,  # 2 cores: worker processes would only compete with the step
        "validate#dataloader#num_workers": 0,
        **device_overrides(args.device),
    }


def pretrain_overrides(args, run_dir: str) -> dict:
    steps_per_epoch = max(1, args.pretrain_steps // args.pretrain_validations)
    validation = validation_handler_index(PRETRAIN)
    return {
        **_run_overrides(args, run_dir, "datalist_pool.json"),
        "seed": args.seed,
        "roi_size": args.crop,
        "region_size": [48, 48, 16],
        "sub_volume_size": 16,
        "patch_size": 8,
        "batch_size": 1,
        "samples_per_volume": args.crops,  # crops a step: the contrastive term has crops - 1 negatives per crop
        "learning_rate": args.pretrain_lr,
        "warmup_steps": max(1, args.pretrain_steps // 20),
        "steps_per_epoch": steps_per_epoch,
        "train#trainer#max_epochs": args.pretrain_validations,
        "val_interval": 1,
        f"train#handlers#{validation}#exec_at_start": True,
        # validate on 8 fixed random crops of the held-out CT instead of one centre crop (reseeded every validation)
        "validate#random_transforms#0": {"_target_": "RandSpatialCropSamplesd", "keys": "image",
                                         "roi_size": "@roi_size", "num_samples": 8, "random_size": False},
        **dict(args.pretrain_override),
    }


def finetune_overrides(args, run_dir: str, pretrained: str | None) -> dict:
    validation = validation_handler_index(FINETUNE[args.task])
    val_every = max(1, args.finetune_steps // 4)
    return {
        **_run_overrides(args, run_dir, f"datalist_{args.task}.json"),
        "pretrained_path": pretrained or "",
        "roi_size": args.crop,
        "num_samples": args.crops,
        "learning_rate": args.finetune_lr,
        "warmup_epochs": max(1, args.finetune_steps // 20),
        "train#trainer#max_epochs": args.finetune_steps,  # one training volume: one step per epoch
        "val_interval": val_every,
        f"train#handlers#{validation}#exec_at_start": False,
    }


def inference_overrides(args, run_dir: str, ckpt_dir: str, roi_size, extra: dict | None = None) -> dict:
    return {
        "dataset_dir": args.data_dir,
        "ckpt_dir": ckpt_dir,
        "output_dir": os.path.join(run_dir, "predictions"),
        "pixdim": [3.0, 3.0, 3.0],
        "roi_size": roi_size,
        "features": args.features,
        "dataloader#num_workers": 0,
        **device_overrides(args.device),
        **(extra or {}),
    }


# ----------------------------------------------------------------------------------------------------- measuring
# ------------------------------------------------------------------------------------------------------- pictures
def _save_panels(path: str, panels: list, z: int, title: str) -> None:
    """One row of axial slices ``z``: ``panels`` = ``[(name, grey volume in [0, 1], label volume or None), ...]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6))
    for ax, (name, grey, labels) in zip(axes, panels):
        ax.imshow(axial(grey, z), cmap="gray", vmin=0, vmax=1)
        if labels is not None:
            overlay = np.ma.masked_equal(axial(labels, z), 0)
            ax.imshow(overlay, cmap="tab20", vmin=0, vmax=19, alpha=0.55, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:  # a killed demo never leaves half a picture
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def segmentation_png(path: str, ct: np.ndarray, truth: np.ndarray, preds: dict[str, np.ndarray], title: str) -> None:
    """CT | ground truth | each prediction, on the slice with the most labelled voxels (abdominal window)."""
    z = int(np.argmax((truth > 0).sum(axis=(0, 1))))
    window = np.clip((ct + 160.0) / 400.0, 0, 1)  # W400 L40
    panels = [("CT", window, None), ("ground truth", window, truth)]
    _save_panels(path, panels + [(name, window, labels) for name, labels in preds.items()], z, title)


def reconstruction_png(path: str, masked: np.ndarray, target: np.ndarray, recon: np.ndarray, offset, title: str):
    """Middle slice of the region: masked input | reconstruction pasted into the masked voxels | original."""
    region = tuple(slice(o, o + s) for o, s in zip(offset, recon.shape))
    filled = masked.copy()
    # for the picture only: voxels whose masked value differs from the original (masked air stays air either way)
    hole = masked[region] != target[region]
    filled[region] = np.where(hole, recon, masked[region])
    z = region[2].start + recon.shape[2] // 2
    panels = [("masked input", masked, None), ("masked voxels of the central region reconstructed", filled, None),
              ("original", target, None)]
    _save_panels(path, panels, z, title)


# ----------------------------------------------------------------------------------------------------------- main
PRETEXT_ROWS = (
    # (label, metric tag, baseline tag, better when)
    ("number accuracy", "val_number_acc", "val_number_acc_baseline", "higher"),
    ("location accuracy", "val_location_acc", "val_location_acc_baseline", "higher"),
    ("masked-voxel MSE", "val_recon_mse", "val_recon_mse_baseline", "lower"),
)


def pretext_table(scalars: dict) -> tuple[list[dict], str]:
    """Rows ``{metric, first, last, baseline, beats}`` and their Markdown table (first/last validation)."""
    rows, lines = [], ["| pretext metric (held-out CT) | first validation | last validation | trivial baseline | "
                       "last beats baseline |", "|---|---|---|---|---|"]
    for label, tag, base_tag, better in PRETEXT_ROWS:
        values = scalars.get(tag, [])
        if not values:
            continue
        first, last = values[0][1], values[-1][1]
        baseline = scalars[base_tag][-1][1] if scalars.get(base_tag) else float("nan")
        beats = last > baseline if better == "higher" else last < baseline
        rows.append({"metric": tag, "first": first, "last": last, "baseline": baseline, "beats_baseline": beats})
        lines.append(f"| {label} ({better} is better) | {first:.4f} | {last:.4f} | {baseline:.4f} | "
                     f"{'yes' if beats else 'no'} |")
    return rows, "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="HybridMIM on a real CT: pretrain, finetune (pretrained vs scratch), "
                                     "infer, compare. A tiny CPU demo, not the paper's experiment.")
    parser.add_argument("--out_dir", default="demo_run", help="runs, logs, predictions, PNGs and the summary")
    parser.add_argument("--data_dir", default="demo_data/ct", help="where tools/data/fetch_demo_ct.py writes the data")
    parser.add_argument("--cache_dir", default=None, help="download cache (default ~/.cache/hybridmim)")
    parser.add_argument("--sdist", default=None, help="a local totalsegmentator-2.18.0.tar.gz (offline)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (AMP on CUDA)")
    parser.add_argument("--task", choices=sorted(FINETUNE), default="spleen", help="finetune bundle: MSD spleen or BTCV")
    parser.add_argument("--features", type=json.loads, default=[16, 16, 32, 64, 128, 16],
                        help="UNet widths (the bundles' default is [32,32,64,128,256,32])")
    parser.add_argument("--crop", type=json.loads, default=[64, 64, 32],
                        help="training crop and sliding-window patch of every stage, sides multiples of 16")
    # 2 crops a step (4 before): half the step time, so the quick start stays well under 20 min on the slower
    # 2-core machines; 48x48x32 crops were as fast but the number and location heads then stayed below baseline
    parser.add_argument("--crops", type=int, default=2, help="crops per step in pretraining and finetuning (>= 2)")
    parser.add_argument("--pretrain_steps", type=int, default=400)
    parser.add_argument("--pretrain_validations", type=int, default=5, help="validations during pretraining")
    parser.add_argument("--pretrain_lr", type=float, default=1e-3)
    parser.add_argument("--finetune_steps", type=int, default=200)
    parser.add_argument("--finetune_lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrain_override", nargs=2, action="append", default=[], metavar=("KEY", "JSON"),
                        help="extra override of the pretraining bundle, e.g. --pretrain_override mask_value -1")
    args = parser.parse_args(argv)
    args.pretrain_override = [(k, json.loads(v) if v[:1] in "[{-0123456789tfn" else v) for k, v in args.pretrain_override]
    args.out_dir, args.data_dir = os.path.abspath(args.out_dir), os.path.abspath(args.data_dir)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out_dir
    logs = os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    times: dict[str, float] = {}
    try:
        # 1 data
        start = time.time()
        print("[1/6] data: real CT from the TotalSegmentator 2.18.0 source distribution")
        fetch_demo_ct.prepare(args.data_dir, args.cache_dir, args.sdist)
        print(fetch_demo_ct.describe(args.data_dir))
        times["data"] = time.time() - start

        # 2 pretrain
        pre_dir = os.path.join(out, "pretrain")
        shutil.rmtree(pre_dir, ignore_errors=True)
        pre = pretrain_overrides(args, pre_dir)
        total = pre["steps_per_epoch"] * pre["train#trainer#max_epochs"]
        times["pretrain"] = run_stage("[2/6] pretrain (UNet, HybridMIM)", bundle_command(PRETRAIN, ["train.json"], pre),
                                      os.path.join(logs, "pretrain.log"), total)
        model = os.path.join(pre_dir, "models", "model.pt")

        # 3 reconstruction of the held-out CT by the pretrained network
        recon_out = {"data_list_file_path": "datalist_pool.json", "seed": args.seed,
                     **{k: pre[k] for k in ("roi_size", "region_size", "sub_volume_size", "patch_size")},
                     **{k: v for k, v in args.pretrain_override}}
        times["reconstruct"] = run_stage(
            "[3/6] reconstruct held-out CT", bundle_command(PRETRAIN, ["inference.json"], inference_overrides(
                args, pre_dir, os.path.join(pre_dir, "models"), pre["roi_size"], recon_out)),
            os.path.join(logs, "reconstruct.log"))

        # 4, 5 finetune from the pretrained weights and from scratch
        arms = {"pretrained": model, "scratch": None}
        for i, (arm, weights) in enumerate(arms.items()):
            arm_dir = os.path.join(out, f"finetune_{arm}")
            shutil.rmtree(arm_dir, ignore_errors=True)
            times[f"finetune_{arm}"] = run_stage(
                f"[{4 + i}/6] finetune {args.task} ({arm})",
                bundle_command(FINETUNE[args.task], ["train.json"], finetune_overrides(args, arm_dir, weights)),
                os.path.join(logs, f"finetune_{arm}.log"), args.finetune_steps)

        # 6 inference of both finetunes on the held-out slices, Dice against the ground truth
        import nibabel as nib

        with open(os.path.join(args.data_dir, f"datalist_{args.task}.json"), encoding="utf-8") as f:
            case = json.load(f)["validation"][0]
        ct = np.asarray(nib.load(os.path.join(args.data_dir, case["image"])).dataobj, dtype=np.float32)
        truth = np.asarray(nib.load(os.path.join(args.data_dir, case["label"])).dataobj).astype(np.int64)
        stem = os.path.basename(case["image"]).split(".")[0]
        labels = list(range(1, 14 if args.task == "btcv" else 2))
        start, preds, dice = time.time(), {}, {}
        for arm in arms:
            arm_dir = os.path.join(out, f"finetune_{arm}")
            run_stage(f"[6/6] infer ({arm})", bundle_command(FINETUNE[args.task], ["inference.json"],
                      inference_overrides(args, arm_dir, os.path.join(arm_dir, "models"), args.crop,
                                          {"data_list_file_path": f"datalist_{args.task}.json"})),
                      os.path.join(logs, f"infer_{arm}.log"))
            pred_img = nib.load(find_output(os.path.join(arm_dir, "predictions"), stem, "seg"))
            preds[arm] = np.asarray(pred_img.dataobj).astype(np.int64).reshape(truth.shape)
            dice[arm] = dice_per_class(preds[arm], truth, labels)
        times["infer"] = time.time() - start
    except (StageFailed, fetch_demo_ct.DemoDataError) as err:
        print(f"\nerror: {err}", file=sys.stderr)
        return 1

    # summary
    scalars = read_scalars(os.path.join(pre_dir, "eval"))
    pretext_rows, pretext_md = pretext_table(scalars)
    mean_dice = {arm: float(np.mean(list(d.values()))) if d else float("nan") for arm, d in dice.items()}
    names = ["spleen"] if args.task == "spleen" else BTCV_NAMES
    dice_md = ["| finetune (same seed, steps, augmentations) | mean Dice, held-out slices | per organ |",
               "|---|---|---|"]
    for arm in arms:
        per = ", ".join(f"{names[k - 1]} {v:.3f}" for k, v in dice[arm].items())
        dice_md.append(f"| from HybridMIM weights | {mean_dice[arm]:.3f} | {per} |" if arm == "pretrained"
                       else f"| from scratch | {mean_dice[arm]:.3f} | {per} |")
    crop = "x".join(str(n) for n in args.crop)
    setting = (f"CPU demo on one real CT (TotalSegmentator test data): UNet features {args.features}, 3 mm voxels; "
               f"pretraining {total} steps of {args.crops} crops {crop} (sub-volume 16, patch 8, region 48x48x16); "
               f"finetuning {args.finetune_steps} steps of {args.crops} crops {crop}, task {args.task}; "
               f"device {args.device}. "
               "Not the paper's experiment.")
    minutes = {k: round(v / 60, 2) for k, v in times.items()}
    markdown = "\n".join([setting, "", pretext_md, "", *dice_md, "",
                          "Wall time (min): " + ", ".join(f"{k} {v}" for k, v in minutes.items())])
    seg_png, rec_png = os.path.join(out, "segmentation.png"), os.path.join(out, "reconstruction.png")
    segmentation_png(seg_png, ct, truth, {f"from HybridMIM (Dice {mean_dice['pretrained']:.2f})": preds["pretrained"],
                                          f"from scratch (Dice {mean_dice['scratch']:.2f})": preds["scratch"]},
                     f"held-out slices, {args.task}: CPU demo, not the paper's result")
    masked_path = find_output(os.path.join(pre_dir, "predictions"), "pool_aorta_ct_top", "masked")
    recon_path = find_output(os.path.join(pre_dir, "predictions"), "pool_aorta_ct_top", "reconstruction")
    original_path = find_output(os.path.join(pre_dir, "predictions"), "pool_aorta_ct_top", "original")
    masked_img, recon_img = nib.load(masked_path), nib.load(recon_path)
    reconstruction_png(rec_png, np.asarray(masked_img.dataobj, np.float32),
                       np.asarray(nib.load(original_path).dataobj, np.float32),
                       np.asarray(recon_img.dataobj, np.float32), region_offset(masked_img.affine, recon_img.affine),
                       "held-out CT crop, pretrained UNet: CPU demo")
    summary = {"setting": setting, "pretext": pretext_rows, "dice": dice, "mean_dice": mean_dice,
               "minutes": minutes, "pngs": [seg_png, rec_png]}
    with atomic_open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    with atomic_open(os.path.join(out, "summary.md"), "w", encoding="utf-8") as f:
        f.write(markdown + "\n")
    print("\n" + markdown)
    print(f"\nwrote {seg_png}\n      {rec_png}\n      {os.path.join(out, 'summary.md')} (logs in {logs})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
