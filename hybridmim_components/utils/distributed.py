"""Helpers for running under ``torch.distributed`` (DDP) or without it, transparently."""
from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

__all__ = ["rank_and_world_size", "gather_with_grad", "max_over_ranks", "shutdown_process_group"]


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


def max_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """``x`` reduced with MAX over all ranks (in place, one all-reduce); ``x`` itself without a process group."""
    if rank_and_world_size()[1] > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def shutdown_process_group(timeout_s: float = 600.0) -> None:
    """End of a DDP run: wait for every rank, then destroy the default process group; no-op without one.

    Without the barrier a rank that finished first destroys its process group and exits while others are still
    working (rank 0 writing ``checkpoint_final``, a last collective). gloo: ``monitored_barrier``, which raises after
    ``timeout_s`` (naming the missing ranks) or as soon as a peer has exited, instead of hanging; nccl: ``barrier``
    on this rank's GPU (bounded by the process group's timeout). The group is destroyed even when the barrier fails.
    MONAI's ``run`` calls ``finalize`` only on success: a rank that raised exits without it, and the others fail at
    once in their next collective or in this barrier (gloo: peer closed) instead of waiting.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s))
        else:
            dist.barrier(device_ids=[torch.cuda.current_device()] if torch.cuda.is_available() else None)
    finally:
        dist.destroy_process_group()

