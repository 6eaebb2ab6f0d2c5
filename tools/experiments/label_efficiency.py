"""Label efficiency (the paper's Fig. 4): Dice against the share of labelled training cases, pretrained vs scratch.

One pretraining (seed: the first of ``--seeds``), then for every label fraction, arm (from the pretrained weights,
from scratch) and seed one finetune with the bundle's ``label_fraction`` (the bundle keeps a nested subset: the cases
at 20 % are among those at 40 %). Dice is the finetune bundle's ``val_mean_dice`` on the datalist's validation list at
its last validation. Writes ``runs.csv`` (one row per finetune), ``label_efficiency.csv`` (mean ± std per fraction
and arm), ``label_efficiency.md`` and ``label_efficiency.png``.

    python -m tools.experiments.label_efficiency --small      # CPU, synthetic data, ~10-15 min on 2 cores
    python -m tools.experiments.label_efficiency --dataset_dir /data/BraTS2020 --datalist datalist.json \\
        --pool_dir /data/BraTS2020 --pool_datalist datalist.json          # paper scale (Swin, BraTS), GPU

Paper scale trains every fraction for the bundle's epochs (fewer steps with fewer cases, as a user finetuning on
their labels would); ``--finetune_steps`` gives every fraction the same number of optimiser steps instead (the
``--small`` preset does).
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a file: make ``tools`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tools.experiments import runner, tables  # noqa: E402

NAME = "label_efficiency"
ARMS = {"pretrained": "from HybridMIM weights", "scratch": "from scratch"}
SMALL = {"fractions": [0.2, 0.6, 1.0], "seeds": [0, 1], "pretrain_steps": 60, "finetune_steps": 80}
FULL = {"fractions": [0.2, 0.4, 0.6, 0.8, 1.0], "seeds": [0, 1, 2], "pretrain_bundle": "hybridmim_swin_pretrain_brats",
        "finetune_bundle": "hybridmim_swin_brats"}
RUN_COLUMNS = ["arm", "label_fraction", "train_cases", "seed", "dice", "dice_epoch", "dice_best", "epochs", "steps",
               "wall_s", "provenance"]
SUMMARY_COLUMNS = ["arm", "label_fraction", "train_cases", "n", "dice_mean", "dice_std", "provenance"]


def parse_args(argv=None):
    parser = runner.base_parser(NAME, "Label efficiency (paper Fig. 4): finetune with 20-100 % of the labelled cases "
                                "from HybridMIM weights and from scratch; mean ± std Dice over seeds.")
    parser.add_argument("--fractions", type=float, nargs="+", help="label fractions in (0, 1]")
    parser.add_argument("--arms", nargs="+", choices=sorted(ARMS), default=list(ARMS), help="which finetunes")
    return runner.apply_preset(parser.parse_args(argv), SMALL, FULL)


def plot(path: str, summary: list[dict], title: str) -> str:
    plt = tables.pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    for arm, label in ARMS.items():
        rows = sorted((r for r in summary if r["arm"] == arm), key=lambda r: r["label_fraction"])
        if rows:
            ax.errorbar([100 * r["label_fraction"] for r in rows], [r["dice_mean"] for r in rows],
                        yerr=[0.0 if r["dice_std"] != r["dice_std"] else r["dice_std"] for r in rows],
                        marker="o", capsize=3, label=label)
    ax.set_xlabel("labelled training cases (%)")
    ax.set_ylabel("validation Dice (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return tables.save_figure(fig, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    runs = runner.Runs(args.out_dir)
    try:
        data_note = runner.prepare_data(args)
        synthetic = "SYNTHETIC" in data_note
        label = runner.provenance(args, synthetic)
        print(f"{NAME}: {label}\n{data_note}")
        cases = {f: runner.training_cases(args, f) for f in args.fractions}
        model = None
        if "pretrained" in args.arms:
            model = runs.pretrain(args, "pretrain", "pretrain", args.seeds[0])["model"]
        rows = []
        for fraction in args.fractions:
            for arm in args.arms:
                for seed in args.seeds:
                    run_id = f"finetune_{arm}_f{fraction:g}_s{seed}"
                    result = runs.finetune(args, run_id, f"{run_id} ({cases[fraction]} cases)",
                                           model if arm == "pretrained" else None, seed, fraction)
                    rows.append({"arm": arm, "label_fraction": fraction, "train_cases": cases[fraction],
                                 "seed": seed, **result, "provenance": label})
    except runner.RUN_ERRORS as err:
        return runner.fail(err)
    return report(args, rows, label, data_note)


def report(args, rows: list[dict], label: str, data_note: str) -> int:
    summary = tables.aggregate(rows, ["arm", "label_fraction", "train_cases"], "dice")
    for row in summary:
        row["provenance"] = label
    out = args.out_dir
    runs_csv = tables.write_csv(os.path.join(out, "runs.csv"), rows, RUN_COLUMNS)
    csv_path = tables.write_csv(os.path.join(out, f"{NAME}.csv"), summary, SUMMARY_COLUMNS)
    by_key = {(r["arm"], r["label_fraction"]): r for r in summary}
    header = ["labelled cases", *[f"Dice {ARMS[a]}" for a in args.arms]]
    body = [[f"{100 * f:g} % ({by_key[(args.arms[0], f)]['train_cases']})",
             *[tables.mean_std(by_key[(a, f)]["dice_mean"], by_key[(a, f)]["dice_std"]) for a in args.arms]]
            for f in args.fractions]
    table = tables.markdown_table(header, body)
    steps = "equal optimiser steps per fraction" if args.finetune_steps else "the bundle's epochs per fraction"
    notes = (f"Finetune bundle `{args.finetune_bundle}` ({steps}), pretraining `{args.pretrain_bundle}`; seeds "
             f"{args.seeds}; Dice: `val_mean_dice` on the validation list at the last validation, mean ± sample std "
             f"over seeds. {data_note}.")
    md = tables.write_markdown(os.path.join(out, f"{NAME}.md"), "Label efficiency (paper Fig. 4)", label,
                               [table, notes])
    png = plot(os.path.join(out, f"{NAME}.png"), summary, f"Label efficiency: {label}")
    print(f"\n{label}\n\n{table}\n\n{notes}\n\nwrote {csv_path}\n      {runs_csv}\n      {md}\n      {png}\n"
          f"      (runs and logs under {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
