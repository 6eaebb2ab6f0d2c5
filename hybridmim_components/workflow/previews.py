"""What the pretraining network reconstructs, for people to look at.

- :class:`MIMPreviewHandler`: masked input | reconstruction | original (middle axial slice) in TensorBoard, once per
  validation run.
- :class:`SaveMIMOutputs`: the masked crop and the region's reconstruction of each inference volume as NIfTI files,
  side by side in world coordinates.

Both read the (not decollated) engine output of the pretraining engines: ``"image"`` (masked crops ``B×C×D×H×W``),
``"label"`` (``mim_*`` targets, ``mim_target`` ``B×C×D×H×W``) and ``"pred"`` (``reconstruction`` ``B×C×Rd×Rh×Rw``,
``region_slices``).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.utils import CommonKeys as Keys

__all__ = ["MIMPreviewHandler", "SaveMIMOutputs"]


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


class SaveMIMOutputs:
    """Write, for each sample of an (inference) engine output, the masked input crop, the unmasked crop and the
    reconstruction of the region as NIfTI files side by side in ``{output_dir}/{image name}/``:
    ``{name}_masked.nii.gz``, ``{name}_original.nii.gz`` and ``{name}_reconstruction.nii.gz``. The reconstruction's
    affine is the crop's, shifted to the region, so all three overlay in a viewer.

    Args:
        output_dir: output folder.
        output_ext: file extension.
        masked_postfix, original_postfix, reconstruction_postfix: file name postfixes.
    """

    def __init__(
        self,
        output_dir: str,
        output_ext: str = ".nii.gz",
        masked_postfix: str = "masked",
        reconstruction_postfix: str = "reconstruction",
        original_postfix: str = "original",
    ) -> None:
        from monai.transforms import SaveImage

        kwargs = dict(output_dir=output_dir, output_ext=output_ext, separate_folder=True, resample=False)
        self.save_masked = SaveImage(output_postfix=masked_postfix, **kwargs)
        self.save_reconstruction = SaveImage(output_postfix=reconstruction_postfix, **kwargs)
        self.save_original = SaveImage(output_postfix=original_postfix, **kwargs)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        from monai.data import MetaTensor, decollate_batch

        output = engine.state.output
        pred = output[Keys.PRED]
        region = tuple(pred["region_slices"])
        start = torch.tensor([float(s.start) for s in region] + [1.0], dtype=torch.float64)
        originals = output[Keys.LABEL]["mim_target"].detach().cpu()  # B×C×D×H×W, the crop before masking
        images = decollate_batch(output[Keys.IMAGE].detach().cpu())
        for image, original, recon in zip(images, originals, pred["reconstruction"].detach().cpu()):
            meta = dict(image.meta) if isinstance(image, MetaTensor) else {}
            affine = torch.as_tensor(meta.get("affine", torch.eye(4)), dtype=torch.float64)
            region_affine = affine.clone()
            region_affine[:, 3] = affine @ start  # origin moved to the region's first voxel
            self.save_masked(image)
            self.save_original(MetaTensor(original.float(), affine=affine, meta=meta))
            self.save_reconstruction(MetaTensor(recon.float(), affine=region_affine, meta={**meta, "affine": region_affine}))
