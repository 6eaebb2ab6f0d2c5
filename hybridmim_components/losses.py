"""The five HybridMIM losses and their weighted sum.

Shapes: ``B`` batch, ``C`` channels, ``N`` sub-volumes per crop, ``P`` embedding size, ``R*`` region sides.

    L = L_rec + 0.1·L_num + 0.1·L_loc + 0.01·L_cons + 0.1·L_cl      (paper defaults)

Every term is computed in float32 under mixed precision (:func:`computed_in_float32`): autocast would otherwise run
the contrastive similarities in float16/bfloat16 (cosines near 1 lose most of their mantissa, and ``exp(sim/τ)``
overflows float16 for small τ) and the squared errors of the reconstruction in the network's half precision.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .utils.distributed import gather_with_grad, rank_and_world_size
from .masking import MIM_COUNT, MIM_LOCATION, MIM_PATCH_MASK, MIM_TARGET, masked_voxels_in_region

__all__ = [
    "PartialRegionReconstructionLoss",
    "MaskNumberLoss",
    "MaskLocationLoss",
    "MaskConsistencyLoss",
    "DropoutContrastiveLoss",
    "HybridMIMLoss",
    "computed_in_float32",
]

_HALF = (torch.float16, torch.bfloat16)


def computed_in_float32(forward):
    """Decorate a loss ``forward(self, *tensors)`` to run with autocast off and half-precision inputs cast to float32.

    Other arguments (integer/bool targets, slices, float64 tensors) pass through unchanged. The casts are
    differentiable, so gradients reach half-precision network outputs in their own dtype.
    """

    @functools.wraps(forward)
    def wrapper(self, *args):
        args = tuple(a.float() if isinstance(a, torch.Tensor) and a.dtype in _HALF else a for a in args)
        device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        if not torch.amp.is_autocast_available(device):
            return forward(self, *args)
        with torch.autocast(device, enabled=False):
            return forward(self, *args)

    return wrapper


class PartialRegionReconstructionLoss(nn.Module):
    """Mean squared error over the masked voxels inside the target region (pixel level).

    ``L_rec = Σ_{v ∈ R, masked} Σ_c (x̂_cv − x_cv)² / (C · |{v ∈ R, masked}|)``; 0 when no voxel of the region is
    masked (the sum is then empty; the result keeps the graph so backward still works).

    Args (forward):
        reconstruction: ``B×C×Rd×Rh×Rw``, the decoder output for the region.
        target: ``B×C×D×H×W``, the unmasked crop.
        patch_mask: ``B×d×h×w`` bool, True = masked patch.
        region_slices: three slices locating the region in the crop.
    """

    @computed_in_float32
    def forward(self, reconstruction, target, patch_mask, region_slices) -> torch.Tensor:
        patch_size = target.shape[2] // patch_mask.shape[1]
        mask = masked_voxels_in_region(patch_mask, region_slices, patch_size)  # B×1×R
        target = target[(slice(None), slice(None), *region_slices)]
        squared = (reconstruction - target) ** 2 * mask
        denominator = mask.sum() * reconstruction.shape[1]
        return squared.sum() / denominator.clamp(min=1)


class MaskNumberLoss(nn.Module):
    """Cross-entropy of the 9-way number logits ``B×N×9`` against the counts ``B×N`` (0..8), mean over B·N."""

    @computed_in_float32
    def forward(self, number_logits: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(number_logits.reshape(-1, number_logits.shape[-1]), count.reshape(-1).long())


class MaskLocationLoss(nn.Module):
    """Binary cross-entropy of the location logits ``B×N×8`` against the 0/1 locations ``B×N×8``, mean."""

    @computed_in_float32
    def forward(self, location_logits: torch.Tensor, location: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(location_logits, location.to(location_logits.dtype))


class MaskConsistencyLoss(nn.Module):
    """Agreement between the location head and the number head (region level).

    ``L_cons = CE(number_logits, Σ_k 1[σ(loc_k) > 0.5]) + MSE(Σ_k σ(loc_k), Σ_n n · softmax(number_logits)_n)``

    The first term teaches the number head the count the location head implies (its target is discrete). The second
    compares two *soft* counts, so it carries gradient into both heads (the authors' code detached both sides).
    """

    @computed_in_float32
    def forward(self, number_logits: torch.Tensor, location_logits: torch.Tensor) -> torch.Tensor:
        location_prob = torch.sigmoid(location_logits)  # B×N×8
        hard_count = (location_prob > 0.5).sum(-1)  # B×N
        ce = F.cross_entropy(number_logits.reshape(-1, number_logits.shape[-1]), hard_count.reshape(-1))
        counts = torch.arange(number_logits.shape[-1], device=number_logits.device, dtype=location_prob.dtype)
        expected_count = (number_logits.softmax(-1) * counts).sum(-1)  # B×N
        return ce + F.mse_loss(location_prob.sum(-1), expected_count)


class DropoutContrastiveLoss(nn.Module):
    """NT-Xent between two dropout views (sample level, SimCSE).

    ``L_cl = −1/(2B) Σ_i log( exp(sim(z_i, z_i⁺)/τ) / Σ_{k≠i} exp(sim(z_i, z_k)/τ) )`` with cosine similarity over
    the ``2B`` embeddings of both views. Under ``torch.distributed`` the embeddings of every rank are gathered with
    gradient, so the negatives are the whole global batch; each rank averages over its own anchors and DDP's
    gradient averaging turns that into the global mean.

    Args:
        temperature: τ (authors: 0.5).

    Forward: ``z1``, ``z2``: ``B×P`` embeddings of the same samples under two dropout masks.
    """

    def __init__(self, temperature: float = 0.5) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}.")
        self.temperature = float(temperature)

    @computed_in_float32
    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        if z1.shape != z2.shape:
            raise ValueError(f"the two views must have the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}.")
        batch = z1.shape[0]
        rank, world = rank_and_world_size()
        all1, all2 = gather_with_grad(F.normalize(z1, dim=1)), gather_with_grad(F.normalize(z2, dim=1))
        total = all1.shape[0]  # B · world
        z = torch.cat([all1, all2], dim=0)  # 2·total×P
        local = torch.arange(rank * batch, (rank + 1) * batch, device=z.device)
        anchors = torch.cat([local, local + total])  # this rank's rows of both views
        positives = torch.cat([local + total, local])
        logits = z[anchors] @ z.t() / self.temperature  # 2B×2·total
        is_self = torch.zeros_like(logits, dtype=torch.bool)
        is_self[torch.arange(2 * batch, device=z.device), anchors] = True
        logits = logits.masked_fill(is_self, float("-inf"))  # the sum runs over k ≠ i
        return F.cross_entropy(logits, positives)


class HybridMIMLoss(nn.Module):
    """Weighted sum of the five losses, called as ``loss(outputs, batch)``.

    ``outputs`` is the pretraining network's dict; ``batch`` the collated ``HierarchicalMaskd`` output on the
    network's device (``mim_target``, ``mim_patch_mask``, ``mim_count``, ``mim_location``). After each call
    ``last_terms`` holds detached scalars ``loss``, ``reconstruction``, ``number``, ``location``, ``consistency``,
    ``contrastive`` for logging. The contrastive term is 0 when the network returns no embeddings (eval mode, or
    ``contrastive_views="none"``).
    """

    TERMS = ("reconstruction", "number", "location", "consistency", "contrastive")

    def __init__(
        self,
        reconstruction_weight: float = 1.0,
        number_weight: float = 0.1,
        location_weight: float = 0.1,
        consistency_weight: float = 0.01,
        contrastive_weight: float = 0.1,
        temperature: float = 0.5,
    ) -> None:
        super().__init__()
        self.weights = dict(
            zip(
                self.TERMS,
                (reconstruction_weight, number_weight, location_weight, consistency_weight, contrastive_weight),
            )
        )
        self.reconstruction = PartialRegionReconstructionLoss()
        self.number = MaskNumberLoss()
        self.location = MaskLocationLoss()
        self.consistency = MaskConsistencyLoss()
        self.contrastive = DropoutContrastiveLoss(temperature)
        self.last_terms: dict[str, torch.Tensor] = {}

    def forward(self, outputs: dict, batch: dict) -> torch.Tensor:
        number_logits, location_logits = outputs["number_logits"], outputs["location_logits"]
        terms = {
            "reconstruction": self.reconstruction(
                outputs["reconstruction"], batch[MIM_TARGET], batch[MIM_PATCH_MASK], outputs["region_slices"]
            ),
            "number": self.number(number_logits, batch[MIM_COUNT]),
            "location": self.location(location_logits, batch[MIM_LOCATION]),
            "consistency": self.consistency(number_logits, location_logits),
        }
        embeddings = outputs.get("embeddings")
        terms["contrastive"] = (
            self.contrastive(*embeddings)
            if embeddings is not None
            else number_logits.new_zeros((), dtype=torch.float32)
        )
        total = sum(self.weights[name] * value for name, value in terms.items())
        self.last_terms = {"loss": total.detach(), **{name: value.detach() for name, value in terms.items()}}
        return total
