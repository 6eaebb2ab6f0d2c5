"""Presets, data and resumable bundle runs shared by the experiment commands.

Every pretraining and finetuning is one ``python -m monai.bundle run`` of a bundle's ``train.json`` with overrides
(:mod:`tools.bundles.bundle_runner`), in ``<out_dir>/runs/<run id>/`` with its full log in ``<out_dir>/logs/<run id>.log``.
When a run has finished and its numbers have been read back, ``runs/<run id>/result.json`` is written atomically
(temporary file, then rename): it holds the overrides and the result. A finished run is keyed by content, never by
paths alone: a later invocation skips a run whose ``result.json`` exists with the same overrides, the same content
(SHA-256) of the bundle config file it ran and of every file it consumes (weights, datalists, the images and labels
they list: :func:`consumed_files`), and the same versions of this package, MONAI and PyTorch (:func:`content_key`).
It refuses (naming the file) if the overrides differ; a run whose config, consumed files or versions changed (e.g. a
redone pretraining wrote new weights, a default in train.json was changed) or without ``result.json`` (interrupted) is
started again from an empty folder.

Two presets:

* ``--small``: the CPU preset of :mod:`tools.demo` (:func:`tools.demo.pretrain_overrides`,
  :func:`tools.demo.finetune_overrides`: 3 mm voxels, 64×64×32 crops, sub-volume 16, a narrow UNet) on data generated
  by :mod:`tools.data.make_demo_data` (synthetic; the real demo CT has one labelled case, too few for label fractions),
  equal optimiser steps for every finetune (``--finetune_steps``). A smoke run, not the paper's result.
* default: the bundles' own paper-scale settings on ``--device cuda``; only paths, seed, label fraction, device and
  the options given on the command line are overridden.
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
import re
import shutil
import statistics
import sys
from collections.abc import Callable, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from hybridmim_components.utils.atomic_files import atomic_open  # noqa: E402
from hybridmim_components.workflow.data import DEFAULT_PATH_KEYS, load_datalist, resolve_datalist_path  # noqa: E402
from tools import demo  # noqa: E402
from tools.bundles.bundle_runner import (  # noqa: E402
    BUNDLES,
    StageFailed,
    bundle_command,
    device_overrides,
    read_scalars,
    run_stage,
    validation_handler_index,
)
from tools.data.file_identity import content_hash  # noqa: E402

SMALL_PRETRAIN, SMALL_FINETUNE = "hybridmim_unet_pretrain", "hybridmim_unet_msd_spleen"
#: Settings of ``--small`` common to all experiments (each experiment adds its own; the command line wins).
#: Crop and crops per step of every ``--small`` run (the reports in docs/experiments were measured with them)
SMALL_CROP, SMALL_CROPS = [64, 64, 32], 4
SMALL_COMMON = {
    "device": "cpu",
    "features": [8, 8, 16, 32, 64, 8],
    "pretrain_bundle": SMALL_PRETRAIN,
    "finetune_bundle": SMALL_FINETUNE,
    "pretrain_validations": 1,
    "pretrain_lr": 1e-3,
    "finetune_lr": 3e-3,
}
#: Synthetic data of ``--small``: 5 labelled training cases (label fractions 0.2 .. 1.0 keep 1 .. 5), 2 validation
#: cases, and an unlabelled pool of 4 + 1 volumes; 80×80×40 voxels at 3 mm, the preset's voxel size (no resampling).
SMALL_DATA = {"shape": (80, 80, 40), "spacing": (3.0, 3.0, 3.0), "n_train": 5, "n_val": 2, "pool_train": 4,
              "pool_val": 1}
ITERATION_LINE = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) - .*?Epoch: (\d+)/\d+, Iter: (\d+)/\d+")


class ExperimentError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------------- arguments
def literal(text: str):
    """A command-line value as a Python literal when it is one (``0.1``, ``[64, 64, 32]``, ``True``), else the text."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def base_parser(name: str, description: str) -> argparse.ArgumentParser:
    """Options common to the experiments; preset-dependent ones default to ``None`` (see :func:`apply_preset`)."""
    p = argparse.ArgumentParser(prog=f"python -m tools.experiments.{name}", description=description)
    p.add_argument("--small", action="store_true",
                   help="CPU smoke preset on generated synthetic data (minutes on 2 cores); not the paper's result")
    p.add_argument("--out_dir", default=os.path.join("runs", name),
                   help="results, runs and logs (default runs/<experiment>; /runs/ is git-ignored)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda; --small: cpu)")
    p.add_argument("--seeds", type=int, nargs="+", help="finetuning seeds")
    p.add_argument("--dataset_dir", help="labelled data for finetuning (default: the finetune bundle's; --small: "
                   "generated)")
    p.add_argument("--datalist", help="its MSD-form datalist, absolute or relative to --dataset_dir")
    p.add_argument("--pool_dir", help="unlabelled data for pretraining (default: the pretraining bundle's; --small: "
                   "generated)")
    p.add_argument("--pool_datalist", help="its datalist")
    p.add_argument("--pretrain_bundle", help="pretraining bundle under bundles/")
    p.add_argument("--finetune_bundle", help="finetuning bundle under bundles/")
    p.add_argument("--pretrain_steps", type=int, help="pretraining steps (default: the bundle's, 100k)")
    p.add_argument("--pretrain_validations", type=int, help="validations during pretraining when --pretrain_steps "
                   "is given (default 5; --small 1)")
    p.add_argument("--pretrain_lr", type=float, help="pretraining learning rate (default: the bundle's)")
    p.add_argument("--finetune_steps", type=int,
                   help="optimiser steps of every finetune (epochs = steps / batches per epoch, so every label "
                   "fraction trains as long); default: the bundle's epochs")
    p.add_argument("--finetune_lr", type=float, help="finetuning learning rate (default: the bundle's)")
    p.add_argument("--features", type=json.loads, help="UNet widths, e.g. [8,8,16,32,64,8] (default: the bundle's)")
    p.add_argument("--pretrain_override", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                   help="any further override of the pretraining bundle (Python literal)")
    p.add_argument("--finetune_override", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                   help="any further override of the finetuning bundle (Python literal)")
    return p


def apply_preset(args: argparse.Namespace, small: dict, full: dict) -> argparse.Namespace:
    """Fill every option left at ``None`` from the preset (``--small``: ``SMALL_COMMON`` + ``small``; else ``full``)."""
    preset = {**SMALL_COMMON, **small} if args.small else {"device": "cuda", "pretrain_validations": 5, **full}
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.out_dir = os.path.abspath(args.out_dir)
    args.pretrain_override = [(k, literal(v)) for k, v in args.pretrain_override]
    args.finetune_override = [(k, literal(v)) for k, v in args.finetune_override]
    return args


def bundle_default(bundle: str, key: str):
    """A top-level value of ``bundles/<bundle>/configs/train.json`` (``a#b`` for nested keys)."""
    path = os.path.join(BUNDLES, bundle, "configs", "train.json")
    if not os.path.isfile(path):
        raise ExperimentError(f"no bundle '{bundle}': {path} does not exist "
                              f"(bundles: {', '.join(sorted(os.listdir(BUNDLES)))})")
    with open(path, encoding="utf-8") as f:
        value = json.load(f)
    for part in key.split("#"):
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value


# --------------------------------------------------------------------------------------------------------- data
def prepare_data(args: argparse.Namespace) -> str:
    """Fill in the data options; under ``--small`` generate what was not given. Returns a sentence saying what it is."""
    notes = []
    if args.small and args.dataset_dir is None:
        from tools.data.make_demo_data import make_ct_dataset

        args.dataset_dir = os.path.join(args.out_dir, "data", "ct")
        if not os.path.isfile(os.path.join(args.dataset_dir, "dataset.json")):
            make_ct_dataset(args.dataset_dir, num_classes=2, shape=SMALL_DATA["shape"], spacing=SMALL_DATA["spacing"],
                            n_train=SMALL_DATA["n_train"], n_val=SMALL_DATA["n_val"], n_test=0, seed=0)
        args.datalist = "dataset.json"
        notes.append(f"finetuning data: SYNTHETIC CT generated by tools/data/make_demo_data.py ({SMALL_DATA['n_train']} "
                     f"training + {SMALL_DATA['n_val']} validation cases, one blob organ) in {args.dataset_dir}")
    if args.small and args.pool_dir is None:
        from tools.data.make_demo_data import make_unlabeled_ct_pool

        args.pool_dir = os.path.join(args.out_dir, "data", "pool")
        if not os.path.isfile(os.path.join(args.pool_dir, "dataset.json")):
            make_unlabeled_ct_pool(args.pool_dir, n_train=SMALL_DATA["pool_train"], n_val=SMALL_DATA["pool_val"],
                                   n_test=0, shape=SMALL_DATA["shape"], spacing=SMALL_DATA["spacing"], seed=1)
        args.pool_datalist = "dataset.json"
        notes.append(f"pretraining pool: SYNTHETIC unlabelled CT generated by tools/data/make_demo_data.py in "
                     f"{args.pool_dir}")
    args.dataset_dir = args.dataset_dir or bundle_default(args.finetune_bundle, "dataset_dir")
    args.datalist = args.datalist or bundle_default(args.finetune_bundle, "data_list_file_path")
    args.pool_dir = args.pool_dir or bundle_default(args.pretrain_bundle, "dataset_dir")
    args.pool_datalist = args.pool_datalist or bundle_default(args.pretrain_bundle, "data_list_file_path")
    for label, folder, datalist in (("finetuning", args.dataset_dir, args.datalist),
                                    ("pretraining", args.pool_dir, args.pool_datalist)):
        if not any(m.startswith(label) for m in notes):
            notes.append(f"{label} data: {os.path.join(folder, datalist)}")
    return "; ".join(notes)


def provenance(args: argparse.Namespace, synthetic: bool) -> str:
    """What the numbers are, for every output (CSV column, Markdown, PNG title)."""
    preset = "--small preset" if args.small else "bundle defaults (paper scale)"
    data = "synthetic data" if synthetic else "your data"
    verdict = "not the paper's result" if args.small or synthetic else "paper-scale settings on your data"
    return f"{preset}, {data}, {args.device}: {verdict}"


def training_cases(args: argparse.Namespace, label_fraction: float) -> int:
    """How many training cases the finetune bundle keeps at ``label_fraction`` (the bundle's own selection code)."""
    return len(load_datalist(args.dataset_dir, args.datalist, "training", label_fraction=label_fraction,
                             required_keys=("image", "label"), check_files=False))


# ------------------------------------------------------------------------------------------------------ overrides
def pretrain_overrides(args: argparse.Namespace, run_dir: str, seed: int, extra: dict | None = None) -> dict:
    """Overrides of one pretraining run: the demo's CPU preset under ``--small``, else the bundle's defaults."""
    paths = {"dataset_dir": args.pool_dir, "data_list_file_path": args.pool_datalist,
             "ckpt_dir": os.path.join(run_dir, "models"), "output_dir": os.path.join(run_dir, "eval"), "seed": seed}
    if args.small:
        demo_args = argparse.Namespace(data_dir=args.pool_dir, features=args.features, seed=seed, device=args.device,
                                       crop=SMALL_CROP, crops=SMALL_CROPS,
                                       pretrain_steps=args.pretrain_steps, pretrain_lr=args.pretrain_lr,
                                       pretrain_validations=args.pretrain_validations, pretrain_override=[])
        out = demo.pretrain_overrides(demo_args, run_dir)
        # no validation before training: the experiments need the final weights, not the starting point
        out[f"train#handlers#{validation_handler_index(args.pretrain_bundle)}#exec_at_start"] = False
    else:
        out = dict(device_overrides(args.device))
        if args.pretrain_steps:
            validations = max(1, min(args.pretrain_validations, args.pretrain_steps))
            out.update({"steps_per_epoch": max(1, args.pretrain_steps // validations),
                        "train#trainer#max_epochs": validations, "val_interval": 1,
                        "warmup_steps": min(bundle_default(args.pretrain_bundle, "warmup_steps"),
                                            max(1, args.pretrain_steps // 20))})
        if args.pretrain_lr:
            out["learning_rate"] = args.pretrain_lr
        if args.features:
            out["features"] = args.features
    out.update(paths)
    out.update(dict(args.pretrain_override))
    out.update(extra or {})  # what the experiment varies wins
    return out


def pretraining_steps(bundle: str, overrides: dict) -> int:
    """Optimiser steps of a pretraining: steps per epoch × epochs, from ``overrides`` or the bundle's defaults."""
    per_epoch = overrides.get("steps_per_epoch") or bundle_default(bundle, "steps_per_epoch")
    epochs = overrides.get("train#trainer#max_epochs") or bundle_default(bundle, "train#trainer#max_epochs")
    return per_epoch * epochs


def scaled_warmup_epochs(bundle: str, epochs: int) -> int:
    """The finetune bundle's warm-up scaled to ``epochs`` (the same share of the schedule; at least 1)."""
    default_epochs = bundle_default(bundle, "train#trainer#max_epochs")
    return max(1, round(bundle_default(bundle, "warmup_epochs") * epochs / default_epochs))


def finetune_epochs(args: argparse.Namespace, label_fraction: float) -> tuple[int, int]:
    """``(epochs, steps)`` of a finetune: ``--finetune_steps`` spread over the kept cases, else the bundle's epochs."""
    batch = bundle_default(args.finetune_bundle, "train#dataloader#batch_size")
    batches = math.ceil(training_cases(args, label_fraction) / (batch if isinstance(batch, int) else 1))
    if args.finetune_steps:
        epochs = max(1, math.ceil(args.finetune_steps / batches))
    else:
        epochs = bundle_default(args.finetune_bundle, "train#trainer#max_epochs")
    return epochs, epochs * batches


def finetune_overrides(args: argparse.Namespace, run_dir: str, pretrained: str | None, seed: int,
                       label_fraction: float = 1.0) -> dict:
    """Overrides of one finetune from ``pretrained`` (a ``model.pt``) or from scratch (``None``)."""
    epochs, _ = finetune_epochs(args, label_fraction)
    paths = {"dataset_dir": args.dataset_dir, "data_list_file_path": args.datalist,
             "ckpt_dir": os.path.join(run_dir, "models"), "output_dir": os.path.join(run_dir, "eval"),
             "pretrained_path": pretrained or "", "seed": seed, "label_fraction": label_fraction}
    if args.small:
        tasks = {bundle: task for task, bundle in demo.FINETUNE.items()}
        if args.finetune_bundle not in tasks:
            raise ExperimentError(f"--small runs the UNet CT bundles of tools/demo.py ({', '.join(tasks)}), "
                                  f"not --finetune_bundle {args.finetune_bundle}")
        demo_args = argparse.Namespace(data_dir=args.dataset_dir, features=args.features, device=args.device,
                                       crop=SMALL_CROP, crops=SMALL_CROPS,
                                       task=tasks[args.finetune_bundle], finetune_steps=epochs,
                                       finetune_lr=args.finetune_lr)
        out = demo.finetune_overrides(demo_args, run_dir, pretrained)
        out["val_interval"] = epochs  # one validation, at the end: the number reported
    else:
        out = dict(device_overrides(args.device))
        if args.finetune_steps:
            out.update({"train#trainer#max_epochs": epochs,
                        "warmup_epochs": scaled_warmup_epochs(args.finetune_bundle, epochs)})
        if args.finetune_lr:
            out["learning_rate"] = args.finetune_lr
        if args.features:
            out["features"] = args.features
    out.update(paths)
    out.update(dict(args.finetune_override))
    return out


# -------------------------------------------------------------------------------------------------- reading back
def step_times(lines: Sequence[str]) -> list[float]:
    """Seconds between consecutive iteration log lines of the same epoch (``Epoch: e/E, Iter: i/N``).

    Each interval is one training iteration as the bundle's ``StatsHandler`` timestamps it: data loading (in the main
    process with ``num_workers`` 0), masking, forward, backward, update and logging; validation and checkpointing
    happen between epochs and are left out.
    """
    from datetime import datetime

    times, previous = [], None
    for line in lines:
        match = ITERATION_LINE.search(line)
        if not match:
            continue
        stamp, millis, epoch, it = match.groups()
        t = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S").timestamp() + int(millis) / 1000.0
        if previous is not None and previous[0] == int(epoch) and previous[1] == int(it) - 1:
            times.append(t - previous[2])
        previous = (int(epoch), int(it), t)
    return times


def median_step_time(log_path: str) -> float:
    """Median of :func:`step_times` of a log, leaving out the first interval (warm-up) when there are others."""
    with open(log_path, encoding="utf-8", errors="replace") as f:
        times = step_times(f.read().splitlines())
    times = times[1:] if len(times) > 1 else times
    return statistics.median(times) if times else float("nan")


def last_and_best(log_dir: str, tag: str, log_path: str, higher_is_better: bool = True) -> dict:
    scalars = read_scalars(log_dir) if os.path.isdir(log_dir) else {}
    values = scalars.get(tag)
    if not values:
        raise ExperimentError(f"the run wrote no '{tag}' to TensorBoard in {log_dir}; see its log {log_path}")
    best = max(values, key=lambda sv: sv[1]) if higher_is_better else min(values, key=lambda sv: sv[1])
    return {"last": values[-1][1], "last_epoch": values[-1][0], "best": best[1], "best_epoch": best[0]}


# ------------------------------------------------------------------------------------------------ resumable runs
def jsonable(value):
    return json.loads(json.dumps(value))


def write_json_atomic(path: str, content) -> None:
    with atomic_open(path, "w", fsync=True, encoding="utf-8") as f:
        json.dump(content, f, indent=1)


def _datalist_files(datalist: str, dataset_dir: str | None) -> list[str]:
    """The image and label files every section of ``datalist`` names, resolved by the bundles' own ``load_datalist``.

    A section that is not a non-empty list of valid entries is skipped: the bundle reports it when it runs.
    """
    with open(datalist, encoding="utf-8") as f:
        content = json.load(f)
    files = []
    for section, entries in (content.items() if isinstance(content, dict) else []):
        if not (isinstance(entries, list) and entries):
            continue
        try:
            items = load_datalist(dataset_dir, datalist, section, required_keys=(), check_files=False)
        except ValueError:
            continue
        for item in items:
            for key in DEFAULT_PATH_KEYS:
                value = item.get(key)
                files += [value] if isinstance(value, str) else list(value or [])
    return files


def consumed_files(overrides: dict, run_dir: str, inputs=None) -> list[str]:
    """Files a run reads: absolute file paths among the override values (weights, checkpoints, datalists) and in
    ``inputs``, the datalist ``data_list_file_path`` and the images and labels it lists; not the run's own files."""
    found = []

    def walk(value):
        if isinstance(value, str):
            found.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    walk(overrides)
    walk(inputs)
    files = [v for v in found if os.path.isabs(v) and os.path.isfile(v)]
    if isinstance(overrides.get("data_list_file_path"), str) and overrides["data_list_file_path"]:
        try:
            datalist = resolve_datalist_path(overrides.get("dataset_dir"), overrides["data_list_file_path"])
        except FileNotFoundError:
            datalist = None  # the bundle says so when it runs
        if datalist:
            files += [datalist, *_datalist_files(datalist, overrides.get("dataset_dir"))]
    own = os.path.abspath(run_dir) + os.sep
    return sorted({os.path.abspath(f) for f in files if os.path.isfile(f)
                   and not os.path.abspath(f).startswith(own)})


def code_versions() -> dict[str, str]:
    """``{"version:<package>": version}`` of the code that computes a run: this package, MONAI, PyTorch."""
    import monai
    import torch

    import hybridmim_components

    return {"version:hybridmim_components": hybridmim_components.__version__,
            "version:monai": monai.__version__, "version:torch": torch.__version__}


def content_key(overrides: dict, run_dir: str, inputs=None, configs=()) -> dict[str, str]:
    """What a finished run's result depends on, by content: ``{path: SHA-256}`` of the bundle ``configs`` it ran and
    of :func:`consumed_files`, plus :func:`code_versions`."""
    files = sorted({os.path.abspath(c) for c in configs} | set(consumed_files(overrides, run_dir, inputs)))
    return {**{path: content_hash(path) for path in files}, **code_versions()}


class Runs:
    """Runs of one experiment under ``out_dir``: each once, results kept in ``runs/<id>/result.json``."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.skipped: list[str] = []
        self.ran: list[str] = []

    def run_dir(self, run_id: str) -> str:
        return os.path.join(self.out_dir, "runs", run_id)

    def log_path(self, run_id: str) -> str:
        return os.path.join(self.out_dir, "logs", f"{run_id}.log")

    def once(self, run_id: str, title: str, bundle: str, overrides: dict, total_steps: int | None,
             collect: Callable[[str, str], dict], config: str = "train.json", inputs: dict | None = None) -> dict:
        """Run ``bundle``'s ``config`` with ``overrides`` unless ``run_id`` has finished; returns its result.

        ``inputs``: what else defines the run beyond its overrides (e.g. which patients a datalist file holds); a
        finished run with other inputs is refused like one with other overrides. A finished run whose consumed files
        (:func:`content_key`) changed since runs again.
        """
        run_dir, log_path = self.run_dir(run_id), self.log_path(run_id)
        marker = os.path.join(run_dir, "result.json")
        command = bundle_command(bundle, [config], overrides)
        config_file = command[command.index("--config_file") + 1]  # the file the run reads, hashed below
        content = content_key(overrides, run_dir, inputs, configs=[config_file])
        done = None
        if os.path.isfile(marker):
            with open(marker, encoding="utf-8") as f:
                done = json.load(f)
            if "inputs" in done and done["inputs"] != jsonable(inputs):
                raise ExperimentError(f"{marker} holds a finished run with other inputs ({done.get('inputs')}, now "
                                      f"{jsonable(inputs)}); use another --out_dir or delete {run_dir} to run it "
                                      "again")
            if done.get("overrides") != jsonable(overrides) or done.get("bundle") != bundle:
                changed = sorted(k for k in set(done.get("overrides", {})) | set(overrides)
                                 if done.get("overrides", {}).get(k) != jsonable(overrides).get(k))
                raise ExperimentError(f"{marker} holds a finished run with other settings (bundle "
                                      f"{done.get('bundle')}; overrides that differ: {changed or 'none'}); use another "
                                      f"--out_dir or delete {run_dir} to run it again")
            if done.get("content") == content:
                print(f"{title}: finished earlier, skipped ({marker})")
                self.skipped.append(run_id)
                return done["result"]
            old = done.get("content")
            changed = ("unknown (finished before runs were keyed by content)" if old is None else
                       ", ".join(sorted(p for p in set(old) | set(content) if old.get(p) != content.get(p))))
            print(f"{title}: finished earlier, but what it consumes changed ({changed}); running it again")
        shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted run starts again from nothing
        wall = run_stage(title, command, log_path, total_steps)
        result = {**collect(run_dir, log_path), "wall_s": round(wall, 2)}
        write_json_atomic(marker, {"run": run_id, "bundle": bundle, "overrides": jsonable(overrides),
                                   "inputs": jsonable(inputs), "content": content, "result": result})
        self.ran.append(run_id)
        return result

    def pretrain(self, args: argparse.Namespace, run_id: str, title: str, seed: int, extra: dict | None = None) -> dict:
        """One pretraining; result: ``model`` (its ``model.pt``), ``steps``, ``step_s``, ``val_recon_mse``."""
        overrides = pretrain_overrides(args, self.run_dir(run_id), seed, extra)
        steps = pretraining_steps(args.pretrain_bundle, overrides)

        def collect(run_dir: str, log_path: str) -> dict:
            model = os.path.join(run_dir, "models", "model.pt")
            if not os.path.isfile(model):
                raise ExperimentError(f"pretraining wrote no {model}; see {log_path}")
            mse = last_and_best(os.path.join(run_dir, "eval"), "val_recon_mse", log_path, higher_is_better=False)
            return {"model": model, "steps": steps, "step_s": round(median_step_time(log_path), 4),
                    "val_recon_mse": mse["last"]}

        return self.once(run_id, title, args.pretrain_bundle, overrides, steps, collect)

    def finetune(self, args: argparse.Namespace, run_id: str, title: str, pretrained: str | None, seed: int,
                 label_fraction: float = 1.0) -> dict:
        """One finetune; result: validation ``dice`` (last validation), ``dice_best``, ``epochs``, ``steps``."""
        overrides = finetune_overrides(args, self.run_dir(run_id), pretrained, seed, label_fraction)
        epochs, steps = finetune_epochs(args, label_fraction)

        def collect(run_dir: str, log_path: str) -> dict:
            dice = last_and_best(os.path.join(run_dir, "eval"), "val_mean_dice", log_path)
            return {"dice": dice["last"], "dice_epoch": dice["last_epoch"], "dice_best": dice["best"],
                    "epochs": epochs, "steps": steps}

        return self.once(run_id, title, args.finetune_bundle, overrides, steps, collect)


def fail(err: Exception) -> int:
    print(f"\nerror: {err}", file=sys.stderr)
    return 1


RUN_ERRORS = (StageFailed, ExperimentError, FileNotFoundError, ValueError)
