"""Loss ablation (the paper's Table 4): pretrain with the loss terms switched on cumulatively, finetune each.

Every row but the first pretrains with the bundle's loss weights, the terms not yet switched on set to 0 through the
overrides ``loss#<term>_weight 0``; then finetunes on all labelled cases from those weights. The first row finetunes
from scratch. Rows (paper): supervised; L_rec; + L_num; + L_loc; + L_cons; + L_cl (= HybridMIM). ``--small`` runs the
three levels of the method (pixel: L_rec; + region: L_num, L_loc, L_cons; + sample: L_cl) to fit its time budget;
``--rows`` picks rows by name. Writes ``runs.csv``, ``loss_ablation.csv``, ``.md`` and ``.png``.

    python -m tools.experiments.loss_ablation --small
    python -m tools.experiments.loss_ablation --dataset_dir /data/BraTS2020 --datalist datalist.json \\
        --pool_dir /data/BraTS2020 --pool_datalist datalist.json          # paper scale (UNet, BraTS), GPU
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tools.experiments import runner, tables  # noqa: E402

NAME = "loss_ablation"
TERMS = ("reconstruction", "number", "location", "consistency", "contrastive")
SYMBOLS = {"reconstruction": "L_rec", "number": "L_num", "location": "L_loc", "consistency": "L_cons",
           "contrastive": "L_cl"}
#: row name -> loss terms switched on (None: finetune from scratch, no pretraining)
ROWS = {
    "scratch": None,
    "rec": ("reconstruction",),
    "rec+num": ("reconstruction", "number"),
    "rec+num+loc": ("reconstruction", "number", "location"),
    "rec+num+loc+cons": ("reconstruction", "number", "location", "consistency"),
    "all": TERMS,
}
SMALL = {"rows": ["scratch", "rec", "rec+num+loc+cons", "all"], "seeds": [0], "pretrain_steps": 40,
         "finetune_steps": 80}
FULL = {"rows": list(ROWS), "seeds": [0], "pretrain_bundle": "hybridmim_unet_pretrain_brats",
        "finetune_bundle": "hybridmim_unet_brats"}
RUN_COLUMNS = ["row", "losses", *[f"{t}_weight" for t in TERMS], "seed", "dice", "dice_epoch", "dice_best",
               "pretrain_steps", "val_recon_mse", "wall_s", "provenance"]
SUMMARY_COLUMNS = ["row", "losses", *[f"{t}_weight" for t in TERMS], "n", "dice_mean", "dice_std", "provenance"]


def parse_args(argv=None):
    parser = runner.base_parser(NAME, "Loss ablation (paper Table 4): pretrain with the loss terms switched on "
                                "cumulatively through the loss weights, then finetune each.")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), help="which rows (default: all; --small: 4)")
    return runner.apply_preset(parser.parse_args(argv), SMALL, FULL)


def describe(terms) -> str:
    if terms is None:
        return "supervised (from scratch)"
    return " + ".join(SYMBOLS[t] for t in terms)


def loss_weights(args, terms) -> dict:
    """``{"loss#<term>_weight": value}``: the bundle's weight for switched-on terms, 0 for the others."""
    return {f"loss#{t}_weight": (runner.bundle_default(args.pretrain_bundle, f"loss#{t}_weight") if t in terms else 0.0)
            for t in TERMS}


def plot(path: str, summary: list[dict], title: str) -> str:
    plt = tables.pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    x = range(len(summary))
    ax.bar(x, [r["dice_mean"] for r in summary], color=["0.6"] + ["C0"] * (len(summary) - 1),
           yerr=[0.0 if r["dice_std"] != r["dice_std"] else r["dice_std"] for r in summary], capsize=3)
    ax.set_xticks(list(x), [r["losses"].replace(" + ", "\n+ ") for r in summary], fontsize=7)
    ax.set_ylabel("validation Dice")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return tables.save_figure(fig, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    runs = runner.Runs(args.out_dir)
    rows = []
    try:
        data_note = runner.prepare_data(args)
        label = runner.provenance(args, "SYNTHETIC" in data_note)
        print(f"{NAME}: {label}\n{data_note}")
        for name in args.rows:
            terms = ROWS[name]
            weights = {f"{t}_weight": 0.0 for t in TERMS}
            pre = {"model": None, "steps": 0, "val_recon_mse": float("nan")}
            if terms is not None:
                overrides = loss_weights(args, terms)
                weights = {k.split("#")[1]: v for k, v in overrides.items()}
                pre = runs.pretrain(args, f"pretrain_{name}", f"pretrain {describe(terms)}", args.seeds[0], overrides)
            for seed in args.seeds:
                result = runs.finetune(args, f"finetune_{name}_s{seed}", f"finetune ({describe(terms)}) seed {seed}",
                                       pre["model"], seed)
                rows.append({"row": name, "losses": describe(terms), **weights, "seed": seed, **result,
                             "pretrain_steps": pre["steps"], "val_recon_mse": pre["val_recon_mse"],
                             "provenance": label})
    except runner.RUN_ERRORS as err:
        return runner.fail(err)
    return report(args, rows, label, data_note)


def report(args, rows: list[dict], label: str, data_note: str) -> int:
    summary = tables.aggregate(rows, ["row", "losses", *[f"{t}_weight" for t in TERMS]], "dice")
    for row in summary:
        row["provenance"] = label
    out = args.out_dir
    runs_csv = tables.write_csv(os.path.join(out, "runs.csv"), rows, RUN_COLUMNS)
    csv_path = tables.write_csv(os.path.join(out, f"{NAME}.csv"), summary, SUMMARY_COLUMNS)
    scratch = next((r["dice_mean"] for r in summary if r["row"] == "scratch"), None)
    header = ["pretraining losses", "weights (rec, num, loc, cons, cl)", "Dice", "vs scratch"]
    body = [[r["losses"], ", ".join(f"{r[f'{t}_weight']:g}" for t in TERMS),
             tables.mean_std(r["dice_mean"], r["dice_std"]),
             "" if scratch is None or r["row"] == "scratch" else f"{r['dice_mean'] - scratch:+.3f}"] for r in summary]
    table = tables.markdown_table(header, body)
    notes = (f"Pretraining `{args.pretrain_bundle}` ({max((r['pretrain_steps'] for r in rows), default='?')} steps per "
             f"pretrained row; seed {args.seeds[0]}), finetune `{args.finetune_bundle}` on all labelled cases, seeds "
             f"{args.seeds}; Dice: `val_mean_dice` on the validation list at the last validation. {data_note}.")
    md = tables.write_markdown(os.path.join(out, f"{NAME}.md"), "Loss ablation (paper Table 4)", label, [table, notes])
    png = plot(os.path.join(out, f"{NAME}.png"), summary, f"Loss ablation: {label}")
    print(f"\n{label}\n\n{table}\n\n{notes}\n\nwrote {csv_path}\n      {runs_csv}\n      {md}\n      {png}\n"
          f"      (runs and logs under {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
