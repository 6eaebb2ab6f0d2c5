"""Two-level (hierarchical) masking of HybridMIM.

A crop ``C×D×H×W`` is split into first-level *sub-volumes* of side ``s`` and each sub-volume into its 2×2×2
second-level *patches* of side ``p = s/2``. Exactly ``round(mask_ratio · L)`` of the ``L`` patches are masked per
sample. Each sub-volume ``j`` gets two labels: ``count_j`` (0..8 masked patches) and ``location_j`` (which of its 8
patches are masked, C order over the 2×2×2 offsets: index ``4·dz + 2·dy + dx``). Sub-volumes are ordered in C order
over ``(D/s, H/s, W/s)``, the same order as ``features.flatten(2)`` of a ``B×F×D/s×H/s×W/s`` feature map.

Unlike the authors' code, labels are taken from *spatial* 2×2×2 groups and the mask is carried explicitly
(``mim_patch_mask``), so zero padding is never mistaken for masking.
"""
from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable, Transform

__all__ = [
    "HierarchicalMask",
    "HierarchicalMaskd",
    "patch_mask_to_labels",
    "masked_voxels_in_region",
    "patches_to_voxels",
    "MIM_KEYS",
]

MIM_TARGET = "mim_target"
MIM_PATCH_MASK = "mim_patch_mask"
MIM_COUNT = "mim_count"
MIM_LOCATION = "mim_location"
MIM_KEYS = (MIM_TARGET, MIM_PATCH_MASK, MIM_COUNT, MIM_LOCATION)


def patch_mask_to_labels(patch_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sub-volume labels from a patch mask.

    Args:
        patch_mask: ``[..., d, h, w]`` bool, one entry per second-level patch (d, h, w even).

    Returns:
        count ``[..., N]`` int64 and location ``[..., N, 8]`` float32, ``N = d/2 · h/2 · w/2`` in C order.
    """
    *lead, d, h, w = patch_mask.shape
    # [..., d/2, 2, h/2, 2, w/2, 2] -> [..., d/2, h/2, w/2, 2, 2, 2]: group the 2×2×2 patches of each sub-volume
    grouped = patch_mask.reshape(*lead, d // 2, 2, h // 2, 2, w // 2, 2)
    n = len(lead)
    grouped = grouped.permute(*range(n), n, n + 2, n + 4, n + 1, n + 3, n + 5)
    location = grouped.reshape(*lead, (d // 2) * (h // 2) * (w // 2), 8).to(torch.float32)
    count = location.sum(-1).to(torch.int64)
    return count, location


def patches_to_voxels(patch_mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Expand a ``[..., d, h, w]`` patch mask to voxels: ``[..., d·p, h·p, w·p]``."""
    voxels = patch_mask.bool()
    for dim in (-3, -2, -1):
        voxels = voxels.repeat_interleave(patch_size, dim=dim)
    return voxels


def masked_voxels_in_region(
    patch_mask: torch.Tensor, region_slices: Sequence[slice], patch_size: int
) -> torch.Tensor:
    """Voxel mask of the masked voxels inside the reconstruction region.

    Args:
        patch_mask: ``B×d×h×w`` bool patch mask.
        region_slices: three slices (voxel coordinates of the crop) locating the region.
        patch_size: side of a second-level patch in voxels.

    Returns:
        ``B×1×Rd×Rh×Rw`` bool.
    """
    return patches_to_voxels(patch_mask, patch_size)[(slice(None), *region_slices)].unsqueeze(1)


class HierarchicalMask(Randomizable, Transform):
    """Mask a ``C×D×H×W`` image with the two-level scheme (array version).

    Args:
        sub_volume_size: side ``s`` of a first-level sub-volume (voxels); every spatial side must be a multiple.
        patch_size: side ``p`` of a second-level patch; must equal ``s/2`` (2×2×2 patches per sub-volume).
        mask_ratio: fraction of patches masked, in (0, 1); exactly ``round(mask_ratio · L)`` are masked.
        mask_value: value written into masked voxels.

    ``__call__(img)`` returns ``(masked, patch_mask, count, location)`` with shapes ``C×D×H×W``,
    ``D/p×H/p×W/p`` (bool), ``N`` (int64) and ``N×8`` (float32).
    """

    def __init__(
        self, sub_volume_size: int = 32, patch_size: int = 16, mask_ratio: float = 0.4, mask_value: float = 0.0
    ) -> None:
        if int(sub_volume_size) != sub_volume_size or sub_volume_size < 2:
            raise ValueError(f"sub_volume_size must be an integer >= 2, got {sub_volume_size!r}.")
        if patch_size * 2 != sub_volume_size:
            raise ValueError(
                f"patch_size must be half of sub_volume_size (2×2×2 patches per sub-volume): got "
                f"sub_volume_size={sub_volume_size}, patch_size={patch_size}; expected patch_size={sub_volume_size / 2:g}."
            )
        if not 0.0 < float(mask_ratio) < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio!r}.")
        self.sub_volume_size = int(sub_volume_size)
        self.patch_size = int(patch_size)
        self.mask_ratio = float(mask_ratio)
        self.mask_value = float(mask_value)
        self._patch_mask: np.ndarray | None = None

    def check_shape(self, spatial_shape: Sequence[int]) -> tuple[int, int, int]:
        """Patch grid ``(D/p, H/p, W/p)``; raises if a side is not a multiple of the sub-volume size."""
        if len(spatial_shape) != 3:
            raise ValueError(f"HierarchicalMask expects a C×D×H×W image, got spatial shape {tuple(spatial_shape)}.")
        bad = [int(n) for n in spatial_shape if n % self.sub_volume_size]
        if bad:
            raise ValueError(
                f"crop spatial size {tuple(int(n) for n in spatial_shape)} is not a multiple of "
                f"sub_volume_size={self.sub_volume_size} (sides {bad}); choose roi_size as a multiple of it."
            )
        return tuple(int(n) // self.patch_size for n in spatial_shape)  # type: ignore[return-value]

    def randomize(self, grid: Sequence[int]) -> None:
        num_patches = int(np.prod(grid))
        num_masked = round(self.mask_ratio * num_patches)
        chosen = self.R.permutation(num_patches)[:num_masked]
        mask = np.zeros(num_patches, dtype=bool)
        mask[chosen] = True
        self._patch_mask = mask.reshape(grid)

    def __call__(self, img: torch.Tensor, randomize: bool = True):
        img = torch.as_tensor(img) if not isinstance(img, torch.Tensor) else img
        grid = self.check_shape(img.shape[1:])
        if randomize or self._patch_mask is None:
            self.randomize(grid)
        patch_mask = torch.from_numpy(self._patch_mask)
        voxels = patches_to_voxels(patch_mask, self.patch_size)
        masked = img.clone()
        masked[:, voxels.to(img.device)] = self.mask_value
        count, location = patch_mask_to_labels(patch_mask)
        return masked, patch_mask, count, location


class HierarchicalMaskd(Randomizable, MapTransform):
    """Dictionary version of :class:`HierarchicalMask`.

    Replaces ``data[key]`` by the masked image and adds ``mim_target`` (the original), ``mim_patch_mask``,
    ``mim_count`` and ``mim_location`` (see :class:`HierarchicalMask` for shapes). One image key only, since the
    ``mim_*`` outputs have fixed names.
    """

    backend = HierarchicalMask.backend

    def __init__(
        self,
        keys: KeysCollection,
        sub_volume_size: int = 32,
        patch_size: int = 16,
        mask_ratio: float = 0.4,
        mask_value: float = 0.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"HierarchicalMaskd masks one image key, got keys={self.keys}.")
        self.masker = HierarchicalMask(sub_volume_size, patch_size, mask_ratio, mask_value)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self.masker.set_random_state(seed, state)
        return self

    def randomize(self, data=None) -> None:
        self.masker.randomize(data)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            masked, patch_mask, count, location = self.masker(image)
            d[MIM_TARGET] = image
            d[key] = masked
            d[MIM_PATCH_MASK] = patch_mask
            d[MIM_COUNT] = count
            d[MIM_LOCATION] = location
        return d
