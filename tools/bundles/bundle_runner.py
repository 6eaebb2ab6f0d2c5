"""Drive MONAI bundles as a user does: ``python -m monai.bundle run`` with overrides, one log file per run.

Shared by the demo (:mod:`tools.demo`) and the experiment runners: building the command line, running it with a
progress bar fed by the bundle's own iteration log lines, and reading back what the bundle wrote (TensorBoard
scalars, output files).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUNDLES = os.path.join(REPO_ROOT, "bundles")
ITERATION = re.compile(r"Epoch: (\d+)/(\d+), Iter: (\d+)/(\d+)")


class StageFailed(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------------- running bundles
def overrides_to_args(overrides: dict) -> list[str]:
    """``{"roi_size": [64, 64, 32], "amp": False}`` -> ``["--roi_size", "[64, 64, 32]", "--amp", "False"]``.

    Values are written as Python literals: the MONAI CLI (python-fire) parses them with ``ast.literal_eval``, so a
    JSON ``false`` would arrive as the (truthy) string ``'false'``.
    """
    args = []
    for key, value in overrides.items():
        args += [f"--{key}", value if isinstance(value, str) else repr(value)]
    return args


def bundle_command(bundle: str, configs: Sequence[str], overrides: dict) -> list[str]:
    root = os.path.join(BUNDLES, bundle)
    files = [os.path.join(root, "configs", c) for c in configs]
    config = files[0] if len(files) == 1 else json.dumps(files)
    return [sys.executable, "-m", "monai.bundle", "run", "--config_file", config, "--bundle_root", root,
            *overrides_to_args(overrides)]


def run_stage(title: str, command: list[str], log_path: str, total_steps: int | None = None) -> float:
    """Run one bundle command with a progress bar fed by its iteration log lines; returns the wall time (s)."""
    from tqdm import tqdm

    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    start = time.time()
    with open(log_path, "w", encoding="utf-8") as log, tqdm(total=total_steps, desc=title, unit="step",
                                                           dynamic_ncols=True, leave=True) as bar:
        log.write("$ " + " ".join(command) + "\n\n")
        log.flush()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            match = ITERATION.search(line)
            if match and total_steps:
                epoch, _, it, per_epoch = (int(g) for g in match.groups())
                bar.n = min(total_steps, (epoch - 1) * per_epoch + it)
                bar.refresh()
        code = proc.wait()
        if code == 0 and total_steps:
            bar.n = total_steps
            bar.refresh()
    if code != 0:
        with open(log_path, encoding="utf-8") as f:
            tail = "".join(f.readlines()[-25:])
        raise StageFailed(f"{title} failed (exit {code}); full log: {log_path}\n{tail}")
    return time.time() - start


def validation_handler_index(bundle: str) -> int:
    """Position of ``ValidationHandler`` in the bundle's ``train#handlers`` (to switch on validation at start)."""
    with open(os.path.join(BUNDLES, bundle, "configs", "train.json"), encoding="utf-8") as f:
        handlers = json.load(f)["train"]["handlers"]
    for i, handler in enumerate(handlers):
        if handler.get("_target_", "").endswith("ValidationHandler"):
            return i
    raise StageFailed(f"{bundle}/configs/train.json has no ValidationHandler in train#handlers")


def device_overrides(device: str) -> dict:
    cuda = device.startswith("cuda")
    return {"device": f"$torch.device('{device}')", "amp": cuda}


def read_scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    """All scalars of the TensorBoard event files in ``log_dir``: ``{tag: [(step, value), ...]}`` in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[tuple[int, float]]] = {}
    for name in sorted(os.listdir(log_dir)):
        if not name.startswith("events.out.tfevents"):
            continue
        acc = EventAccumulator(os.path.join(log_dir, name), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, float(e.value)) for e in acc.Scalars(tag))
    return {tag: sorted(values) for tag, values in scalars.items()}


def dice_per_class(pred: np.ndarray, truth: np.ndarray, labels: Sequence[int]) -> dict[int, float]:
    """Dice of each label present in ``truth`` (absent labels are left out, as MONAI's DiceMetric ignores them)."""
    out = {}
    for label in labels:
        t = truth == label
        if not t.any():
            continue
        p = pred == label
        out[label] = float(2.0 * np.logical_and(p, t).sum() / (p.sum() + t.sum()))
    return out


def find_output(folder: str, stem: str, postfix: str) -> str:
    """The one file ``{stem}_{postfix}.nii.gz`` under ``folder`` (MONAI's savers may add a folder per case).

    Matched by exact name: a prefix match would give ``pat_1`` the prediction ``pat_10_seg.nii.gz`` of another case.
    """
    name = f"{stem}_{postfix}.nii.gz"
    found = sorted(os.path.join(root, name) for root, _, names in os.walk(folder) if name in names)
    if len(found) > 1:
        raise StageFailed(f"{len(found)} outputs named '{name}' under {folder} ({', '.join(found)}): which one is "
                          "meant is ambiguous; write each run to its own folder")
    if found:
        return found[0]
    raise StageFailed(f"no output '{name}' under {folder}")
