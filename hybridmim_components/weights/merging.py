"""SwinUNETR patch merging in the order public checkpoints were trained with.

MONAI's ``PatchMerging`` (``downsample="merging"``, SwinUNETR's default) halves each spatial size by concatenating
the 8 voxels of every 2×2×2 neighbourhood along channels, then ``norm`` (LayerNorm over 8·C) and ``reduction``
(Linear 8·C -> 2·C). Up to MONAI 1.4 the 8 slices, as offsets (d, h, w), were

    (0,0,0) (1,0,0) (0,1,0) (0,0,1) (1,0,1) (0,1,0) (0,0,1) (1,1,1)

— (0,1,0) and (0,0,1) twice, (1,1,0) and (0,1,1) never. MONAI 1.5 (PR #8285) changed it to

    (0,0,0) (1,0,0) (0,1,0) (0,0,1) (1,1,0) (1,0,1) (0,1,1) (1,1,1)

with the same parameter names and shapes. A checkpoint trained before the change (the public SwinUNETR ones are)
therefore loads into MONAI >= 1.5 without a warning and computes other features: ``reduction``'s columns 4·C..7·C
now see other voxels. :class:`LegacyPatchMerging` restores the old order; its state dict is MONAI's, key for key.
Bundles select it with ``downsample: "merging_legacy"`` (see :func:`resolve_downsample`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets.swin_unetr import PatchMerging

__all__ = ["LEGACY_MERGING_ORDER", "DOWNSAMPLE_CHOICES", "LegacyPatchMerging", "resolve_downsample"]

# (d, h, w) offsets of the 8 slices, in the order MONAI <= 1.4 concatenated them (duplicates are the point)
LEGACY_MERGING_ORDER = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1))

# the values a bundle's ``downsample`` key accepts: MONAI's two names and the legacy order
DOWNSAMPLE_CHOICES = ("merging", "merging_legacy", "mergingv2")


class LegacyPatchMerging(PatchMerging):
    """MONAI's ``PatchMerging`` with the pre-1.5 concatenation order for 3-D input.

    Same constructor (``dim``, ``norm_layer``, ``spatial_dims``) and parameters (``norm``, ``reduction``) as MONAI's,
    so ``SwinUNETR(downsample=LegacyPatchMerging)`` loads any SwinUNETR state dict unchanged.

    Shapes: ``x`` [B, D, H, W, C] (channels last; odd sizes are zero-padded at the end) -> [B, ⌈D/2⌉, ⌈H/2⌉, ⌈W/2⌉,
    2·C]; 2-D input [B, H, W, C] -> [B, ⌈H/2⌉, ⌈W/2⌉, 2·C] exactly as MONAI (its 2-D order never changed).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            return super().forward(x)  # MONAI's 2-D path, and its error for other ranks
        _, d, h, w, _ = x.shape
        if d % 2 or h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
        # 8 × [B, D/2, H/2, W/2, C] -> [B, D/2, H/2, W/2, 8·C]
        x = torch.cat([x[:, i::2, j::2, k::2, :] for i, j, k in LEGACY_MERGING_ORDER], -1)
        return self.reduction(self.norm(x))


def resolve_downsample(name: str) -> str | type:
    """Map a bundle's ``downsample`` value to what ``SwinUNETR(downsample=...)`` takes.

    ``"merging"`` and ``"mergingv2"`` pass through (MONAI resolves them); ``"merging_legacy"`` gives
    :class:`LegacyPatchMerging`, for checkpoints trained with MONAI <= 1.4's ``"merging"``.
    """
    if not isinstance(name, str) or name not in DOWNSAMPLE_CHOICES:
        raise ValueError(
            f"downsample: {name!r} is not one of {', '.join(map(repr, DOWNSAMPLE_CHOICES))} "
            "('merging_legacy' reproduces MONAI <= 1.4's 'merging', which public SwinUNETR checkpoints were trained with)"
        )
    return LegacyPatchMerging if name == "merging_legacy" else name
