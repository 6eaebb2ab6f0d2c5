"""What a forgotten trained setting costs: Dice of the demo's finetuned UNet inferred with and without its spacing.

After ``python tools/demo.py`` (the UNet spleen finetune, trained at 3 mm voxels), this runs the finetune bundle's
``inference.json`` on the demo's held-out CT slices three ways and scores each label map against the ground truth:

- ``trained``: the settings the weights were trained with (3 mm, the demo's width): what the record demands;
- ``default spacing``: the bundle's own default ``pixdim`` (1.5 x 1.5 x 2 mm), as a user who forgot the spacing
  would run it, with ``--check_trained_settings false`` (otherwise the bundle stops and names ``pixdim``);
- ``default, checked``: the same without that flag, to show the stop (no Dice: nothing is computed).

    python tools/demo.py --out_dir demo_run
    python -m tools.experiments.trained_settings_cost --demo_dir demo_run

Writes ``trained_settings_cost.{json,md}`` into ``--out_dir`` (default ``docs/experiments``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO_ROOT)

from hybridmim_components.utils.atomic_files import atomic_open  # noqa: E402
from tools.bundles.bundle_runner import bundle_command, dice_per_class, find_output, run_stage  # noqa: E402
from tools.demo import FINETUNE, inference_overrides, parse_args as demo_args  # noqa: E402

BUNDLE_DEFAULT_PIXDIM = [1.5, 1.5, 2.0]


def measure(demo_dir: str, data_dir: str, arm: str = "pretrained") -> dict:
    """Run the three inferences of the module docstring; returns ``{"rows": [...], ...}``."""
    import nibabel as nib

    args = demo_args(["--out_dir", demo_dir, "--data_dir", data_dir])
    arm_dir = os.path.join(args.out_dir, f"finetune_{arm}")
    ckpt = os.path.join(arm_dir, "models")
    if not os.path.isfile(os.path.join(ckpt, "model.pt")):
        raise FileNotFoundError(f"{ckpt}/model.pt not found: run `python tools/demo.py --out_dir {demo_dir}` first.")
    with open(os.path.join(args.data_dir, f"datalist_{args.task}.json"), encoding="utf-8") as f:
        case = json.load(f)["validation"][0]
    truth = np.asarray(nib.load(os.path.join(args.data_dir, case["label"])).dataobj).astype(np.int64)
    stem = os.path.basename(case["image"]).split(".")[0]
    settings = {
        "trained": {"pixdim": [3.0, 3.0, 3.0]},
        "default spacing, check off": {"pixdim": BUNDLE_DEFAULT_PIXDIM, "check_trained_settings": False},
        "default spacing, checked": {"pixdim": BUNDLE_DEFAULT_PIXDIM},
    }
    rows = []
    for name, extra in settings.items():
        out = os.path.join(demo_dir, "trained_settings_cost", name.replace(" ", "_").replace(",", ""))
        overrides = inference_overrides(args, out, ckpt, args.crop,
                                        {"data_list_file_path": f"datalist_{args.task}.json", **extra})
        command = bundle_command(FINETUNE[args.task], ["inference.json"], overrides)
        log = os.path.join(out, "inference.log")
        try:
            seconds = run_stage(f"infer ({name})", command, log)
        except Exception:
            with open(log, encoding="utf-8") as f:
                text = f.read()
            stop = [line.strip() for line in text.splitlines() if line.strip().startswith("spacing:")]
            rows.append({"setting": name, "pixdim": extra["pixdim"], "dice": None, "stopped": stop[:1]})
            continue
        pred = np.asarray(nib.load(find_output(os.path.join(out, "predictions"), stem, "seg")).dataobj)
        dice = dice_per_class(pred.astype(np.int64).reshape(truth.shape), truth, [1])
        rows.append({"setting": name, "pixdim": extra["pixdim"], "dice": dice.get(1), "seconds": round(seconds, 1)})
    return {"demo_dir": demo_dir, "task": args.task, "arm": arm, "case": case["image"], "rows": rows}


def markdown(result: dict) -> str:
    lines = [f"# What a forgotten spacing costs ({result['task']}, finetune from {result['arm']} weights)", "",
             f"Held-out slices of the demo CT (`{result['case']}`); `python -m tools.experiments.trained_settings_cost`.",
             "", "| inference setting | pixdim (mm) | spleen Dice |", "|---|---|---|"]
    for row in result["rows"]:
        dice = f"{row['dice']:.3f}" if row["dice"] is not None else "stopped: " + "; ".join(row["stopped"])
        lines.append(f"| {row['setting']} | {row['pixdim']} | {dice} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo_dir", default="demo_run", help="the --out_dir of a finished tools/demo.py run")
    parser.add_argument("--data_dir", default="demo_data/ct", help="the demo's --data_dir")
    parser.add_argument("--out_dir", default=os.path.join(REPO_ROOT, "docs", "experiments"))
    args = parser.parse_args(argv)
    result = measure(os.path.abspath(args.demo_dir), os.path.abspath(args.data_dir))
    os.makedirs(args.out_dir, exist_ok=True)
    with atomic_open(os.path.join(args.out_dir, "trained_settings_cost.json"), "w") as f:
        json.dump(result, f, indent=2)
    text = markdown(result)
    with atomic_open(os.path.join(args.out_dir, "trained_settings_cost.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
