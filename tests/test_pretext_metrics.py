"""Pretext metrics and their baselines under 2-process DDP (gloo): the epoch value over both ranks' data equals the
single-process value, with uneven per-rank counts so that a mean of per-rank means (or no reduction) would differ."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from hybridmim_components.masking import patch_mask_to_labels
from hybridmim_components.workflow.pretext_baselines import (
    LocationAccuracyBaseline,
    MaskedReconstructionBaseline,
    NumberAccuracyBaseline,
)
from hybridmim_components.workflow.pretext_metrics import LocationAccuracy, MaskedReconstructionMSE, NumberAccuracy

METRICS = {
    "recon_mse": MaskedReconstructionMSE,
    "number_acc": NumberAccuracy,
    "location_acc": LocationAccuracy,
    "recon_mse_baseline": MaskedReconstructionBaseline,
    "number_acc_baseline": NumberAccuracyBaseline,
    "location_acc_baseline": LocationAccuracyBaseline,
}
REGION = (slice(2, 6), slice(2, 6), slice(0, 4))  # in an 8³ crop with 2-voxel patches (4³ patches, 8 sub-volumes)


def _batch(seed: int, size: int, mask_ratio: float) -> tuple[dict, dict]:
    """One not-decollated engine output ``(pred, targets)``: ``size`` crops 1×8×8×8, random patch masks with
    ``mask_ratio``, random reconstruction and head logits."""
    g = torch.Generator().manual_seed(seed)
    patch_mask = torch.rand(size, 4, 4, 4, generator=g) < mask_ratio
    count, location = patch_mask_to_labels(patch_mask)
    scale = 1.0 + seed  # brightness and errors differ by batch
    targets = {"mim_target": torch.rand(size, 1, 8, 8, 8, generator=g) * scale, "mim_patch_mask": patch_mask,
               "mim_count": count, "mim_location": location}
    number_logits = torch.randn(size, 8, 9, generator=g)
    number_logits[..., 3] += 1.5  # the head says 3 often: some answers right, varying by batch
    pred = {"reconstruction": torch.rand(size, 1, 4, 4, 4, generator=g) * scale, "region_slices": REGION,
            "number_logits": number_logits, "location_logits": torch.randn(size, 8, 8, generator=g) + mask_ratio - 0.5}
    return pred, targets


# rank 0: one crop, dense masks; rank 1: five crops in two batches, sparse masks (very different counts and values)
SHARDS = ([(0, 1, 0.9)], [(1, 2, 0.2), (2, 3, 0.3)])


def _epoch_values(batches) -> dict[str, float]:
    values = {}
    for name, cls in METRICS.items():
        metric = cls()
        metric.reset()
        for seed, size, ratio in batches:
            metric.update(_batch(seed, size, ratio))
        values[name] = metric.compute()
    return values


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out[rank] = _epoch_values(SHARDS[rank])
    finally:
        dist.destroy_process_group()


def test_metrics_reduce_over_two_ddp_ranks_to_the_single_process_value():
    single = _epoch_values([b for shard in SHARDS for b in shard])
    per_rank_alone = [_epoch_values(shard) for shard in SHARDS]  # what each rank holds before reduction
    for name, value in single.items():
        # the data is uneven enough that neither the mean of per-rank values nor either rank's value is the answer
        assert abs((per_rank_alone[0][name] + per_rank_alone[1][name]) / 2 - value) > 1e-3, name
        assert all(abs(alone[name] - value) > 1e-3 for alone in per_rank_alone), name
    out = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    for rank in (0, 1):
        for name, value in single.items():
            assert out[rank][name] == pytest.approx(value, rel=1e-12, abs=1e-12), (rank, name, out[rank][name], value)
