"""HybridMIM pretraining networks: a MONAI backbone plus perception heads and a partial-region decoder.

The backbone is the plain MONAI network (``SwinUNETR`` or ``BasicUNet``) stored as ``self.backbone`` with its own
parameter names, so ``backbone.state_dict()`` loads into a finetuning network of the same class and width with only
the last 1×1×1 layer left out. The adapters call the backbone's own stages by name; nothing is copied.

One forward pass (paper, Fig. 2):

1. ``forward_encoder``: the encoder sees the whole masked crop. With two-sided dropout contrast the batch is stacked
   twice and encoded once, so both dropout views carry gradient (SimCSE).
2. ``forward_heads``: the bottleneck is average-pooled to one feature per sub-volume; two linear heads give 9 number
   logits and 8 location logits per sub-volume.
3. ``forward_embedding``: the bottleneck, averaged over space and projected, is the sample embedding.
4. ``forward_decoder``: the decoder computes *only the target region*. The coarsest decoder stage runs on the whole
   (tiny) bottleneck grid; its output and every skip feature are then cropped to the region, so every finer stage
   works on the region alone. A region equal to the crop gives full reconstruction (the ablation baseline).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets import BasicUNet, SwinUNETR
from torch import nn

__all__ = ["HybridMIMNet", "HybridMIMSwinUNETR", "HybridMIMUNet", "CONTRASTIVE_VIEWS"]

CONTRASTIVE_VIEWS = ("two_sided", "one_sided", "none")
NUM_PATCHES_PER_SUB_VOLUME = 8  # 2×2×2 second-level patches


def _triple(value: int | Sequence[int], name: str) -> tuple[int, int, int]:
    values = (value,) * 3 if isinstance(value, int) else tuple(int(v) for v in value)
    if len(values) != 3:
        raise ValueError(f"{name} must be an int or 3 ints, got {value!r}.")
    return values  # type: ignore[return-value]


def crop_to_region(x: torch.Tensor, region: Sequence[slice], stride: int) -> torch.Tensor:
    """Crop a ``B×C×d×h×w`` feature map of the given stride to a region given in voxel slices.

    Returns a contiguous copy: convolutions (and their backward) on a strided view take slow paths.
    """
    return x[(slice(None), slice(None), *(slice(s.start // stride, s.stop // stride) for s in region))].contiguous()


class HybridMIMNet(nn.Module):
    """Backbone-independent part of the pretraining network: heads, region placement and the forward pass.

    Subclasses set ``backbone``, ``bottleneck_stride`` (voxels per bottleneck cell), ``decoder_stride`` (stride at
    which the decoder output is cropped: regions must align with it) and implement ``forward_encoder`` and
    ``forward_decoder``.

    Args:
        bottleneck_channels: channels of the bottleneck feature map read by the heads.
        sub_volume_size: first-level sub-volume side (voxels), a multiple of ``bottleneck_stride``.
        region_size: side(s) of the reconstructed region (voxels).
        projection_dim: size of the contrastive embedding.
        contrastive_views: ``"two_sided"`` (both dropout views with gradient, one stacked encoder pass),
            ``"one_sided"`` (the authors' variant: second view encoded under ``no_grad``), or ``"none"``.
    """

    backbone: nn.Module
    bottleneck_stride: int
    decoder_stride: int

    def __init__(
        self,
        bottleneck_channels: int,
        sub_volume_size: int,
        region_size: int | Sequence[int],
        projection_dim: int,
        contrastive_views: str,
    ) -> None:
        super().__init__()
        if contrastive_views not in CONTRASTIVE_VIEWS:
            raise ValueError(f"contrastive_views must be one of {CONTRASTIVE_VIEWS}, got {contrastive_views!r}.")
        if sub_volume_size % self.bottleneck_stride:
            raise ValueError(
                f"sub_volume_size={sub_volume_size} must be a multiple of the bottleneck stride "
                f"{self.bottleneck_stride} of {type(self).__name__} (one bottleneck cell per {self.bottleneck_stride} voxels)."
            )
        self.region_size = _triple(region_size, "region_size")
        bad = [r for r in self.region_size if r <= 0 or r % self.decoder_stride]
        if bad:
            raise ValueError(
                f"region_size={self.region_size} must be positive multiples of the decoder stride "
                f"{self.decoder_stride} of {type(self).__name__}."
            )
        self.sub_volume_size = int(sub_volume_size)
        self.contrastive_views = contrastive_views
        self.number_head = nn.Linear(bottleneck_channels, NUM_PATCHES_PER_SUB_VOLUME + 1)  # counts 0..8
        self.location_head = nn.Linear(bottleneck_channels, NUM_PATCHES_PER_SUB_VOLUME)
        self.projection = nn.Linear(bottleneck_channels, projection_dim)

    # --- to implement per backbone -----------------------------------------------------------------------------
    def forward_encoder(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder features of ``x`` (``B×C×D×H×W``), finest first; the last one is the bottleneck."""
        raise NotImplementedError

    def forward_decoder(self, x: torch.Tensor, features: list[torch.Tensor], region: tuple[slice, ...]) -> torch.Tensor:
        """Reconstruction ``B×C×Rd×Rh×Rw`` of the region from the input and its encoder features."""
        raise NotImplementedError

    # --- shared -----------------------------------------------------------------------------------------------
    def region_slices(self, spatial_shape: Sequence[int]) -> tuple[slice, slice, slice]:
        """Where the target region sits in a crop: centred, snapped to the decoder stride."""
        slices = []
        for size, region in zip(spatial_shape, self.region_size):
            if region > size:
                raise ValueError(f"region_size={self.region_size} is larger than the crop {tuple(spatial_shape)}.")
            centred = (size - region) / 2
            start = self.decoder_stride * math.floor(centred / self.decoder_stride + 0.5)
            slices.append(slice(start, start + region))
        return tuple(slices)  # type: ignore[return-value]

    def check_crop(self, roi_size: int | Sequence[int], patch_size: int | None = None) -> tuple[slice, slice, slice]:
        """Fail fast, when a bundle starts, on crop settings that would only break at the first batch.

        Checks that ``roi_size`` is a multiple of the sub-volume size, that ``patch_size`` (if given) is half of it,
        and that the region fits the crop; returns where the region will sit.
        """
        roi = _triple(roi_size, "roi_size")
        bad = [n for n in roi if n <= 0 or n % self.sub_volume_size]
        if bad:
            raise ValueError(
                f"roi_size={roi} must be positive multiples of sub_volume_size={self.sub_volume_size} (sides {bad})."
            )
        if patch_size is not None and 2 * int(patch_size) != self.sub_volume_size:
            raise ValueError(
                f"patch_size={patch_size} must be half of sub_volume_size={self.sub_volume_size} (2×2×2 patches)."
            )
        return self.region_slices(roi)

    def forward_heads(self, bottleneck: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Number logits ``B×N×9`` and location logits ``B×N×8`` from the bottleneck ``B×F×d×h×w``."""
        k = self.sub_volume_size // self.bottleneck_stride
        per_sub_volume = F.avg_pool3d(bottleneck, kernel_size=k) if k > 1 else bottleneck  # B×F×D/s×H/s×W/s
        per_sub_volume = per_sub_volume.flatten(2).transpose(1, 2)  # B×N×F, C order over sub-volumes
        return self.number_head(per_sub_volume), self.location_head(per_sub_volume)

    def forward_embedding(self, bottleneck: torch.Tensor) -> torch.Tensor:
        """Sample embedding ``B×P``: spatial mean of the bottleneck, projected."""
        return self.projection(bottleneck.mean(dim=(2, 3, 4)))

    def forward(self, x: torch.Tensor) -> dict:
        """Args: x: masked crops ``B×C×D×H×W``.

        Returns a dict with ``reconstruction`` (``B×C×Rd×Rh×Rw``), ``region_slices`` (3 slices into the crop),
        ``number_logits`` (``B×N×9``), ``location_logits`` (``B×N×8``) and ``embeddings``: two ``B×P`` dropout views,
        or ``None`` in eval mode or with ``contrastive_views="none"``.
        """
        if x.ndim != 5:
            raise ValueError(f"expected a B×C×D×H×W batch, got shape {tuple(x.shape)}.")
        region = self.check_crop(x.shape[2:])  # sides are multiples of the sub-volume; where the region sits
        batch = x.shape[0]
        contrast = self.training and self.contrastive_views != "none"
        embeddings = None
        if contrast and self.contrastive_views == "two_sided":
            both = self.forward_encoder(torch.cat([x, x], dim=0))  # 2B: two dropout views in one pass
            features = [f[:batch] for f in both]
            embeddings = tuple(self.forward_embedding(both[-1]).split(batch, dim=0))
        else:
            features = self.forward_encoder(x)
            if contrast:  # one-sided: the second view gives a target without gradient
                with torch.no_grad():
                    second = self.forward_embedding(self.forward_encoder(x)[-1])
                embeddings = (self.forward_embedding(features[-1]), second)
        number_logits, location_logits = self.forward_heads(features[-1])
        return {
            "reconstruction": self.forward_decoder(x, features, region),
            "region_slices": region,
            "number_logits": number_logits,
            "location_logits": location_logits,
            "embeddings": embeddings,
        }


class HybridMIMSwinUNETR(HybridMIMNet):
    """HybridMIM around MONAI's ``SwinUNETR`` (tokens of 2³ voxels; bottleneck at stride 32, ``16·feature_size``
    channels, i.e. one token per 32³ sub-volume).

    ``backbone`` is ``SwinUNETR(in_channels, out_channels=in_channels, feature_size, drop_rate, use_checkpoint,
    downsample)``: the finetune bundles build the same network with another ``out_channels``. ``downsample``
    ``"merging_legacy"`` is the patch-merging order of MONAI before 1.5
    (:mod:`hybridmim_components.weights.merging`), for warm starts from weights trained with it; ``use_v2`` adds
    SwinUNETR-v2's residual conv blocks (VoCo weights).
    """

    bottleneck_stride = 32
    decoder_stride = 16  # regions are cropped after decoder5 (stride 16)

    def __init__(
        self,
        in_channels: int = 1,
        feature_size: int = 48,
        drop_rate: float = 0.1,
        sub_volume_size: int = 32,
        region_size: int | Sequence[int] = (64, 64, 64),
        projection_dim: int = 384,
        contrastive_views: str = "two_sided",
        use_checkpoint: bool = False,
        downsample: str | type = "merging",
        use_v2: bool = False,
    ) -> None:
        super().__init__(16 * feature_size, sub_volume_size, region_size, projection_dim, contrastive_views)
        from hybridmim_components.weights.merging import resolve_downsample

        self.backbone = SwinUNETR(
            in_channels=in_channels,
            out_channels=in_channels,
            feature_size=feature_size,
            drop_rate=drop_rate,
            use_checkpoint=use_checkpoint,
            downsample=resolve_downsample(downsample) if isinstance(downsample, str) else downsample,
            use_v2=use_v2,
        )

    def forward_encoder(self, x: torch.Tensor) -> list[torch.Tensor]:
        # x: [B, C, D, H, W] -> [x, hs0 (D/2), hs1 (D/4), hs2 (D/8), hs3 (D/16), hs4 (D/32, 16·fs channels)]
        bb = self.backbone
        return [x, *bb.swinViT(x, bb.normalize)]

    def forward_decoder(self, x: torch.Tensor, features: list[torch.Tensor], region: tuple[slice, ...]) -> torch.Tensor:
        bb = self.backbone
        _, hs0, hs1, hs2, hs3, hs4 = features
        dec3 = bb.decoder5(bb.encoder10(hs4), hs3)  # [B, 8fs, D/16, ...]: the only stage on the whole grid
        dec3 = crop_to_region(dec3, region, 16)
        # the skip blocks (encoder1..4) run on cropped inputs: the decoder side never sees voxels outside the region
        dec2 = bb.decoder4(dec3, bb.encoder4(crop_to_region(hs2, region, 8)))
        dec1 = bb.decoder3(dec2, bb.encoder3(crop_to_region(hs1, region, 4)))
        dec0 = bb.decoder2(dec1, bb.encoder2(crop_to_region(hs0, region, 2)))
        out = bb.decoder1(dec0, bb.encoder1(crop_to_region(x, region, 1)))
        return bb.out(out)  # [B, C, Rd, Rh, Rw]


class HybridMIMUNet(HybridMIMNet):
    """HybridMIM around MONAI's ``BasicUNet`` (four down-samplings: bottleneck at stride 16, ``features[4]``
    channels; a 32³ sub-volume is 2³ bottleneck cells, average-pooled).

    ``backbone`` is ``BasicUNet(spatial_dims=3, in_channels, out_channels=in_channels, features, dropout)``.
    """

    bottleneck_stride = 16
    decoder_stride = 8  # regions are cropped after upcat_4 (stride 8)

    def __init__(
        self,
        in_channels: int = 1,
        features: Sequence[int] = (32, 32, 64, 128, 256, 32),
        dropout: float = 0.1,
        sub_volume_size: int = 32,
        region_size: int | Sequence[int] = (64, 64, 64),
        projection_dim: int = 384,
        contrastive_views: str = "two_sided",
    ) -> None:
        features = tuple(int(f) for f in features)
        if len(features) != 6:
            raise ValueError(f"features must list 6 channel counts as BasicUNet takes them, got {features}.")
        super().__init__(features[4], sub_volume_size, region_size, projection_dim, contrastive_views)
        self.backbone = BasicUNet(
            spatial_dims=3, in_channels=in_channels, out_channels=in_channels, features=features, dropout=dropout
        )

    def forward_encoder(self, x: torch.Tensor) -> list[torch.Tensor]:
        # x: [B, C, D, H, W] -> x0 (D), x1 (D/2), x2 (D/4), x3 (D/8), x4 (D/16, bottleneck)
        bb = self.backbone
        x0 = bb.conv_0(x)
        x1 = bb.down_1(x0)
        x2 = bb.down_2(x1)
        x3 = bb.down_3(x2)
        return [x0, x1, x2, x3, bb.down_4(x3)]

    def forward_decoder(self, x: torch.Tensor, features: list[torch.Tensor], region: tuple[slice, ...]) -> torch.Tensor:
        bb = self.backbone
        x0, x1, x2, x3, x4 = features
        u4 = crop_to_region(bb.upcat_4(x4, x3), region, 8)  # coarsest stage on the whole grid, then crop
        u3 = bb.upcat_3(u4, crop_to_region(x2, region, 4))
        u2 = bb.upcat_2(u3, crop_to_region(x1, region, 2))
        u1 = bb.upcat_1(u2, crop_to_region(x0, region, 1))
        return bb.final_conv(u1)  # [B, C, Rd, Rh, Rw]
