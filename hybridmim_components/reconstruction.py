"""Inference-time HybridMIM reconstruction networks: one tensor out, the backbone's own parameter names.

The pretraining networks (``HybridMIMUNet``, ``HybridMIMSwinUNETR``) return a dict (reconstruction, mask-number and
mask-location logits, embeddings) because the loss needs all of it. Inference only needs the reconstruction of the
central region, and the pretraining bundle only ships the backbone (``models/model.pt``, a flat ``BasicUNet`` /
``SwinUNETR`` state dict). The classes here *are* that backbone (subclasses, no extra parameters, so ``model.pt``
loads strictly and ``ckpt_export`` works on it) with a forward that runs the encoder on the whole crop and the decoder
on the region only, exactly as the pretraining network does, and returns the reconstruction ``B×C×Rd×Rh×Rw``:
what ``network_data_format#outputs#pred`` of the pretraining bundles describes and what the model zoo's
``verify_net_in_out`` checks. ``RegionReconstructionUNet`` can be scripted (TorchScript); SwinUNETR cannot.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import List

import torch
from monai.networks.nets import BasicUNet, SwinUNETR

__all__ = ["RegionReconstructionUNet", "RegionReconstructionSwinUNETR", "region_start"]


def region_start(size: int, region: int, stride: int) -> int:
    """First voxel of a ``region``-long window centred in ``size`` voxels, snapped to a multiple of ``stride``.

    Same placement as ``HybridMIMNet.region_slices``: ``stride * floor((size - region) / 2 / stride + 1/2)``,
    written with integer division so that TorchScript compiles it.
    """
    return stride * ((size - region + stride) // (2 * stride))


def _crop(x: torch.Tensor, starts: List[int], region: List[int], stride: int) -> torch.Tensor:
    """Crop a ``B×C×d×h×w`` feature map of the given stride to the region (voxel starts/sizes); contiguous copy
    (convolutions on strided views take slow paths)."""
    return x[
        :,
        :,
        starts[0] // stride : (starts[0] + region[0]) // stride,
        starts[1] // stride : (starts[1] + region[1]) // stride,
        starts[2] // stride : (starts[2] + region[2]) // stride,
    ].contiguous()


def _region_size(value: int | Sequence[int], decoder_stride: int, name: str) -> List[int]:
    sizes = [int(value)] * 3 if isinstance(value, int) else [int(v) for v in value]
    if len(sizes) != 3 or any(s <= 0 or s % decoder_stride for s in sizes):
        raise ValueError(
            f"region_size={value!r} must be 3 positive multiples of the decoder stride {decoder_stride} of {name}."
        )
    return sizes


def _check_and_place(spatial: List[int], region: List[int], bottleneck_stride: int, decoder_stride: int) -> List[int]:
    """Starts of the region in a crop of ``spatial`` voxels; ValueError on crops the network cannot take."""
    starts: List[int] = []
    for i in range(3):
        if spatial[i] % bottleneck_stride != 0:
            raise ValueError(
                "input spatial shape " + str(spatial) + " must be multiples of " + str(bottleneck_stride)
                + " (the network's down-sampling)."
            )
        if region[i] > spatial[i]:
            raise ValueError("region_size " + str(region) + " is larger than the crop " + str(spatial) + ".")
        starts.append(region_start(spatial[i], region[i], decoder_stride))
    return starts


class RegionReconstructionUNet(BasicUNet):
    """``BasicUNet(spatial_dims=3, in_channels, out_channels=in_channels, features, dropout)`` whose forward returns
    the reconstruction of the central region, as ``HybridMIMUNet`` computes it.

    Args:
        in_channels: image channels (also the reconstruction's channels).
        features: the 6 channel counts of ``BasicUNet``.
        dropout: ``BasicUNet`` dropout (no parameters; inactive in eval mode).
        region_size: reconstructed region (voxels), multiples of 8 (the decoder output is cropped at stride 8).

    ``forward(x)``: ``x`` ``B×C×D×H×W`` (sides multiples of 16) -> ``B×C×Rd×Rh×Rw``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        features: Sequence[int] = (32, 32, 64, 128, 256, 32),
        dropout: float = 0.1,
        region_size: int | Sequence[int] = (64, 64, 64),
    ) -> None:
        super().__init__(
            spatial_dims=3, in_channels=in_channels, out_channels=in_channels, features=tuple(features), dropout=dropout
        )
        self.bottleneck_stride = 16  # four down-samplings
        self.decoder_stride = 8  # the decoder output is cropped after upcat_4
        self.region_size: List[int] = _region_size(region_size, self.decoder_stride, type(self).__name__)

    def region_slices(self, spatial_shape: Sequence[int]) -> tuple[slice, slice, slice]:
        """Where the reconstruction sits in a crop of ``spatial_shape`` voxels (as ``HybridMIMNet.region_slices``)."""
        return tuple(  # type: ignore[return-value]
            slice(s, s + r) for s, r in zip(
                _check_and_place([int(v) for v in spatial_shape], self.region_size, self.bottleneck_stride,
                                 self.decoder_stride),
                self.region_size,
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        region = self.region_size
        starts = _check_and_place([x.shape[2], x.shape[3], x.shape[4]], region, self.bottleneck_stride,
                                  self.decoder_stride)
        x0 = self.conv_0(x)  # encoder on the whole crop: strides 1, 2, 4, 8, 16
        x1 = self.down_1(x0)
        x2 = self.down_2(x1)
        x3 = self.down_3(x2)
        x4 = self.down_4(x3)
        u4 = _crop(self.upcat_4(x4, x3), starts, region, 8)  # coarsest decoder stage on the whole grid, then crop
        u3 = self.upcat_3(u4, _crop(x2, starts, region, 4))
        u2 = self.upcat_2(u3, _crop(x1, starts, region, 2))
        u1 = self.upcat_1(u2, _crop(x0, starts, region, 1))
        return self.final_conv(u1)  # [B, C, Rd, Rh, Rw]


class RegionReconstructionSwinUNETR(SwinUNETR):
    """``SwinUNETR(in_channels, out_channels=in_channels, feature_size, drop_rate)`` whose forward returns the
    reconstruction of the central region, as ``HybridMIMSwinUNETR`` computes it. Not scriptable (SwinUNETR is not).

    Args:
        in_channels: image channels (also the reconstruction's channels).
        feature_size: SwinUNETR width.
        drop_rate: SwinUNETR dropout (no parameters; inactive in eval mode).
        region_size: reconstructed region (voxels), multiples of 16 (cropped after ``decoder5``, stride 16).
        downsample: patch-merging order (``"merging"``, ``"merging_legacy"``: MONAI's before 1.5, ``"mergingv2"``).
        use_v2: SwinUNETR-v2 (a residual conv block before each Swin stage).

    ``forward(x)``: ``x`` ``B×C×D×H×W`` (sides multiples of 32) -> ``B×C×Rd×Rh×Rw``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        feature_size: int = 48,
        drop_rate: float = 0.1,
        region_size: int | Sequence[int] = (64, 64, 64),
        downsample: str | type = "merging",
        use_v2: bool = False,
    ) -> None:
        from hybridmim_components.weights.merging import resolve_downsample

        super().__init__(in_channels=in_channels, out_channels=in_channels, feature_size=feature_size,
                         drop_rate=drop_rate, use_v2=use_v2,
                         downsample=resolve_downsample(downsample) if isinstance(downsample, str) else downsample)
        self.bottleneck_stride = 32  # patch embedding (2) and four patch mergings
        self.decoder_stride = 16  # cropped after decoder5
        self.region_size = _region_size(region_size, self.decoder_stride, type(self).__name__)

    region_slices = RegionReconstructionUNet.region_slices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        region = self.region_size
        starts = _check_and_place(list(x.shape[2:]), region, self.bottleneck_stride, self.decoder_stride)
        hs0, hs1, hs2, hs3, hs4 = self.swinViT(x, self.normalize)  # strides 2, 4, 8, 16, 32 over the whole crop
        dec3 = _crop(self.decoder5(self.encoder10(hs4), hs3), starts, region, 16)  # only stage on the whole grid
        dec2 = self.decoder4(dec3, self.encoder4(_crop(hs2, starts, region, 8)))
        dec1 = self.decoder3(dec2, self.encoder3(_crop(hs1, starts, region, 4)))
        dec0 = self.decoder2(dec1, self.encoder2(_crop(hs0, starts, region, 2)))
        out = self.decoder1(dec0, self.encoder1(_crop(x, starts, region, 1)))
        return self.out(out)  # [B, C, Rd, Rh, Rw]
