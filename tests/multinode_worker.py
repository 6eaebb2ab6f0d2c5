"""One rank of the multi-node check (``tests/test_multinode.py``), started by ``torchrun`` on each "node".

Runs the project's own code under a gloo process group that spans the nodes and writes what it saw to
``<out_dir>/rank<R>.json``; the test compares it with hand computations. Every rank draws the same seeded
embeddings for every rank (``_embeddings(r)``), so each can also recompute the whole global batch by itself.

    torchrun --nnodes 2 --nproc_per_node 1 --rdzv_backend c10d --rdzv_endpoint 127.0.0.1:PORT \\
        tests/multinode_worker.py OUT_DIR DATASET_DIR DATALIST

1. ``gather_with_grad``: the gathered ``(B·world)×P`` tensor, and the contrastive loss
   (``DropoutContrastiveLoss``) and its gradient on this rank's embeddings.
2. The pretraining bundle's training shard: ``train#dataset#data`` of
   ``bundles/hybridmim_swin_pretrain/configs/{train,multi_gpu_train}.json`` parsed with ``monai.bundle.ConfigParser``
   (``partition_for_rank`` on the bundle's datalist), for the datalist given.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from hybridmim_components.utils.distributed import gather_with_grad, rank_and_world_size  # noqa: E402
from hybridmim_components.losses import DropoutContrastiveLoss  # noqa: E402

BATCH, DIM = 3, 8  # per-rank batch B and embedding size P
BUNDLE = os.path.join(REPO_ROOT, "bundles", "hybridmim_swin_pretrain")


def _embeddings(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two dropout views ``B×P`` of rank ``rank`` (float64, seeded by the rank alone)."""
    g = torch.Generator().manual_seed(1000 + rank)
    return (torch.randn(BATCH, DIM, generator=g, dtype=torch.float64),
            torch.randn(BATCH, DIM, generator=g, dtype=torch.float64))


def bundle_training_shard(dataset_dir: str, datalist: str) -> list[str]:
    """This rank's ``train#dataset#data`` as the multi-GPU pretraining config computes it (image paths)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([os.path.join(BUNDLE, "configs", "train.json"),
                        os.path.join(BUNDLE, "configs", "multi_gpu_train.json")])
    parser["bundle_root"] = BUNDLE
    parser["dataset_dir"] = dataset_dir
    parser["data_list_file_path"] = datalist
    parser.get_parsed_content("imports")  # the config's "$import ..." / "$from ... import load_datalist"
    return [entry["image"] for entry in parser.get_parsed_content("train#dataset#data")]


def main(out_dir: str, dataset_dir: str, datalist: str) -> None:
    dist.init_process_group(backend="gloo")
    rank, world = rank_and_world_size()
    z1, z2 = (z.clone().requires_grad_(True) for z in _embeddings(rank))
    gathered = gather_with_grad(z1)
    loss = DropoutContrastiveLoss(temperature=0.5)(z1, z2)
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)  # what DDP's averaging makes of the per-rank losses
    mean_loss /= world
    shard = bundle_training_shard(dataset_dir, datalist)
    result = {
        "rank": rank,
        "world": world,
        "local_rank": int(os.environ["LOCAL_RANK"]),
        "group_rank": int(os.environ["GROUP_RANK"]),  # the node's index in the rendezvous
        "gathered": gathered.detach().tolist(),
        "loss": loss.item(),
        "mean_loss": mean_loss.item(),
        "grad_z1": z1.grad.tolist(),
        "grad_z2": z2.grad.tolist(),
        "shard": shard,
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
