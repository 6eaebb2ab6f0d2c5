"""Workflow pieces of the HybridMIM pretraining bundles (MONAI/ignite engines).

The pretraining bundles run a MONAI ``SupervisedTrainer``/``SupervisedEvaluator`` whose batch is the collated output
of ``HierarchicalMaskd``. This module supplies what MONAI does not have for that:

- :class:`PrepareMIMBatch`: ``prepare_batch`` returning ``(masked image, {mim_* targets})``, so the engine's
  ``loss_function(outputs, targets)`` is ``HybridMIMLoss(outputs, batch)``.
- :func:`loss_terms_transform`: an ``output_transform`` for ``StatsHandler``/``TensorBoardStatsHandler`` that logs every
  loss term (``loss.last_terms``) and the learning rate.
- pretext metrics (ignite ``Metric`` subclasses, summed then reduced across ranks under DDP):
  :class:`MaskedReconstructionMSE`, :class:`NumberAccuracy`, :class:`LocationAccuracy`.
- :class:`MIMPreviewHandler`: writes masked input | reconstruction | original (middle slice) to TensorBoard.
- :class:`ReseedHandler`: makes each validation run see the same masks.
- :func:`latest_checkpoint` and :class:`ResumeFromLatestCheckpoint`: resume from the newest full checkpoint.
- :func:`load_pretrain_checkpoint`: load ``model.pt`` (backbone) and optionally the whole pretraining network.
- :class:`SaveMIMOutputs`: writes the masked input and the region's reconstruction of each volume as NIfTI.
- :class:`TrainProgressBar`: ignite's tqdm progress bar as a MONAI-style handler (``attach(engine)``).

Engine outputs (``engine.state.output``, not decollated) are dicts with ``"image"`` (masked crops ``B×C×D×H×W``),
``"label"`` (the targets dict of :class:`PrepareMIMBatch`) and ``"pred"`` (the network's output dict:
``reconstruction`` ``B×C×Rd×Rh×Rw``, ``region_slices``, ``number_logits`` ``B×N×9``, ``location_logits`` ``B×N×8``).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce
from monai.engines.utils import PrepareBatch
from monai.utils import CommonKeys as Keys

from hybridmim_components.checkpoints import latest_checkpoint
from hybridmim_components.masking import MIM_KEYS, masked_voxels_in_region
from hybridmim_components.transfer import extract_state_dict

__all__ = [
    "PrepareMIMBatch",
    "loss_terms_transform",
    "lower_is_better",
    "MaskedReconstructionMSE",
    "NumberAccuracy",
    "LocationAccuracy",
    "MIMPreviewHandler",
    "ReseedHandler",
    "latest_checkpoint",
    "ResumeFromLatestCheckpoint",
    "BestMetricState",
    "load_pretrain_checkpoint",
    "SaveMIMOutputs",
    "TrainProgressBar",
]

logger = logging.getLogger(__name__)


# --- batch ------------------------------------------------------------------------------------------------------------
class PrepareMIMBatch(PrepareBatch):
    """``prepare_batch`` of the pretraining engines.

    Args:
        image_key: key of the masked image in the batch.
        target_keys: keys moved to the device and returned as the targets dict (default: the ``mim_*`` keys
            ``mim_target`` ``B×C×D×H×W``, ``mim_patch_mask`` ``B×D/p×H/p×W/p`` bool, ``mim_count`` ``B×N`` int64,
            ``mim_location`` ``B×N×8``).

    ``__call__(batchdata, device, non_blocking, **kwargs) -> (image, targets)``; the image keeps its metadata
    (``MetaTensor``) so savers know the affine; targets are plain tensors.
    """

    def __init__(self, image_key: str = "image", target_keys: Sequence[str] = MIM_KEYS) -> None:
        self.image_key = image_key
        self.target_keys = tuple(target_keys)

    def __call__(self, batchdata: Mapping, device=None, non_blocking: bool = False, **kwargs: Any):
        missing = [k for k in (self.image_key, *self.target_keys) if k not in batchdata]
        if missing:
            raise KeyError(
                f"batch has no key(s) {missing} (keys: {sorted(batchdata)}); the preprocessing must end with "
                "HierarchicalMaskd so that the batch carries the mim_* targets."
            )
        image = batchdata[self.image_key].to(device=device, non_blocking=non_blocking, **kwargs)
        targets = {}
        for k in self.target_keys:
            value = batchdata[k]
            value = value.as_tensor() if hasattr(value, "as_tensor") else torch.as_tensor(value)
            targets[k] = value.to(device=device, non_blocking=non_blocking, **kwargs)
        return image, targets


# --- logging ----------------------------------------------------------------------------------------------------------
def loss_terms_transform(loss: Any, optimizer: torch.optim.Optimizer | None = None, prefix: str = "train_") -> Callable:
    """``output_transform`` logging every loss term and the learning rate.

    Returns a callable ``f(output) -> {prefix + term: float, ..., "lr": float}`` reading ``loss.last_terms`` (the
    detached terms of the last call of ``HybridMIMLoss``: loss, reconstruction, number, location, consistency,
    contrastive) and ``optimizer.param_groups[0]["lr"]``. The engine output itself is not used.
    """

    def transform(output: Any) -> dict[str, float]:
        terms = getattr(loss, "last_terms", None) or {}
        values = {f"{prefix}{k}": float(v) for k, v in terms.items()}
        if optimizer is not None:
            values["lr"] = float(optimizer.param_groups[0]["lr"])
        return values

    return transform


def lower_is_better(current: float, best: float) -> bool:
    """``metric_cmp_fn`` of the evaluator: the key metric (reconstruction MSE) improves when it goes down."""
    return current < best


# --- metrics ----------------------------------------------------------------------------------------------------------
class _SumCountMetric(Metric):
    """Mean of a quantity as ``sum / count`` accumulated over the epoch and all-reduced across ranks.

    Subclasses implement ``batch_sum_count(pred, targets) -> (sum, count)`` on one (not decollated) engine output.
    ``compute`` returns ``nan`` when nothing was counted.
    """

    # ignite picks these keys out of the engine output dict: update() receives (pred dict, targets dict)
    required_output_keys = (Keys.PRED, Keys.LABEL)
    _required_output_keys = required_output_keys

    def __init__(self, output_transform: Callable = lambda x: x, device: str | torch.device = "cpu") -> None:
        self._sum: torch.Tensor
        self._count: torch.Tensor
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._sum = torch.zeros((), dtype=torch.float64, device=self._device)
        self._count = torch.zeros((), dtype=torch.float64, device=self._device)

    @reinit__is_reduced
    def update(self, output: Sequence | Mapping) -> None:
        """``output``: ``(pred, targets)`` (what ignite extracts from the engine output) or the output dict."""
        if isinstance(output, Mapping):
            output = (output.get(Keys.PRED), output.get(Keys.LABEL))
        pred, targets = output
        if not isinstance(pred, Mapping) or not isinstance(targets, Mapping):
            raise ValueError(
                f"{type(self).__name__} expects the network's output dict and the mim_* targets dict "
                f"(engine output keys '{Keys.PRED}', '{Keys.LABEL}', decollate=False), got "
                f"{type(pred).__name__} and {type(targets).__name__}."
            )
        total, count = self.batch_sum_count(pred, targets)
        self._sum += total.detach().to(self._device, torch.float64)
        self._count += torch.as_tensor(count, dtype=torch.float64, device=self._device)

    @sync_all_reduce("_sum", "_count")
    def compute(self) -> float:
        if self._count.item() == 0:
            return float("nan")
        return (self._sum / self._count).item()

    def batch_sum_count(self, pred: Mapping, targets: Mapping) -> tuple[torch.Tensor, float]:
        raise NotImplementedError


class MaskedReconstructionMSE(_SumCountMetric):
    """Mean squared error over the masked voxels inside the reconstruction region (lower is better).

    ``MSE = Σ_{c, v ∈ R, masked} (x̂_cv − x_cv)² / (C · |{v ∈ R, masked}|)``, accumulated over all samples of the
    epoch (a voxel-weighted mean, not a mean of per-sample means).

    Inputs: ``pred["reconstruction"]`` ``B×C×Rd×Rh×Rw``, ``pred["region_slices"]``, ``targets["mim_target"]``
    ``B×C×D×H×W``, ``targets["mim_patch_mask"]`` ``B×d×h×w`` bool (patch side ``p = D/d``).
    """

    def batch_sum_count(self, pred, targets):
        target = targets["mim_target"]
        patch_mask = targets["mim_patch_mask"]
        region = tuple(pred["region_slices"])
        patch_size = target.shape[2] // patch_mask.shape[1]
        voxels = masked_voxels_in_region(patch_mask, region, patch_size)  # B×1×R
        recon = pred["reconstruction"].float()  # B×C×R
        original = target[(slice(None), slice(None), *region)].float()  # B×C×R
        squared = (recon - original) ** 2 * voxels
        return squared.sum(), float(voxels.sum().item()) * recon.shape[1]


class NumberAccuracy(_SumCountMetric):
    """Share of sub-volumes whose number of masked patches is predicted exactly.

    ``argmax(pred["number_logits"], -1) == targets["mim_count"]`` over all ``B×N`` sub-volumes.
    """

    def batch_sum_count(self, pred, targets):
        correct = pred["number_logits"].argmax(-1) == targets["mim_count"]  # B×N
        return correct.sum(), float(correct.numel())


class LocationAccuracy(_SumCountMetric):
    """Per-patch accuracy of the location head: ``(logit > 0) == (label > 0.5)`` over all ``B×N×8`` patches."""

    def batch_sum_count(self, pred, targets):
        correct = (pred["location_logits"] > 0) == (targets["mim_location"] > 0.5)  # B×N×8
        return correct.sum(), float(correct.numel())


# --- TensorBoard preview ----------------------------------------------------------------------------------------------
def _middle_slice(volume: torch.Tensor) -> np.ndarray:
    """``D×H×W`` (RAS) -> the middle axial slice as ``H×W`` rows top-down (anterior up)."""
    array = volume.detach().float().cpu().numpy()
    return np.flipud(array[:, :, array.shape[2] // 2].T)


class MIMPreviewHandler:
    """Write a preview of the first validation sample to TensorBoard once per evaluator run.

    One grey image ``masked input | reconstruction | original`` (the middle axial slice of the region, channel
    ``channel``), scaled to [0, 1] with the original's min/max, tag ``tag``, step ``global_step_transform(epoch)``.

    Args:
        log_dir: TensorBoard folder (a ``SummaryWriter`` is created on first use), or
        summary_writer: an existing writer.
        tag: image tag.
        channel: which input channel to show (BraTS: 0 = first modality).
        global_step_transform: maps the evaluator's epoch (the trainer's epoch during training) to the step.
    """

    def __init__(
        self,
        log_dir: str | None = "./runs",
        summary_writer=None,
        tag: str = "val_preview",
        channel: int = 0,
        global_step_transform: Callable[[int], int] = lambda epoch: epoch,
    ) -> None:
        self.log_dir = log_dir
        self._writer = summary_writer
        self.tag = tag
        self.channel = int(channel)
        self.global_step_transform = global_step_transform
        self._written = False

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _started(self, engine: Engine) -> None:
        self._written = False

    @staticmethod
    def preview(output: Mapping, channel: int = 0) -> np.ndarray:
        """``H×3W`` float image in [0, 1] for the first sample of an engine output."""
        pred = output[Keys.PRED]
        region = tuple(pred["region_slices"])
        crop = (0, channel, *region)
        masked = output[Keys.IMAGE][crop]
        original = output[Keys.LABEL]["mim_target"][crop]
        recon = pred["reconstruction"][0, channel]
        parts = [_middle_slice(v) for v in (masked, recon, original)]
        low, high = float(parts[2].min()), float(parts[2].max())
        scale = high - low if high > low else 1.0
        return np.clip((np.concatenate(parts, axis=1) - low) / scale, 0.0, 1.0)

    def __call__(self, engine: Engine) -> None:
        if self._written:
            return
        self._written = True
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self.log_dir)
        image = self.preview(engine.state.output, self.channel)
        step = self.global_step_transform(engine.state.epoch)
        self._writer.add_image(self.tag, image, global_step=step, dataformats="HW")
        self._writer.flush()


class ReseedHandler:
    """Reset random states at the start of every run of an engine, so each validation sees the same masks.

    Args:
        seed: the seed.
        transform: a ``Randomizable`` transform (e.g. the validation ``Compose``): ``set_random_state(seed)``
            (covers ``num_workers=0``).
        generator: the DataLoader's ``torch.Generator``: ``manual_seed(seed)`` (covers worker processes, whose seeds
            come from it).
    """

    def __init__(self, seed: int = 0, transform=None, generator: torch.Generator | None = None) -> None:
        self.seed = int(seed)
        self.transform = transform
        self.generator = generator

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine | None = None) -> None:
        if self.transform is not None and hasattr(self.transform, "set_random_state"):
            self.transform.set_random_state(seed=self.seed)
        if self.generator is not None:
            self.generator.manual_seed(self.seed)



# --- checkpoints ------------------------------------------------------------------------------------------------------
class ResumeFromLatestCheckpoint:
    """Attach a MONAI ``CheckpointLoader`` for the newest full checkpoint in ``ckpt_dir`` when ``enabled``.

    Does nothing when disabled; logs a warning and trains from scratch when enabled but ``ckpt_dir`` holds no
    checkpoint. The checkpoint is chosen when ``attach`` is called (at ``initialize``).

    Args:
        ckpt_dir: folder of the full checkpoints written by the trainer's ``CheckpointSaver``.
        load_dict: objects to restore, e.g. ``{"network": ..., "optimizer": ..., "lr_scheduler": ..., "trainer": ...}``
            (same keys as the saver's ``save_dict``).
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

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        from monai.handlers import CheckpointLoader

        self.path = latest_checkpoint(self.ckpt_dir, self.prefix)
        if self.path is None:
            logger.warning(f"resume is true but '{self.ckpt_dir}' has no {self.prefix}*.pt: training from scratch.")
            return
        logger.info(f"resuming from {self.path}")
        CheckpointLoader(load_path=self.path, load_dict=self.load_dict, map_location=self.map_location).attach(engine)


class BestMetricState:
    """The best validation so far, as a stateful object for the full training checkpoint.

    Without it a resumed run would forget the best ``val_recon_mse`` of the interrupted run and overwrite
    ``model.pt`` at its first validation even when worse. ``state_dict()`` holds the evaluator's ``best_metric`` /
    ``best_metric_epoch`` and the key-metric records of the best-model ``CheckpointSaver``s; ``load_state_dict``
    restores them (plain floats, ints and strings: loadable with ``weights_only=True``).

    Args:
        evaluator: the validation engine (MONAI ``Workflow``: ``state.best_metric``, ``state.best_metric_epoch``).
        savers: the evaluator's best-model ``CheckpointSaver``s (``None`` entries, e.g. disabled on ranks > 0,
            are ignored).
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
        for checkpoint, saver_state in zip(self._checkpoints(), saved):
            checkpoint.load_state_dict(saver_state)


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


# --- inference output -------------------------------------------------------------------------------------------------
class SaveMIMOutputs:
    """Write, for each sample of an (inference) engine output, the masked input crop and the reconstruction of the
    region as NIfTI files side by side in ``{output_dir}/{image name}/``: ``{name}_masked.nii.gz`` and
    ``{name}_reconstruction.nii.gz``. The reconstruction's affine is the crop's, shifted to the region, so both
    overlay in a viewer.

    Args:
        output_dir: output folder.
        output_ext: file extension.
        masked_postfix, reconstruction_postfix: file name postfixes.
    """

    def __init__(
        self,
        output_dir: str,
        output_ext: str = ".nii.gz",
        masked_postfix: str = "masked",
        reconstruction_postfix: str = "reconstruction",
    ) -> None:
        from monai.transforms import SaveImage

        kwargs = dict(output_dir=output_dir, output_ext=output_ext, separate_folder=True, resample=False)
        self.save_masked = SaveImage(output_postfix=masked_postfix, **kwargs)
        self.save_reconstruction = SaveImage(output_postfix=reconstruction_postfix, **kwargs)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        from monai.data import MetaTensor, decollate_batch

        output = engine.state.output
        pred = output[Keys.PRED]
        region = tuple(pred["region_slices"])
        start = torch.tensor([float(s.start) for s in region] + [1.0], dtype=torch.float64)
        for image, recon in zip(decollate_batch(output[Keys.IMAGE].detach().cpu()), pred["reconstruction"].detach().cpu()):
            meta = dict(image.meta) if isinstance(image, MetaTensor) else {}
            affine = torch.as_tensor(meta.get("affine", torch.eye(4)), dtype=torch.float64)
            region_affine = affine.clone()
            region_affine[:, 3] = affine @ start  # origin moved to the region's first voxel
            self.save_masked(image)
            self.save_reconstruction(MetaTensor(recon.float(), affine=region_affine, meta={**meta, "affine": region_affine}))


# --- progress bar -----------------------------------------------------------------------------------------------------
class TrainProgressBar:
    """ignite's tqdm ``ProgressBar`` as a handler with ``attach(engine)`` (MONAI handler lists call it that way).

    Shows the iteration within the epoch and, when ``output_transform`` is given, its values (e.g. the loss).
    """

    def __init__(self, output_transform: Callable | None = None, persist: bool = False) -> None:
        self.output_transform = output_transform
        self.persist = persist

    def attach(self, engine: Engine) -> None:
        try:
            from ignite.handlers import ProgressBar
        except ImportError:  # ignite < 0.5
            from ignite.contrib.handlers import ProgressBar

        ProgressBar(persist=self.persist).attach(engine, output_transform=self.output_transform)
