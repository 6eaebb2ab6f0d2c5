"""Checkpoints of both bundle families: resuming training, keeping the best validation across a resume, and loading
the pretraining bundles' weights.

- :func:`latest_checkpoint`: the most advanced readable full training checkpoint in a folder.
- :class:`CrashSafeCheckpointSaver`: MONAI's ``CheckpointSaver`` writing atomically (:class:`AtomicDiskSaver`) and
  never saving an untrained network as the best model.
- :class:`ResumeFromLatestCheckpoint`: attaches a MONAI ``CheckpointLoader`` for it when the bundle's ``resume`` is on,
  ahead of every other start handler; LR schedules continue to the config's end (:class:`ScheduleState`).
- :class:`BestMetricState`: the best validation so far (evaluator state and best-model saver records) as a stateful
  object saved in the full checkpoint, so that a resumed run replaces ``model.pt`` only with a better model.
- :class:`GradScalerState`: the trainer's AMP loss scaler as a stateful object for the full checkpoint, so that a
  resumed mixed-precision run keeps its calibrated loss scale.
- :func:`load_pretrain_checkpoint`: ``model.pt`` (backbone) and optionally the whole pretraining network.
"""
from __future__ import annotations

import glob
import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from ignite.engine import Events
from ignite.handlers.checkpoint import BaseSaveHandler, Checkpoint
from monai.handlers import CheckpointSaver

from hybridmim_components.utils.atomic_files import atomic_open, remove_leftovers
from hybridmim_components.weights.transfer import extract_state_dict

from .run_identity import RunIdentity

__all__ = [
    "latest_checkpoint",
    "AtomicDiskSaver",
    "CrashSafeCheckpointSaver",
    "ScheduleState",
    "ResumeFromLatestCheckpoint",
    "BestMetricState",
    "GradScalerState",
    "load_pretrain_checkpoint",
]

logger = logging.getLogger(__name__)


def _progress(path: str) -> tuple[int, float, dict | None] | None:
    """``(trainer iteration, modification time, run identity record or None)`` of a full checkpoint, or ``None``
    (logged) when unreadable."""
    try:
        # mmap: only the small trainer and identity records are read, not gigabytes of network and optimizer tensors
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        iteration = int(state["trainer"]["iteration"])
    except Exception as err:  # a truncated or foreign file: report it and try the next one
        logger.warning(f"full checkpoint '{path}' is unreadable or holds no trainer state ({type(err).__name__}: "
                       f"{err}): skipped.")
        return None
    identity = state.get("run_identity") if isinstance(state.get("run_identity"), Mapping) else None
    return iteration, os.path.getmtime(path), identity


# the config key that continues a run with changed settings on purpose (named in the logs and errors)
CHANGED_SETTINGS_KEY = "resume_changed_settings"


def latest_checkpoint(ckpt_dir: str | None, prefix: str = "checkpoint", identity: RunIdentity | None = None,
                      resume_changed_settings: bool = False) -> str | None:
    """The most advanced readable full training checkpoint ``{ckpt_dir}/{prefix}*.pt`` of this run, or ``None``
    (logged).

    Most advanced = the largest trainer iteration stored in the file (a copied folder has new modification times;
    the time only breaks ties). A file that cannot be read (truncated by a kill during an old, non-atomic write) is
    named in a warning and the next one is used. ``model.pt`` (the best weights alone) never matches.

    With ``identity`` (this run's :class:`~hybridmim_components.workflow.run_identity.RunIdentity`), only this run's
    files are candidates: a file of another run (other data, width, seed, learning rate, ...) is passed over and named
    with the differing settings; a file of an older version without an identity is a candidate with a warning, after
    this run's own files. When files exist but none is this run's, the resume stops (``ValueError``) unless
    ``resume_changed_settings``, which takes the most advanced of them and says so.
    """
    candidates = []
    if ckpt_dir and os.path.isdir(ckpt_dir):
        pattern = os.path.join(glob.escape(ckpt_dir), f"{prefix}*.pt")
        candidates = [p for p in glob.glob(pattern) if os.path.isfile(p)]
    readable = {path: progress for path in candidates if (progress := _progress(path)) is not None}
    if not readable:
        logger.info(f"no readable full checkpoint {prefix}*.pt in '{ckpt_dir}': nothing to resume from.")
        return None
    # rank: 2 = this run's, 1 = an older version's file without identity, 0 = another run's (taken only on request)
    ranked, other_runs = {}, {}
    for path, (iteration, mtime, saved) in readable.items():
        if identity is None:
            ranked[path] = (2, iteration, mtime)
        elif saved is None:
            ranked[path] = (1, iteration, mtime)
        elif not (differences := identity.differences(saved)):
            ranked[path] = (2, iteration, mtime)
        else:
            other_runs[path] = differences
            if resume_changed_settings:
                ranked[path] = (0, iteration, mtime)
    for path, differences in sorted(other_runs.items()):
        if not resume_changed_settings:
            logger.warning(f"'{path}' is another run's checkpoint, passed over: " + "; ".join(differences) + ".")
    if not ranked:
        raise ValueError(
            f"resume: '{ckpt_dir}' holds only other runs' full checkpoints: "
            + " | ".join(f"{os.path.basename(p)}: " + "; ".join(d) for p, d in sorted(other_runs.items()))
            + f". Resume with the same settings, train elsewhere (another ckpt_dir / bundle_root), or set "
            f"{CHANGED_SETTINGS_KEY} true to continue that run with these settings."
        )
    chosen = max(ranked, key=ranked.get)
    rank, iteration, _ = ranked[chosen]
    if rank == 0:
        logger.warning(f"{CHANGED_SETTINGS_KEY} is true: continuing '{chosen}' (iteration {iteration}) with changed "
                       "settings: " + "; ".join(other_runs[chosen]) + ".")
    elif rank == 1:
        logger.warning(f"'{chosen}' has no run identity (written by an older version): resumed as this run's, its "
                       "settings cannot be compared with this config.")
    passed = sorted(p for p in readable if p != chosen and ranked.get(p, (0,))[0] < rank)
    if passed and rank > 0:
        logger.info("passed over (not this run's, or older without identity): " + ", ".join(passed) + ".")
    logger.info(f"resuming from full checkpoint '{chosen}' (iteration {iteration}).")
    return chosen


class AtomicDiskSaver(BaseSaveHandler):
    """ignite save handler that never leaves a truncated checkpoint and never deletes one before its successor exists.

    A checkpoint is written to a hidden file in the same folder, flushed to disk and renamed over ``name``
    (:func:`~hybridmim_components.utils.atomic_files.atomic_open`), so a kill at any moment leaves either the old or
    the new file.
    ``remove`` (ignite's rotation of old checkpoints, which it calls *before* writing the new one) is deferred until
    the next write has succeeded. Files get the permissions the process's umask gives (MONAI's reason not to
    use ignite's ``atomic=True``, whose temporary file is private). Rank ``save_on_rank`` alone writes, as with
    ignite's saver.

    Args:
        dirname: the folder.
        filename: a fixed file name for every save (``model.pt``, ``checkpoint_final.pt``), or ``None`` for ignite's.
        save_on_rank: the process that writes under DDP.
    """

    def __init__(self, dirname: str, filename: str | None = None, save_on_rank: int = 0) -> None:
        self.dirname = str(dirname)
        self.filename = filename
        self.save_on_rank = save_on_rank
        self._pending_removal: list[str] = []
        os.makedirs(self.dirname, exist_ok=True)
        remove_leftovers(self.dirname)  # at start: temporary files of a run killed mid-write

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        from ignite import distributed as idist

        if idist.get_rank() != self.save_on_rank:
            return
        filename = self.filename or filename
        with atomic_open(os.path.join(self.dirname, filename), "wb", fsync=True) as f:
            torch.save(checkpoint, f)
        for old in self._pending_removal:
            old_path = os.path.join(self.dirname, old)
            if old != filename and os.path.exists(old_path):
                os.remove(old_path)
        self._pending_removal = []

    def remove(self, filename: str) -> None:
        self._pending_removal.append(self.filename or filename)


class CrashSafeCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` (same arguments) writing through :class:`AtomicDiskSaver`, and never saving the
    best model of a validation that ran before any training.

    - Interval, final and key-metric checkpoints are written atomically; an old interval checkpoint is deleted only
      after its successor is complete, so ``resume`` always finds a readable full checkpoint.
    - A resumed run goes on rotating the interrupted run's interval checkpoints (see ``_adopt_earlier_checkpoints``):
      resuming never leaves old full checkpoints piling up; another run's files in the folder are never deleted.
    - A key-metric (best-model) save is skipped when the validated engine's epoch is below ``key_metric_min_epoch``
      (default 1): the validation at start (``exec_at_start``) runs at epoch 0, on the untrained network, which must
      never become ``model.pt`` (a finetune would then start from untrained "pretrained" weights).
    """

    def __init__(self, *args, key_metric_min_epoch: int = 1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.key_metric_min_epoch = int(key_metric_min_epoch)
        self._adopted_earlier = False
        self._resumed = False  # set at the start of a run: did it start from a checkpoint?
        fixed = {"_final_checkpoint": self._final_filename,
                 "_key_metric_checkpoint": kwargs.get("key_metric_filename"),
                 "_interval_checkpoint": None}
        for name, filename in fixed.items():
            checkpoint = getattr(self, name)
            if checkpoint is not None:
                checkpoint.save_handler = AtomicDiskSaver(self.save_dir, filename=filename)

    def attach(self, engine) -> None:
        super().attach(engine)
        if self._interval_checkpoint is not None:
            # runs after the resume loader (ResumeFromLatestCheckpoint puts itself first): a resumed run starts > 0
            engine.add_event_handler(Events.STARTED, self._note_start)

    def _note_start(self, engine) -> None:
        self._resumed = engine.state.iteration > 0

    def interval_completed(self, engine) -> None:
        if self._resumed and not self._adopted_earlier:
            self._adopt_earlier_checkpoints(engine)
        super().interval_completed(engine)

    def _adopt_earlier_checkpoints(self, engine) -> None:
        """Before the first interval save of a resumed run: put this saver's interval checkpoints already in ``save_dir``
        that are behind the run (``…_epoch=N.pt`` with N below the current epoch, or ``…_iteration=N.pt``) into
        ignite's rotation list, so that a resumed run deletes the interrupted run's files as it would have (a fresh
        saver knows none and would leave ``n_saved`` full checkpoints behind at every resume). Files at or ahead of
        the run's progress are another run's: left alone.

        When ``save_dict`` holds this run's :class:`RunIdentity` (the bundles' full checkpoints), only files carrying
        the same identity are adopted (and so deleted by the rotation); another run's files, an older version's
        without an identity and unreadable ones are left alone and named in the log."""
        self._adopted_earlier = True
        checkpoint = self._interval_checkpoint
        if checkpoint is None or checkpoint.n_saved is None or not os.path.isdir(self.save_dir):
            return
        now = engine.state.epoch if self.epoch_level else engine.state.iteration
        name = "checkpoint" if len(self.save_dict) > 1 else next(iter(self.save_dict))  # as ignite names the file
        stem = f"{checkpoint.filename_prefix}_{name}" if checkpoint.filename_prefix else name
        score, ext = re.escape(checkpoint.score_name), re.escape(checkpoint.ext)
        pattern = re.compile(rf"{re.escape(stem)}_{score}=(\d+)\.{ext}")
        known = {item.filename for item in checkpoint._saved}
        earlier = [Checkpoint.Item(int(m.group(1)), f) for f in os.listdir(self.save_dir)
                   if (m := pattern.fullmatch(f)) and f not in known and int(m.group(1)) < now]
        identity = next((v for v in self.save_dict.values() if isinstance(v, RunIdentity)), None)
        if identity is not None:
            not_ours = {item.filename: why for item in earlier
                        if (why := _not_this_run(os.path.join(self.save_dir, item.filename), identity))}
            earlier = [item for item in earlier if item.filename not in not_ours]
            if not_ours:
                logger.info(f"interval checkpoints in '{self.save_dir}' that are not this run's, left alone (not "
                            "rotated, never deleted): "
                            + "; ".join(f"{f} ({why})" for f, why in sorted(not_ours.items())) + ".")
        if earlier:
            checkpoint._saved = sorted([*checkpoint._saved, *earlier], key=lambda item: item.priority)
            while len(checkpoint._saved) > checkpoint.n_saved:  # ignite drops one per save: drop the surplus now
                checkpoint.save_handler.remove(checkpoint._saved.pop(0).filename)  # deleted after the next write
            logger.info(f"interval checkpoints of the interrupted run in '{self.save_dir}' "
                        f"({', '.join(sorted(item.filename for item in earlier))}) rotate as this run's "
                        f"(n_saved={checkpoint.n_saved}).")

    def metrics_completed(self, engine) -> None:
        if engine.state.epoch < self.key_metric_min_epoch:
            logger.info(f"validation at epoch {engine.state.epoch}, before any training step: not a best-model "
                        "candidate, nothing saved.")
            return
        super().metrics_completed(engine)


def _not_this_run(path: str, identity: RunIdentity) -> str:
    """Why the checkpoint ``path`` is not ``identity``'s run (empty when it is): its differing settings, no identity
    (an older version's), or unreadable."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: only the small record read
    except Exception as err:  # truncated or foreign: not provably ours
        return f"unreadable: {type(err).__name__}"
    saved = state.get("run_identity") if isinstance(state, Mapping) else None
    if not isinstance(saved, Mapping):
        return "no run identity: an older version's"
    differences = identity.differences(saved)
    return "another run's: " + "; ".join(differences) if differences else ""


class ScheduleState:
    """An LR scheduler in the full checkpoint whose planned length comes from the config, not from the file.

    ``WarmupCosineSchedule.state_dict()`` holds ``t_total`` and ``warmup_steps``; restoring them when a run is
    resumed with a larger ``max_epochs`` would end the cosine at the old total, after which it climbs back up.
    Here the step count (``last_epoch``) and base rates come from the checkpoint, while ``t_total`` and
    ``warmup_steps`` keep the values the current config computed: the run continues on the schedule of the new
    length, as if it had been planned with the new ``max_epochs`` (the rate is recomputed at once and the change is
    logged). Unchanged settings restore exactly. The file format is the scheduler's own ``state_dict``.
    """

    PLANNED = ("t_total", "warmup_steps")

    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state_dict: Mapping) -> None:
        sched = self.scheduler
        planned = {k: getattr(sched, k) for k in self.PLANNED if hasattr(sched, k)}
        sched.load_state_dict(dict(state_dict))
        changed = {k: (state_dict[k], v) for k, v in planned.items() if k in state_dict and state_dict[k] != v}
        if not changed:
            return
        for k, v in planned.items():
            setattr(sched, k, v)
        # the rate of the next step on the new schedule (LambdaLR computes it only at its next step())
        rates = [base * fn(sched.last_epoch) for fn, base in zip(sched.lr_lambdas, sched.base_lrs)]
        for group, rate in zip(sched.optimizer.param_groups, rates):
            group["lr"] = rate
        sched._last_lr = rates
        logger.warning(
            "the learning-rate schedule of the checkpoint differs from this config ("
            + ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
            + f"): continuing at step {sched.last_epoch} on the schedule of the new length (lr {rates[0]:.3g})."
        )


def _is_lr_scheduler(obj) -> bool:
    return isinstance(obj, torch.optim.lr_scheduler.LRScheduler)


class ResumeFromLatestCheckpoint:
    """Attach a MONAI ``CheckpointLoader`` for the most advanced full checkpoint in ``ckpt_dir`` when ``enabled``.

    Does nothing when disabled; logs a warning and trains from scratch when enabled but ``ckpt_dir`` holds no
    readable checkpoint. The checkpoint is chosen when ``attach`` is called (at ``initialize``) and loaded at the
    engine's start *before every other start handler* (a validation at start must see the restored network and
    best-model record, not the freshly built ones). LR schedulers in ``load_dict`` are restored through
    :class:`ScheduleState` (a longer run continues its schedule to the new end).

    Args:
        ckpt_dir: folder of the full checkpoints written by the trainer's ``CheckpointSaver``.
        load_dict: objects to restore, e.g. ``{"network": ..., "optimizer": ..., "lr_scheduler": ..., "trainer": ...,
            "best_validation": BestMetricState}`` (same keys as the saver's ``save_dict``).
        enabled: the bundle's ``resume`` flag.
        map_location: passed to ``torch.load`` (``weights_only=True``).
        prefix: file prefix of the full checkpoints.
        identity: this run's :class:`~hybridmim_components.workflow.run_identity.RunIdentity` (the saver's
            ``save_dict["run_identity"]``): only this run's checkpoints are resumed (:func:`latest_checkpoint`).
        resume_changed_settings: continue another run's checkpoint (changed settings on purpose), logged.
    """

    def __init__(
        self, ckpt_dir: str, load_dict: dict, enabled: bool = True, map_location=None, prefix: str = "checkpoint",
        identity: RunIdentity | None = None, resume_changed_settings: bool = False,
    ) -> None:
        self.ckpt_dir = ckpt_dir
        self.load_dict = {k: ScheduleState(v) if _is_lr_scheduler(v) else v for k, v in load_dict.items()}
        self.enabled = bool(enabled)
        self.map_location = map_location
        self.prefix = prefix
        self.identity = identity
        self.resume_changed_settings = bool(resume_changed_settings)
        self.path: str | None = None
        self._chosen = False

    def checkpoint(self) -> str | None:
        """The full checkpoint this run resumes from (chosen once), or ``None`` (disabled or nothing to resume)."""
        if self.enabled and not self._chosen:
            self.path = latest_checkpoint(self.ckpt_dir, self.prefix, identity=self.identity,
                                          resume_changed_settings=self.resume_changed_settings)
            self._chosen = True
        return self.path

    def skips_pretrained(self, pretrained_path) -> bool:
        """True (logged) when the run resumes: the checkpoint holds every weight, so ``pretrained_path`` is not
        loaded (a resume needs nothing outside its own folder; the file may have moved)."""
        path = self.checkpoint()
        if path is not None and pretrained_path:
            logger.info(f"resuming from '{path}': pretrained_path '{pretrained_path}' is not loaded (the checkpoint "
                        "holds every weight).")
        return path is not None

    def _entries_to_load(self) -> dict:
        """``load_dict`` less the entries the checkpoint lacks whose object can do without them: one with a
        ``missing_from_checkpoint(path)`` method, called here to say so (``RandomStates``: a checkpoint of an older
        version). Any other missing entry is left to the loader, which stops naming it."""
        saved = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True).keys()
        optional = {k for k, v in self.load_dict.items() if k not in saved and hasattr(v, "missing_from_checkpoint")}
        for key in sorted(optional):
            self.load_dict[key].missing_from_checkpoint(self.path)
        return {k: v for k, v in self.load_dict.items() if k not in optional}

    def attach(self, engine) -> None:
        if not self.enabled:
            return
        from monai.handlers import CheckpointLoader

        if self.checkpoint() is None:
            logger.warning(f"resume is true but '{self.ckpt_dir}' has no {self.prefix}*.pt: training from scratch.")
            return
        CheckpointLoader(load_path=self.path, load_dict=self._entries_to_load(), map_location=self.map_location
                         ).attach(engine)
        # ignite runs handlers in the order they were added; the trainer's own handlers (a ValidationHandler with
        # exec_at_start) were added when it was built, before this: move the loader to the front
        started = engine._event_handlers[Events.STARTED]
        started.insert(0, started.pop())


class BestMetricState:
    """The best validation so far, as a stateful object for the full training checkpoint.

    Without it a resumed run forgets the best key metric of the interrupted run (``val_mean_dice`` when finetuning,
    ``val_recon_mse`` when pretraining) and overwrites ``model.pt`` at its first validation even when worse.
    ``state_dict()`` holds the evaluator's ``best_metric`` / ``best_metric_epoch`` and the key-metric records
    (``(priority, filename)``) of the best-model ``CheckpointSaver``s, which decide whether ``model.pt`` is replaced;
    ``load_state_dict`` restores them (plain floats, ints and strings: loadable with ``weights_only=True``).

    Args:
        evaluator: the validation engine (MONAI ``Workflow``: ``state.best_metric``, ``state.best_metric_epoch``).
        savers: the evaluator's best-model ``CheckpointSaver``s (``None`` entries, e.g. disabled on ranks > 0, and
            handlers without a key-metric record are ignored).
    """

    def __init__(self, evaluator, savers: Sequence = ()) -> None:
        self.evaluator = evaluator
        self.savers = [s for s in savers if s is not None]

    def _checkpoints(self) -> list:
        return [s._key_metric_checkpoint for s in self.savers if getattr(s, "_key_metric_checkpoint", None)]

    def state_dict(self) -> dict:
        state = self.evaluator.state
        return {
            "best_metric": float(getattr(state, "best_metric", -1)),
            "best_metric_epoch": int(getattr(state, "best_metric_epoch", -1)),
            "savers": [c.state_dict() for c in self._checkpoints()],
        }

    def load_state_dict(self, state_dict: Mapping) -> None:
        self.evaluator.state.best_metric = state_dict["best_metric"]
        self.evaluator.state.best_metric_epoch = state_dict["best_metric_epoch"]
        saved = state_dict.get("savers", [])
        checkpoints = self._checkpoints()
        if len(saved) != len(checkpoints):
            logger.warning(
                f"the checkpoint records {len(saved)} best-model saver(s), the bundle has {len(checkpoints)}: "
                "restoring the first ones only."
            )
        for checkpoint, saver_state in zip(checkpoints, saved):
            checkpoint.load_state_dict(saver_state)
        logger.info(
            f"restored the best validation so far: {state_dict['best_metric']} at epoch "
            f"{state_dict['best_metric_epoch']}; model.pt is replaced only by a better one."
        )


class GradScalerState:
    """The trainer's AMP loss scaler (``GradScaler``) as a stateful object for the full training checkpoint.

    A fresh scaler starts at scale 2^16 and halves it (skipping the optimizer step) at each overflow until it finds
    the model's range again: without this object every resume would repeat that calibration. MONAI's trainer creates
    ``trainer.scaler`` only in ``run()`` and only with ``amp`` (``None`` otherwise; a disabled scaler without CUDA),
    so the scaler is looked up when the checkpoint is written or read (both happen inside ``run()``), and a run
    without one saves ``{"state": {}}``. ``state_dict()`` holds plain floats and ints (``weights_only=True``).

    A checkpoint of an AMP run resumed without AMP ignores the saved scale; a checkpoint of a float32 run resumed with
    AMP leaves the fresh scaler as it is. Both are logged.

    Args:
        trainer: the training engine (``trainer.scaler``: a ``GradScaler`` or ``None``).
    """

    def __init__(self, trainer) -> None:
        self.trainer = trainer

    def _scaler(self):
        scaler = getattr(self.trainer, "scaler", None)
        if scaler is None or not getattr(scaler, "is_enabled", lambda: True)():
            return None
        return scaler

    def state_dict(self) -> dict:
        scaler = self._scaler()
        return {"state": dict(scaler.state_dict()) if scaler is not None else {}}

    def load_state_dict(self, state_dict: Mapping) -> None:
        saved = state_dict.get("state") or {}
        scaler = self._scaler()
        if scaler is None:
            if saved:
                logger.info("the checkpoint holds an AMP loss scale but this run has no loss scaler (amp off): ignored.")
            return
        if not saved:
            logger.info("the checkpoint holds no AMP loss scale (saved without amp): the loss scaler starts afresh.")
            return
        scaler.load_state_dict(dict(saved))
        logger.info(f"restored the AMP loss scale {saved.get('scale')} from the checkpoint.")


def _strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop DDP's ``module.`` prefix only: a whole pretraining network's keys start with ``backbone.`` legitimately."""
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def load_pretrain_checkpoint(
    network: torch.nn.Module,
    model_path: str,
    network_path: str | None = None,
    map_location: Any = "cpu",
) -> torch.nn.Module:
    """Load pretrained weights into a HybridMIM pretraining network (evaluate/inference bundles).

    Args:
        network: ``HybridMIMSwinUNETR``/``HybridMIMUNet`` (or a DDP wrapper).
        model_path: ``models/model.pt``, the flat backbone state dict: loaded strictly into ``network.backbone``.
        network_path: optional ``models/pretrain_network.pt``, the flat state dict of the whole pretraining network
            (backbone and heads): loaded strictly first when the file exists, so the number/location heads are the
            trained ones; without it the heads keep their initial weights and only the reconstruction is meaningful.
        map_location: ``torch.load`` map location.

    Raises:
        FileNotFoundError naming ``model_path``; RuntimeError (from ``load_state_dict``) naming mismatched keys.
    """
    net = network.module if hasattr(network, "module") else network
    if network_path and os.path.isfile(network_path):
        state = torch.load(network_path, map_location=map_location, weights_only=True)
        net.load_state_dict(_strip_prefixes(state), strict=True)
        logger.info(f"loaded the pretraining network (backbone and heads) from {network_path}")
    elif network_path:
        logger.warning(
            f"'{network_path}' not found: number/location heads keep their initial weights, only the "
            "reconstruction metric is meaningful."
        )
    if not os.path.isfile(model_path):
        raise FileNotFoundError(f"pretrained backbone weights '{model_path}' not found (train the bundle first).")
    # the backbone file may come from elsewhere too: accept the layouts the finetune loader accepts
    state = extract_state_dict(torch.load(model_path, map_location=map_location, weights_only=True))
    net.backbone.load_state_dict(state, strict=True)
    logger.info(f"loaded the backbone from {model_path}")
    return network
