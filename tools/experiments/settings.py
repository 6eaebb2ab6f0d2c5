"""Masking and region settings (the paper's Fig. 6): finetuning Dice and pretraining step time per setting.

Each axis (mask ratio, reconstructed region size, sub-volume size with its 2×2×2 patches of half the side) is varied
on its own around the base setting (the bundle's defaults; ``--small``: the demo preset's 0.4, 48×48×16, 16); a
setting shared by several axes is pretrained once. Every setting is pretrained, then finetuned on all labelled cases;
one finetune from scratch gives the reference line.

Step time: the median interval between consecutive iteration log lines of the pretraining bundle's own log
(``StatsHandler`` timestamps, ms resolution; the first, warm-up interval left out): one full training iteration
including data loading and masking (in the main process under ``--small``) and logging; validation and checkpoints
fall between epochs and are left out. The
paper times forward, backward and update without data loading, so the absolute numbers differ; compare settings with
each other, on the same machine. On a shared CPU they are noisy.

    python -m tools.experiments.settings --small
    python -m tools.experiments.settings --dataset_dir /data/BraTS2020 --datalist datalist.json \\
        --pool_dir /data/BraTS2020 --pool_datalist datalist.json          # paper scale (UNet, BraTS), GPU
"""
from __future__ import annotations

import json
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tools.experiments import runner, tables  # noqa: E402

NAME = "settings"
AXES = {"mask_ratio": "mask ratio", "region_size": "reconstructed region (voxels)",
        "sub_volume_size": "sub-volume / patch (voxels)"}
SMALL = {"mask_ratios": [0.2, 0.4, 0.6], "region_sizes": [[32, 32, 16], [48, 48, 16], [64, 64, 32]],
         "sub_volume_sizes": [], "seeds": [0], "pretrain_steps": 40, "finetune_steps": 80}
FULL = {"mask_ratios": [0.2, 0.4, 0.6, 0.8], "seeds": [0], "pretrain_bundle": "hybridmim_unet_pretrain_brats",
        "finetune_bundle": "hybridmim_unet_brats"}  # region and sub-volume lists follow the bundle's crop
RUN_COLUMNS = ["setting", "mask_ratio", "region_size", "sub_volume_size", "patch_size", "seed", "dice", "dice_epoch",
               "dice_best", "pretrain_step_s", "pretrain_steps", "pretrain_wall_s", "provenance"]
SUMMARY_COLUMNS = ["axis", "value", "setting", "n", "dice_mean", "dice_std", "pretrain_step_s", "scratch_dice_mean",
                   "provenance"]


def parse_args(argv=None):
    parser = runner.base_parser(NAME, "Masking/region settings (paper Fig. 6): Dice after finetuning and pretraining "
                                "step time per mask ratio, region size and sub-volume size.")
    parser.add_argument("--mask_ratios", type=float, nargs="*")
    parser.add_argument("--region_sizes", type=json.loads, nargs="*", help="e.g. 96 64 or [64,64,32]")
    parser.add_argument("--sub_volume_sizes", type=int, nargs="*", help="patch = half of it")
    args = runner.apply_preset(parser.parse_args(argv), SMALL, FULL)
    roi = runner.bundle_default(args.pretrain_bundle, "roi_size")
    region = runner.bundle_default(args.pretrain_bundle, "region_size")
    sub = runner.bundle_default(args.pretrain_bundle, "sub_volume_size")
    if args.region_sizes is None:  # the whole crop, the default, one step smaller again (BraTS: 128, 96, 64)
        args.region_sizes = [[c - k * (c - r) for c, r in zip(roi, region)] for k in range(3)]
        args.region_sizes = [r for r in args.region_sizes if min(r) > 0]
    if args.sub_volume_sizes is None:  # twice, once and half the default, where the crop is a multiple of it
        args.sub_volume_sizes = [s for s in (2 * sub, sub, sub // 2) if all(c % s == 0 for c in roi)]
    args.region_sizes = [[r] * 3 if isinstance(r, int) else list(r) for r in args.region_sizes]
    return args


def slug(setting: dict) -> str:
    return (f"mr{setting['mask_ratio']:g}_rs{'x'.join(map(str, setting['region_size']))}"
            f"_sv{setting['sub_volume_size']}")


def settings_grid(base: dict, args) -> list[tuple[str, object, dict]]:
    """``(axis, value, setting)`` for every value of every axis, the other settings at ``base``."""
    grid = []
    for axis, values in (("mask_ratio", args.mask_ratios), ("region_size", args.region_sizes),
                         ("sub_volume_size", args.sub_volume_sizes)):
        for value in values:
            setting = {**base, axis: value}
            setting["patch_size"] = setting["sub_volume_size"] // 2
            grid.append((axis, value, setting))
    return grid


def plot(path: str, summary: list[dict], title: str) -> str:
    plt = tables.pyplot()
    axes_present = [a for a in AXES if any(r["axis"] == a for r in summary)]
    fig, axs = plt.subplots(1, max(1, len(axes_present)), figsize=(4.4 * max(1, len(axes_present)), 4.0), squeeze=False)
    for ax, axis in zip(axs[0], axes_present):
        rows = [r for r in summary if r["axis"] == axis]
        x = range(len(rows))
        ax.bar(x, [r["dice_mean"] for r in rows], color="C0", alpha=0.8,
               yerr=[0.0 if r["dice_std"] != r["dice_std"] else r["dice_std"] for r in rows], capsize=3)
        if rows and rows[0]["scratch_dice_mean"] == rows[0]["scratch_dice_mean"]:
            ax.axhline(rows[0]["scratch_dice_mean"], color="0.4", ls="--", lw=1, label="from scratch")
            ax.legend(fontsize=7, loc="lower left")
        ax.set_xticks(list(x), [r["value"] for r in rows], fontsize=7)
        ax.set_xlabel(AXES[axis])
        ax.set_ylabel("validation Dice", color="C0")
        twin = ax.twinx()
        twin.plot(list(x), [r["pretrain_step_s"] for r in rows], "o-", color="C3")
        twin.set_ylabel("pretraining step (s, median of log intervals)", color="C3")
        twin.set_ylim(bottom=0)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return tables.save_figure(fig, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    runs = runner.Runs(args.out_dir)
    rows, summary_keys = [], []
    try:
        data_note = runner.prepare_data(args)
        label = runner.provenance(args, "SYNTHETIC" in data_note)
        print(f"{NAME}: {label}\n{data_note}")
        defaults = runner.pretrain_overrides(args, "", 0)
        base = {k: defaults.get(k, runner.bundle_default(args.pretrain_bundle, k))
                for k in ("mask_ratio", "region_size", "sub_volume_size")}
        scratch = [runs.finetune(args, f"finetune_scratch_s{seed}", f"finetune from scratch seed {seed}", None, seed)
                   for seed in args.seeds]
        for axis, value, setting in settings_grid(base, args):
            name = slug(setting)
            summary_keys.append((axis, value, name))
            if any(r["setting"] == name for r in rows):
                continue  # shared by an earlier axis
            pre = runs.pretrain(args, f"pretrain_{name}", f"pretrain {name}", args.seeds[0], setting)
            for seed in args.seeds:
                result = runs.finetune(args, f"finetune_{name}_s{seed}", f"finetune {name} seed {seed}",
                                       pre["model"], seed)
                rows.append({"setting": name, **setting, "seed": seed, **result, "pretrain_step_s": pre["step_s"],
                             "pretrain_steps": pre["steps"], "pretrain_wall_s": pre["wall_s"], "provenance": label})
    except runner.RUN_ERRORS as err:
        return runner.fail(err)
    return report(args, rows, summary_keys, scratch, label, data_note, base)


def report(args, rows, summary_keys, scratch, label, data_note, base) -> int:
    per_setting = {r["setting"]: r for r in tables.aggregate(rows, ["setting"], "dice")}
    step = {r["setting"]: r["pretrain_step_s"] for r in rows}
    scratch_mean = sum(r["dice"] for r in scratch) / len(scratch) if scratch else float("nan")
    summary = [{"axis": axis, "value": "x".join(map(str, value)) if isinstance(value, list) else value, "setting": name,
                **{k: per_setting[name][k] for k in ("n", "dice_mean", "dice_std")}, "pretrain_step_s": step[name],
                "scratch_dice_mean": scratch_mean, "provenance": label} for axis, value, name in summary_keys]
    out = args.out_dir
    runs_csv = tables.write_csv(os.path.join(out, "runs.csv"), rows, RUN_COLUMNS)
    csv_path = tables.write_csv(os.path.join(out, f"{NAME}.csv"), summary, SUMMARY_COLUMNS)
    base_step = step.get(slug({**base, "patch_size": base["sub_volume_size"] // 2}))
    sections = []
    for axis, title in AXES.items():
        body = [[r["value"], tables.mean_std(r["dice_mean"], r["dice_std"]), f"{r['pretrain_step_s']:.3f}",
                 f"{r['pretrain_step_s'] / base_step:.2f}x" if base_step else ""]
                for r in summary if r["axis"] == axis]
        if body:
            sections.append(f"**{title}** (others at mask ratio {base['mask_ratio']:g}, region "
                            f"{'x'.join(map(str, base['region_size']))}, sub-volume {base['sub_volume_size']})\n\n"
                            + tables.markdown_table([title, "Dice", "pretraining step (s)", "step vs base"], body))
    sections.append(f"From scratch (no pretraining): Dice {scratch_mean:.3f} (seeds {args.seeds}).")
    notes = (f"Pretraining `{args.pretrain_bundle}` ({rows[0]['pretrain_steps'] if rows else '?'} steps per setting), "
             f"finetune `{args.finetune_bundle}` on all labelled cases; Dice: `val_mean_dice` on the validation list "
             "at the last validation. Step time: median interval between consecutive iteration log lines of the "
             "pretraining bundle's own log (one full iteration incl. data loading, masking and logging; the first "
             f"interval and validation excluded); the paper times forward+backward+update only. {data_note}.")
    md = tables.write_markdown(os.path.join(out, f"{NAME}.md"), "Masking and region settings (paper Fig. 6)", label,
                               [*sections, notes])
    png = plot(os.path.join(out, f"{NAME}.png"), summary, f"Settings: {label}")
    print(f"\n{label}\n\n" + "\n\n".join(sections) + f"\n\n{notes}\n\nwrote {csv_path}\n      {runs_csv}\n      {md}\n"
          f"      {png}\n      (runs and logs under {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
