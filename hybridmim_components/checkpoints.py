"""Checkpoints of both bundle families: resuming training, keeping the best validation across a resume, and loading
the pretraining bundles' weights.

- :func:`latest_checkpoint`: the newest full training checkpoint in a folder.
- :class:`ResumeFromLatestCheckpoint`: attaches a MONAI ``CheckpointLoader`` for it when the bundle's ``resume`` is on.
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

from hybridmim_components.transfer import extract_state_dict

__all__ = [
    "latest_checkpoint",
    "ResumeFromLatestCheckpoint",
    "BestMetricState",
    "GradScalerState",
    "load_pretrain_checkpoint",
]

logger = logging.getLogger(__name__)


def latest_checkpoint(ckpt_dir: str | None, prefix: str = "checkpoint") -> str | None:
    """The newest full training checkpoint ``{ckpt_dir}/{prefix}*.pt``, or ``None`` (logged) when there is none.

    Newest = latest modification time; ties are broken by the number in the name (``checkpoint_epoch=12.pt``).
    ``model.pt`` (the best weights alone) is not a full checkpoint and never matches.
    """
    candidates = []
    if ckpt_dir and os.path.isdir(ckpt_dir):
        pattern = os.path.join(glob.escape(ckpt_dir), f"{prefix}*.pt")
        candidates = [p for p in glob.glob(pattern) if os.path.isfile(p)]
    if not candidates:
        logger.info(f"no full checkpoint {prefix}*.pt in '{ckpt_dir}': nothing to resume from.")
        return None

    def key(path: str):
        numbers = re.findall(r"=(\d+)", os.path.basename(path))
        return os.path.getmtime(path), int(numbers[-1]) if numbers else -1

    newest = max(candidates, key=key)
    logger.info(f"resuming from full checkpoint '{newest}'.")
    return newest


class ResumeFromLatestCheckpoint:
    """Attach a MONAI ``CheckpointLoader`` for the newest full checkpoint in ``ckpt_dir`` when ``enabled``.

    Does nothing when disabled; logs a warning and trains from scratch when enabled but ``ckpt_dir`` holds no
    checkpoint. The checkpoint is chosen when ``attach`` is called (at ``initialize``).

    Args:
        ckpt_dir: folder of the full checkpoints written by the trainer's ``CheckpointSaver``.
        load_dict: objects to restore, e.g. ``{"network": ..., "optimizer": ..., "lr_scheduler": ..., "trainer": ...,
            "best_validation": BestMetricState}`` (same keys as the saver's ``save_dict``).
        enabled: the bundle's ``resume`` flag.
        map_location: passed to ``torch.load`` (``weights_only=True``).
        prefix: file prefix of the full checkpoints.
    """

    def __init__(
        self, ckpt_dir: str, load_dict: dict, enabled: bool = True, map_location=None, prefix: str = "checkpoint"
    ) -> None:
        self.ckpt_dir = ckpt_dir
        self.load_dict = load_dict
        self.enabled = bool(enabled)
        self.map_location = map_location
        self.prefix = prefix
        self.path: str | None = None

    def attach(self, engine) -> None:
        if not self.enabled:
            return
        from monai.handlers import CheckpointLoader

        self.path = latest_checkpoint(self.ckpt_dir, self.prefix)
        if self.path is None:
            logger.warning(f"resume is true but '{self.ckpt_dir}' has no {self.prefix}*.pt: training from scratch.")
            return
        CheckpointLoader(load_path=self.path, load_dict=self.load_dict, map_location=self.map_location).attach(engine)


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
