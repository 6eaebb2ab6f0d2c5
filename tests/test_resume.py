"""Nothing lost: crash-safe checkpoints, resume by progress, exact resume, extended runs, no untrained ``model.pt``.

Unit tests drive the checkpoint classes the bundles configure (read from the generated ``train.json``) on tiny
ignite engines; the slow tests kill real CLI runs with SIGKILL after a checkpoint, rerun the same command with
``--resume true`` and compare the final weights with an uninterrupted run (bit for bit on CPU).
"""
from __future__ import annotations

import glob
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from ignite.engine import Engine, Events

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLES_DIR = os.path.join(REPO_ROOT, "bundles")


def _bundle_target(bundle: str, *keys: str):
    """The class a generated bundle's ``train.json`` names at ``keys`` (``_target_``), imported."""
    from pydoc import locate

    with open(os.path.join(BUNDLES_DIR, bundle, "configs", "train.json"), encoding="utf-8") as f:
        node = json.load(f)
    for key in keys:
        node = node[int(key)] if isinstance(node, list) else node[key]
    target = node["_target_"]
    if "." not in target:
        target = f"monai.handlers.{target}"
    return locate(target)


def _engine() -> Engine:
    return Engine(lambda engine, batch: None)


def _loadable(path: str) -> bool:
    try:
        torch.load(path, map_location="cpu", weights_only=True)
        return True
    except Exception:
        return False


def _broken_save(obj, f, *args, **kwargs):
    """``torch.save`` that dies half-way through writing (as under SIGKILL or an OOM kill)."""
    if isinstance(f, (str, os.PathLike)):
        with open(f, "wb") as out:
            out.write(b"PK\x03\x04 half a checkpoint")
    else:
        f.write(b"PK\x03\x04 half a checkpoint")
    raise KeyboardInterrupt("killed while writing")


# ------------------------------------------------------------------------------------------------- atomic writes
@pytest.mark.parametrize("bundle", ["hybridmim_unet_pretrain", "hybridmim_unet_msd_spleen"])
def test_a_write_killed_half_way_leaves_the_previous_full_checkpoint(bundle, tmp_path, monkeypatch):
    """Old code: ignite deleted ``checkpoint_epoch=2.pt`` before MONAI wrote ``..._epoch=3.pt`` in place."""
    saver_class = _bundle_target(bundle, "train", "checkpoint_saver")
    net = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    saver = saver_class(save_dir=str(tmp_path), save_dict={"model": net, "optimizer": optimizer}, save_interval=1,
                        n_saved=1,
                        epoch_level=True, save_final=True, final_filename="checkpoint_final.pt")
    engine = _engine()
    saver.attach(engine)
    engine.run([0], max_epochs=2)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_epoch=2.pt", "checkpoint_final.pt"]
    saved = {k: v.clone() for k, v in net.state_dict().items()}

    with torch.no_grad():
        net.weight.add_(1.0)
    engine.state.epoch = 3
    monkeypatch.setattr(torch, "save", _broken_save)
    with pytest.raises(KeyboardInterrupt):
        saver.interval_completed(engine)
    monkeypatch.undo()

    files = sorted(p for p in os.listdir(tmp_path) if p.endswith(".pt"))
    assert "checkpoint_epoch=2.pt" in files, f"the previous full checkpoint was deleted before the new one: {files}"
    for name in files:
        assert _loadable(os.path.join(tmp_path, name)), f"{name} is truncated"
    kept = torch.load(tmp_path / "checkpoint_epoch=2.pt", weights_only=True)["model"]
    assert all(torch.equal(kept[k], saved[k]) for k in saved)

    # the next complete save replaces the previous one
    engine.state.epoch = 4
    saver.interval_completed(engine)
    assert sorted(p for p in os.listdir(tmp_path) if p.endswith(".pt")) == ["checkpoint_epoch=4.pt",
                                                                            "checkpoint_final.pt"]


@pytest.mark.parametrize("bundle", ["hybridmim_unet_pretrain", "hybridmim_unet_msd_spleen"])
@pytest.mark.parametrize("epoch_level", [True, False])
def test_a_resumed_run_goes_on_rotating_the_interrupted_runs_checkpoints(bundle, epoch_level, tmp_path):
    """Old code: a resumed run's saver started with an empty list, so each resume left ``n_saved`` full checkpoints
    behind for good (a Swin run with its optimizer: ~0.75 GB each, times every preemption). A fresh run adopts
    nothing; files ahead of a resumed run (another run's) are left alone, never rotated away."""
    saver_class = _bundle_target(bundle, "train", "checkpoint_saver")
    net = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    unit = "epoch" if epoch_level else "iteration"

    def saver():
        return saver_class(save_dir=str(tmp_path), save_dict={"model": net, "optimizer": optimizer}, save_interval=1,
                           n_saved=2,
                           epoch_level=epoch_level)

    torch.save({"model": {}}, tmp_path / f"checkpoint_{unit}=0.pt")  # another run's: a fresh run leaves it alone
    first = _engine()
    saver().attach(first)
    first.run([0], max_epochs=3)  # interrupted after epoch 3 (one iteration per epoch)
    torch.save({"model": {}}, tmp_path / f"checkpoint_{unit}=9.pt")  # ahead of this run: not its to rotate
    assert sorted(os.listdir(tmp_path)) == [f"checkpoint_{unit}={i}.pt" for i in (0, 2, 3, 9)]

    resumed = _engine()
    saver().attach(resumed)
    resumed.load_state_dict({"iteration": 3, "epoch_length": 1, "max_epochs": 6})  # as the resume loader leaves it
    resumed.run([0])
    assert sorted(os.listdir(tmp_path)) == [f"checkpoint_{unit}={i}.pt" for i in (5, 6, 9)]


@pytest.mark.parametrize("bundle", ["hybridmim_unet_pretrain", "hybridmim_unet_msd_spleen"])
def test_a_resumed_run_rotates_only_its_own_runs_checkpoints(bundle, tmp_path, caplog):
    """Old code: every ``checkpoint_epoch=N.pt`` behind the resumed run was adopted into its rotation by name, so a
    resume deleted another run's checkpoints (other settings, or an older version's file without an identity) lying
    in the same folder. Only files carrying this run's identity rotate; the others are named and left alone."""
    from hybridmim_components.workflow.run_identity import RunIdentity

    saver_class = _bundle_target(bundle, "train", "checkpoint_saver")
    net = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    ours, theirs = RunIdentity({"optimizer#lr": 0.1}), RunIdentity({"optimizer#lr": 0.01})

    def saver():
        return saver_class(save_dir=str(tmp_path), save_dict={"model": net, "optimizer": optimizer,
                                                              "run_identity": ours},
                           save_interval=1, n_saved=2, epoch_level=True)

    first = _engine()
    saver().attach(first)
    first.run([0], max_epochs=3)  # interrupted after epoch 3: checkpoint_epoch=2.pt and =3.pt
    torch.save({"model": {}, "run_identity": theirs.state_dict()}, tmp_path / "checkpoint_epoch=1.pt")
    torch.save({"model": {}}, tmp_path / "checkpoint_epoch=0.pt")  # an older version's: no identity
    assert sorted(os.listdir(tmp_path)) == [f"checkpoint_epoch={i}.pt" for i in (0, 1, 2, 3)]

    resumed = _engine()
    saver().attach(resumed)
    resumed.load_state_dict({"iteration": 3, "epoch_length": 1, "max_epochs": 6})
    with caplog.at_level("INFO"):
        resumed.run([0])
    assert sorted(os.listdir(tmp_path)) == [f"checkpoint_epoch={i}.pt" for i in (0, 1, 5, 6)]
    left_alone = [r.getMessage() for r in caplog.records if "left alone" in r.getMessage()]
    assert len(left_alone) == 1 and "checkpoint_epoch=0.pt" in left_alone[0] and "checkpoint_epoch=1.pt" in left_alone[0]
    assert "optimizer#lr" in left_alone[0], "another run's file is named with the setting that differs"


@pytest.mark.parametrize("bundle", ["hybridmim_unet_pretrain", "hybridmim_unet_msd_spleen"])
def test_a_killed_write_of_model_pt_leaves_the_previous_best(bundle, tmp_path, monkeypatch):
    """``model.pt`` (a fixed name) was overwritten in place: a kill mid-write left a truncated best model."""
    saver_class = _bundle_target(bundle, "train", "checkpoint_saver")
    net = torch.nn.Linear(2, 2)
    saver = saver_class(save_dir=str(tmp_path), save_dict={"model": net}, save_key_metric=True,
                        key_metric_name="m", key_metric_filename="model.pt")
    evaluator = _engine()
    saver.attach(evaluator)
    evaluator.state.epoch = 1
    evaluator.state.metrics = {"m": 0.5}
    saver.metrics_completed(evaluator)
    best = {k: v.clone() for k, v in net.state_dict().items()}

    with torch.no_grad():
        net.weight.add_(1.0)
    evaluator.state.epoch = 2
    evaluator.state.metrics = {"m": 0.7}
    monkeypatch.setattr(torch, "save", _broken_save)
    with pytest.raises(KeyboardInterrupt):
        saver.metrics_completed(evaluator)
    monkeypatch.undo()
    assert _loadable(str(tmp_path / "model.pt")), "model.pt was left truncated"
    kept = torch.load(tmp_path / "model.pt", weights_only=True)
    assert all(torch.equal(kept[k], best[k]) for k in best)


# ------------------------------------------------------------------------------------------ pick by progress
def _full_checkpoint(path, iteration: int, epoch: int) -> None:
    torch.save({"trainer": {"iteration": iteration, "epoch": epoch, "epoch_length": 10, "max_epochs": 9}}, path)


def test_resume_picks_the_most_progressed_checkpoint_not_the_newest_file(tmp_path):
    """A copied ``ckpt_dir`` gives the files new modification times: progress is read from the files."""
    from hybridmim_components.workflow.checkpoints import latest_checkpoint

    _full_checkpoint(tmp_path / "checkpoint_epoch=2.pt", 20, 2)
    _full_checkpoint(tmp_path / "checkpoint_epoch=3.pt", 30, 3)
    now = time.time()
    os.utime(tmp_path / "checkpoint_epoch=3.pt", (now - 100, now - 100))
    os.utime(tmp_path / "checkpoint_epoch=2.pt", (now, now))  # copied later: newer, but behind
    assert os.path.basename(latest_checkpoint(str(tmp_path))) == "checkpoint_epoch=3.pt"


def test_a_corrupt_newest_checkpoint_is_named_and_the_previous_used(tmp_path, caplog):
    from hybridmim_components.workflow.checkpoints import latest_checkpoint

    _full_checkpoint(tmp_path / "checkpoint_epoch=3.pt", 30, 3)
    (tmp_path / "checkpoint_final.pt").write_bytes(b"PK\x03\x04 truncated")
    (tmp_path / "model.pt").write_bytes(b"not a full checkpoint")
    with caplog.at_level("WARNING"):
        chosen = latest_checkpoint(str(tmp_path))
    assert os.path.basename(chosen) == "checkpoint_epoch=3.pt"
    assert "checkpoint_final.pt" in caplog.text and "unreadable" in caplog.text
    assert latest_checkpoint(str(tmp_path / "absent")) is None


# -------------------------------------------------------------------------------------- loads before validation
def test_checkpoint_loads_before_any_other_start_handler(tmp_path):
    """A validation at start (``exec_at_start``) registered before the loader must already see the restored net."""
    from hybridmim_components.workflow.checkpoints import ResumeFromLatestCheckpoint

    trained = torch.nn.Linear(2, 2)
    done = _engine()
    done.run([0, 1], max_epochs=1)
    torch.save({"network": trained.state_dict(), "trainer": done.state_dict()}, tmp_path / "checkpoint_final.pt")

    fresh_net = torch.nn.Linear(2, 2)
    fresh = _engine()
    seen = []
    fresh.add_event_handler(Events.STARTED, lambda e: seen.append(fresh_net.weight.detach().clone()))
    ResumeFromLatestCheckpoint(str(tmp_path), {"network": fresh_net, "trainer": fresh}).attach(fresh)
    fresh.run([0, 1], max_epochs=2)
    assert torch.equal(seen[0], trained.weight), "the start handler saw the untrained network"
    assert fresh.state.iteration == 4


# ------------------------------------------------------------------------------------------- extending a run
def _cosine(step: int, warmup: int, total: int, base: float) -> float:
    """MONAI ``WarmupCosineSchedule`` (cycles 0.5, end_lr 0) by hand."""
    if step < warmup:
        return base * step / warmup
    progress = (step - warmup) / (total - warmup)
    return base * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def test_resume_with_more_epochs_follows_the_schedule_to_the_new_end(tmp_path):
    """Old code restored ``t_total`` from the file: past it the cosine climbed back up."""
    from monai.optimizers import WarmupCosineSchedule

    from hybridmim_components.workflow.checkpoints import ResumeFromLatestCheckpoint

    def build(total):
        param = torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.SGD([param], lr=1.0)
        return optimizer, WarmupCosineSchedule(optimizer, warmup_steps=2, t_total=total)

    optimizer, schedule = build(10)
    first = _engine()
    first.add_event_handler(Events.ITERATION_COMPLETED, lambda e: (optimizer.step(), schedule.step()))
    first.run(range(5), max_epochs=2)  # 10 steps: the end of the planned schedule
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    torch.save({"lr_scheduler": schedule.state_dict(), "trainer": first.state_dict()}, tmp_path / "checkpoint_final.pt")

    optimizer, schedule = build(20)  # max_epochs 4 now
    lrs = []
    second = _engine()
    second.add_event_handler(Events.ITERATION_STARTED, lambda e: lrs.append(optimizer.param_groups[0]["lr"]))
    second.add_event_handler(Events.ITERATION_COMPLETED, lambda e: (optimizer.step(), schedule.step()))
    ResumeFromLatestCheckpoint(str(tmp_path), {"lr_scheduler": schedule, "trainer": second}).attach(second)
    second.run(range(5), max_epochs=4)
    assert schedule.t_total == 20
    expected = [_cosine(step, 2, 20, 1.0) for step in range(10, 20)]
    assert lrs == pytest.approx(expected, abs=1e-9)
    assert all(a >= b for a, b in zip(lrs, lrs[1:])), f"the learning rate climbed: {lrs}"


# ------------------------------------------------------------------------------------------------ exact resume
def test_random_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    """torch, numpy, python and every transform's own generator come back as they were at the checkpoint."""
    import random

    import numpy as np
    from monai.transforms import Compose, RandFlipd, RandSpatialCropSamplesd

    from hybridmim_components import HierarchicalMaskd
    from hybridmim_components.workflow.seeding import RandomStates

    def pipeline():
        return Compose([RandSpatialCropSamplesd("image", roi_size=[8, 8, 8], num_samples=2, random_size=False),
                        RandFlipd("image", prob=0.5),
                        HierarchicalMaskd("image", sub_volume_size=4, patch_size=2, mask_ratio=0.4)])

    def draws(transform):
        out = transform({"image": torch.arange(16 ** 3, dtype=torch.float32).reshape(1, 16, 16, 16)})
        return ([d["image"].as_tensor() if hasattr(d["image"], "as_tensor") else d["image"] for d in out],
                torch.rand(3), np.random.rand(3), random.random())

    transform = pipeline().set_random_state(seed=5)
    trainer = _engine()
    trainer.state.iteration = 7
    states = RandomStates(trainer, transforms=transform)
    draws(transform)
    states.snapshot(trainer)
    torch.save({"random_states": states.state_dict()}, tmp_path / "ckpt.pt")
    expected = draws(transform)

    other = pipeline().set_random_state(seed=99)
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    restored = RandomStates(trainer, transforms=other)
    restored.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True)["random_states"])
    restored.restore(trainer)
    got = draws(other)
    assert all(torch.equal(a, b) for a, b in zip(expected[0], got[0]))
    assert torch.equal(expected[1], got[1])
    assert np.array_equal(expected[2], got[2]) and expected[3] == got[3]


# ------------------------------------------------------------------------------------------ CLI: SIGKILL + resume
def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=REPO_ROOT)


def _cli(bundle: str, overrides: dict) -> list[str]:
    args = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
            os.path.join(BUNDLES_DIR, bundle, "configs", "train.json")]
    for key, value in overrides.items():
        args += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return args


def _run(args: list[str], what: str) -> str:
    proc = subprocess.run(args, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{what} failed (exit {proc.returncode}):\n{out[-6000:]}"
    return out


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (read from /proc): torchrun starts its workers in sessions of their own."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_after(args: list[str], marker: str, log_path: str, cwd: str = REPO_ROOT) -> None:
    """Start ``args``; SIGKILL it and every process below it as soon as ``marker`` (a complete checkpoint) exists."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, cwd=cwd, env=_env(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 900
        while not os.path.exists(marker) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        for pid in [*_descendants(proc.pid), proc.pid]:  # torchrun's ranks first, then the command itself
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    with open(log_path) as f:
        text = f.read()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed:\n{text[-4000:]}"


def _final(root: str) -> dict:
    return torch.load(os.path.join(root, "models", "checkpoint_final.pt"), map_location="cpu", weights_only=True)


def _assert_same_tensors(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_tensors(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tensors(x, y, f"{where}[{i}]")


def _demo_ct_pool(tmp_path, n_val: int = 1):
    from tools.data.make_demo_data import make_unlabeled_ct_pool

    datalist = make_unlabeled_ct_pool(str(tmp_path / "pool"), n_train=2, n_val=n_val, n_test=1)
    return os.path.dirname(datalist), datalist


def _finetune_overrides(tmp_path, root: str) -> dict:
    from tools.data.make_demo_data import make_ct_dataset

    datalist = make_ct_dataset(str(tmp_path / "ct"), num_classes=2)
    return {"bundle_root": root, "dataset_dir": os.path.dirname(datalist),
            "data_list_file_path": os.path.basename(datalist), "roi_size": [32, 32, 32], "amp": False,
            "features": [4, 4, 8, 8, 16, 4], "num_samples": 1, "cache_rate": 0, "pretrained_path": "",
            "train#dataloader#num_workers": 0, "validate#dataloader#num_workers": 0, "val_interval": 1,
            "warmup_epochs": 1, "train#trainer#max_epochs": 5}


def _pretrain_overrides(tmp_path, root: str, n_val: int = 1) -> dict:
    dataset_dir, datalist = _demo_ct_pool(tmp_path, n_val)
    return {"bundle_root": root, "dataset_dir": dataset_dir, "data_list_file_path": datalist,
            "features": [4, 4, 8, 8, 16, 4], "roi_size": [64, 64, 64], "region_size": [32, 32, 32],
            "steps_per_epoch": 2, "warmup_steps": 2, "train#trainer#max_epochs": 5, "batch_size": 1,
            "samples_per_volume": 2, "val_interval": 1, "amp": False, "train#dataloader#num_workers": 0,
            "validate#dataloader#num_workers": 0}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["finetune", "pretrain"])
def test_sigkill_after_a_checkpoint_then_resume_equals_an_uninterrupted_run(family, tmp_path):
    bundle = "hybridmim_unet_msd_spleen" if family == "finetune" else "hybridmim_unet_pretrain"
    make = _finetune_overrides if family == "finetune" else _pretrain_overrides
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    overrides = make(tmp_path, whole)
    _run(_cli(bundle, overrides), "uninterrupted run")

    overrides["bundle_root"] = killed
    # epochs 1 and 2 done and saved; the kill lands during epoch 3 (or its checkpoint)
    _kill_after(_cli(bundle, overrides), os.path.join(killed, "models", "checkpoint_epoch=2.pt"),
                str(tmp_path / "killed.log"))
    text = _run(_cli(bundle, {**overrides, "resume": True}), "resumed run")
    assert "Epoch[1] Complete" not in text, "the resumed run started again from the beginning"

    a, b = _final(whole), _final(killed)
    assert a["trainer"]["iteration"] == b["trainer"]["iteration"]
    _assert_same_tensors(a["network" if family == "pretrain" else "model"],
                         b["network" if family == "pretrain" else "model"], "weights")
    _assert_same_tensors(a["optimizer"]["state"], b["optimizer"]["state"], "optimizer")
    # the resumed run rotated the interrupted run's interval checkpoints as the uninterrupted run did (n_saved)
    def interval(root):
        return sorted(p for p in os.listdir(os.path.join(root, "models")) if p.startswith("checkpoint_epoch="))

    assert interval(killed) == interval(whole), "the interrupted run's full checkpoints were left behind"
    best = "model.pt"
    _assert_same_tensors(torch.load(os.path.join(whole, "models", best), weights_only=True),
                         torch.load(os.path.join(killed, "models", best), weights_only=True), best)


@pytest.mark.slow
def test_validation_at_start_of_a_resumed_run_never_writes_the_fresh_network(tmp_path):
    """Old code: ``exec_at_start`` validated the freshly built network before the checkpoint loaded."""
    bundle = "hybridmim_unet_msd_spleen"
    root = str(tmp_path / "root")
    overrides = {**_finetune_overrides(tmp_path, root), "train#trainer#max_epochs": 1}
    _run(_cli(bundle, overrides), "first epoch")
    models = os.path.join(root, "models")
    best_before = torch.load(os.path.join(models, "model.pt"), weights_only=True)
    full = torch.load(os.path.join(models, "checkpoint_final.pt"), weights_only=True)
    # a recorded best no validation can beat: model.pt must stay as it is
    full["best_validation"]["best_metric"] = 2.0
    for saver in full["best_validation"]["savers"]:
        saver["_saved"] = [(2.0, name) for _, name in saver["_saved"]]
    torch.save(full, os.path.join(models, "checkpoint_final.pt"))
    overrides.update({"resume": True, "train#trainer#max_epochs": 2, "train#handlers#1#exec_at_start": True})
    _run(_cli(bundle, overrides), "resume with a validation at start")
    _assert_same_tensors(best_before, torch.load(os.path.join(models, "model.pt"), weights_only=True), "model.pt")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["finetune", "pretrain"])
def test_a_validation_before_any_training_step_is_never_the_best_model(family, tmp_path):
    """Old code: the pretraining's epoch-0 (untrained) network could become ``model.pt`` for every finetune."""
    bundle = "hybridmim_unet_msd_spleen" if family == "finetune" else "hybridmim_unet_pretrain"
    root = str(tmp_path / "root")
    make = _finetune_overrides if family == "finetune" else _pretrain_overrides
    validation = 1 if family == "finetune" else 0
    overrides = {**make(tmp_path, root), "train#trainer#max_epochs": 1, "val_interval": 10,
                 f"train#handlers#{validation}#exec_at_start": True}
    text = _run(_cli(bundle, overrides), "validation at start only")
    assert "Metrics -- " in text or "val_" in text, "no validation ran at start"
    assert not glob.glob(os.path.join(root, "models", "model.pt")), "the untrained network was saved as model.pt"
    assert not glob.glob(os.path.join(root, "models", "pretrain_network.pt"))
    assert "before any training step" in text


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_ddp_run_killed_after_a_checkpoint_resumes_exactly(tmp_path):
    """torchrun, 2 gloo processes: every rank's random states are saved by rank 0 and each rank gets its own back."""
    bundle = os.path.join(BUNDLES_DIR, "hybridmim_unet_pretrain")
    # one validation volume per process
    base = {**_pretrain_overrides(tmp_path, str(tmp_path), n_val=2), "train#trainer#max_epochs": 3}

    def command(root: str, resume: bool) -> list[str]:
        overrides = {**base, "bundle_root": root, "ckpt_dir": os.path.join(root, "models"),
                     "output_dir": os.path.join(root, "eval"), "resume": resume}
        args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
                f"--master_port={_free_port()}", "-m", "monai.bundle", "run", "--config_file",
                "['configs/train.json','configs/multi_gpu_train.json']"]
        for key, value in overrides.items():
            args += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
        return args

    def run(args, what):
        proc = subprocess.run(args, cwd=bundle, env=_env(), capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{what} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}"
        return proc.stdout + proc.stderr

    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    run(command(whole, False), "uninterrupted 2-process run")
    _kill_after(command(killed, False), os.path.join(killed, "models", "checkpoint_epoch=2.pt"),
                str(tmp_path / "killed.log"), cwd=bundle)
    text = run(command(killed, True), "resumed 2-process run")
    assert text.count("restored the random states") == 2, text[-5000:]
    a, b = _final(whole), _final(killed)
    assert len(b["random_states"]["ranks"]) == 2
    assert a["trainer"]["iteration"] == b["trainer"]["iteration"]
    _assert_same_tensors(a["network"], b["network"], "weights")


@pytest.mark.slow
def test_sigkill_then_resume_with_two_loader_workers_equals_an_uninterrupted_run(tmp_path):
    """The bundles default to 4 loader workers, whose seeds come from torch's generator at each epoch: restored with
    it, the resumed run's workers draw what an uninterrupted run's draw (the tests above use num_workers=0)."""
    bundle = "hybridmim_unet_msd_spleen"
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    overrides = {**_finetune_overrides(tmp_path, whole), "train#dataloader#num_workers": 2,
                 "train#trainer#max_epochs": 3}
    _run(_cli(bundle, overrides), "uninterrupted run")
    overrides["bundle_root"] = killed
    _kill_after(_cli(bundle, overrides), os.path.join(killed, "models", "checkpoint_epoch=2.pt"),
                str(tmp_path / "killed.log"))
    text = _run(_cli(bundle, {**overrides, "resume": True}), "resumed run")
    assert "restored the random states" in text and "Epoch[1] Complete" not in text
    a, b = _final(whole), _final(killed)
    assert a["trainer"]["iteration"] == b["trainer"]["iteration"]
    _assert_same_tensors(a["model"], b["model"], "weights")
    _assert_same_tensors(a["optimizer"]["state"], b["optimizer"]["state"], "optimizer")
