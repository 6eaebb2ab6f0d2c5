"""Helpers for running under ``torch.distributed`` (DDP) or without it, transparently."""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["rank_and_world_size", "gather_with_grad"]


def rank_and_world_size() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` when no process group is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (``B×...``, same shape on every rank) from all ranks in rank order, keeping the gradient.

    Uses ``torch.distributed.nn.functional.all_gather``, whose backward sends each rank the gradient of its own
    slice summed over ranks; without a process group it returns ``x`` itself.
    """
    _, world = rank_and_world_size()
    if world == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)
