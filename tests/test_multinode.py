"""Several nodes: two ``torchrun`` launches on this machine form one job of 2 nodes × 1 process (c10d rendezvous, gloo).

This is the multi-node command of the README (``--nnodes 2 --rdzv_backend c10d --rdzv_endpoint HOST:PORT``), with
both "nodes" on 127.0.0.1. Checked against hand computations on the concatenated global batch:

- contrastive negatives cross the nodes: ``gather_with_grad`` returns both nodes' embeddings in rank order, the
  ``DropoutContrastiveLoss`` of each rank and its gradient equal an NT-Xent written out by hand over all ``2·B·world``
  embeddings (``tests/multinode_worker.py``);
- the training shards of the pretraining bundle's ``multi_gpu_train.json`` (``partition_for_rank``) are disjoint and
  cover the pool (with an odd pool, exactly the padding ``even_divisible`` adds is repeated);
- slow: the pretraining bundle itself trains two steps with ``multi_gpu_train.json`` as 2 nodes, started by the
  SLURM script ``tools/slurm/pretrain.sbatch`` (``srun``/``scontrol`` replaced by stand-ins that start both nodes here).
"""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO_ROOT, "tests", "multinode_worker.py")
TIMEOUT = 300
NODES = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")  # both nodes talk over loopback
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def torchrun_nodes(program: list[str], cwd: str, nodes: int = NODES) -> list[str]:
    """Start ``nodes`` torchrun launches of ``program`` (1 process each) joined by one c10d rendezvous; their output.

    Each launch is one "node" as on a cluster: same ``--rdzv_id`` and ``--rdzv_endpoint``, the node rank assigned
    by the rendezvous.
    """
    port = _free_port()
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc_per_node", "1",
                "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", f"test{port}",
                "--local_addr", "127.0.0.1", "--max_restarts", "0"]
    procs = [subprocess.Popen([*launcher, *program], cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(nodes)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for i, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"node launch {i} failed (exit {proc.returncode}):\n{out[-6000:]}"
    return outputs


# ------------------------------------------------------------------------------------------------ hand computation
def nt_xent_by_hand(z1: torch.Tensor, z2: torch.Tensor, temperature: float, anchors: range) -> torch.Tensor:
    """NT-Xent of the global batch ``z1``, ``z2`` (``N×P``) written out, averaged over the samples in ``anchors``
    (each sample is an anchor in both views): ``-log(exp(s_ip/τ) / Σ_{k≠i} exp(s_ik/τ))`` over the ``2N``
    L2-normalised embeddings."""
    z = torch.cat([z1 / z1.norm(dim=1, keepdim=True), z2 / z2.norm(dim=1, keepdim=True)])
    n = z1.shape[0]
    terms = []
    for i in [*anchors, *(a + n for a in anchors)]:
        positive = i + n if i < n else i - n
        sims = [(z[i] * z[k]).sum() / temperature for k in range(2 * n)]
        denominator = sum(torch.exp(s) for k, s in enumerate(sims) if k != i)
        terms.append(-torch.log(torch.exp(sims[positive]) / denominator))
    return torch.stack(terms).mean()


def _pool(root, n: int) -> tuple[str, str]:
    """A datalist of ``n`` training and 2 validation entries; the files exist (empty: only their names matter)."""
    os.makedirs(root / "ct", exist_ok=True)
    names = [f"ct/ct_{i:02d}.nii.gz" for i in range(n + 2)]
    for name in names:
        (root / name).touch()
    datalist = {"training": [{"image": p} for p in names[:n]], "validation": [{"image": p} for p in names[n:]]}
    (root / "datalist.json").write_text(json.dumps(datalist))
    return str(root), str(root / "datalist.json")


@pytest.mark.parametrize("pool_size", [9])
def test_two_nodes_gather_negatives_and_shard_the_pool(tmp_path, pool_size):
    sys.path.insert(0, os.path.dirname(WORKER))
    from multinode_worker import BATCH, _embeddings

    dataset_dir, datalist = _pool(tmp_path / "data", pool_size)
    out = tmp_path / "out"
    out.mkdir()
    torchrun_nodes([WORKER, str(out), dataset_dir, datalist], cwd=REPO_ROOT)
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(NODES)]
    assert [r["world"] for r in results] == [NODES] * NODES
    assert sorted(r["group_rank"] for r in results) == list(range(NODES)), "each launch must be its own node"

    # every rank sees every rank's embeddings, in rank order
    views = [_embeddings(r) for r in range(NODES)]
    all1 = torch.cat([v[0] for v in views])
    all2 = torch.cat([v[1] for v in views])
    for r in results:
        torch.testing.assert_close(torch.tensor(r["gathered"], dtype=torch.float64), all1, rtol=0, atol=0)

    # each rank's loss: its own anchors against the negatives of both nodes
    for r in results:
        rank = r["rank"]
        expected = nt_xent_by_hand(all1, all2, 0.5, range(rank * BATCH, (rank + 1) * BATCH))
        assert r["loss"] == pytest.approx(expected.item(), rel=1e-9)
        local_only = nt_xent_by_hand(*views[rank], 0.5, range(BATCH))  # what a rank without the gather would see
        assert abs(r["loss"] - local_only.item()) > 1e-3
    global_mean = nt_xent_by_hand(all1, all2, 0.5, range(NODES * BATCH))
    for r in results:
        assert r["mean_loss"] == pytest.approx(global_mean.item(), rel=1e-9)

    # gradients: all_gather's backward hands each rank the gradient of the sum of all ranks' losses on its slice;
    # DDP's averaging divides by world, which makes it the gradient of the global mean
    h1, h2 = all1.clone().requires_grad_(True), all2.clone().requires_grad_(True)
    (NODES * nt_xent_by_hand(h1, h2, 0.5, range(NODES * BATCH))).backward()
    for r in results:
        rows = slice(r["rank"] * BATCH, (r["rank"] + 1) * BATCH)
        torch.testing.assert_close(torch.tensor(r["grad_z1"], dtype=torch.float64), h1.grad[rows], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(torch.tensor(r["grad_z2"], dtype=torch.float64), h2.grad[rows], rtol=1e-9, atol=1e-12)

    # the bundle's training shards: same length on every node, together the whole pool, disjoint but for padding
    with open(datalist) as f:
        pool = [os.path.normpath(os.path.join(dataset_dir, e["image"])) for e in json.load(f)["training"]]
    shards = [r["shard"] for r in sorted(results, key=lambda r: r["rank"])]
    per_rank = math.ceil(pool_size / NODES)
    assert [len(s) for s in shards] == [per_rank] * NODES
    seen = [p for s in shards for p in s]
    assert set(seen) == set(pool), "the shards must cover the pool"
    assert len(seen) - len(set(seen)) == per_rank * NODES - pool_size, "only even_divisible's padding may repeat"
    assert all(len(set(s)) == len(s) for s in shards)
    assert shards[0] != sorted(shards[0]) or shards[1] != sorted(shards[1]), "shuffle=True: the order is permuted"


FAKE_SRUN = """#!/bin/bash
# srun stand-in: drop srun's options, start the command once per node (SLURM_NNODES) and wait for all, as srun does
while [[ "$1" == --* ]]; do shift; done
pids=()
for i in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 "$@" & pids+=($!); done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""
FAKE_SCONTROL = """#!/bin/bash
# scontrol stand-in: `scontrol show hostnames NODELIST` prints one host per line; both "nodes" are this machine
for _ in $(seq "$SLURM_NNODES"); do echo 127.0.0.1; done
"""


def _fake_slurm(bin_dir) -> None:
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)


@pytest.mark.slow
def test_pretrain_bundle_trains_as_two_nodes_through_the_slurm_script(tmp_path):
    """``tools/slurm/pretrain.sbatch`` as SLURM runs it on 2 nodes (srun and scontrol replaced by stand-ins that start
    both "nodes" here): the pretraining bundle's ``multi_gpu_train.json``, 2 nodes × 1 process, two tiny steps."""
    from test_pretrain_bundles import SHAPE, TRAIN_SMALL, WIDTH

    from tools.data.make_demo_data import make_unlabeled_ct_pool

    datalist = make_unlabeled_ct_pool(str(tmp_path / "ct"), n_train=2, n_val=2, n_test=1)
    _fake_slurm(tmp_path / "bin")
    ckpt_dir = tmp_path / "models"
    env = dict(_env(), PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", SLURM_NNODES=str(NODES),
               SLURM_JOB_NODELIST="node[0-1]", SLURM_JOB_ID=f"test{_free_port()}", GPUS_PER_NODE="1",
               RDZV_PORT=str(_free_port()), PYTHON=sys.executable)
    args = ["bash", os.path.join(REPO_ROOT, "tools", "slurm", "pretrain.sbatch"), "bundles/hybridmim_unet_pretrain",
            os.path.dirname(datalist), "--data_list_file_path", datalist,
            "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf",
            *WIDTH["unet"], *SHAPE, *TRAIN_SMALL, "--ckpt_dir", str(ckpt_dir), "--output_dir", str(tmp_path / "eval")]
    proc = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"the SLURM script failed (exit {proc.returncode}):\n{log[-6000:]}"
    assert "on 2 nodes x 1 processes, rendezvous 127.0.0.1:" in log
    assert log.count("Metrics -- ") == 1, "validation metrics must be logged by rank 0 only"
    assert log.count("Epoch[1] Complete") >= 1
    full = torch.load(str(ckpt_dir / "checkpoint_final.pt"), map_location="cpu", weights_only=True)
    assert int(full["trainer"]["iteration"]) == 2
    assert (ckpt_dir / "model.pt").is_file()


FAKE_PYTHON = """#!/bin/bash
# python stand-in: record the arguments and the environment torchrun would get
{ printf '%s\\n' "$@"; echo ---; env; } > "$RECORD.$SLURM_NODEID"
"""


def test_slurm_script_starts_one_torchrun_per_node_without_slurm_job_id(tmp_path):
    """What each node's torchrun gets: the c10d rendezvous on the first node, the job id as rendezvous id, the
    bundle's two configs; and no ``SLURM_JOB_ID``, with which ignite would set every process's LOCAL_RANK to
    srun's SLURM_LOCALID (0 on every process of a node, so all would use cuda:0)."""
    _fake_slurm(tmp_path / "bin")
    (tmp_path / "bin" / "python").write_text(FAKE_PYTHON)
    (tmp_path / "bin" / "python").chmod(0o755)
    (tmp_path / "bin" / "scontrol").write_text("#!/bin/bash\nprintf 'gpu-node-%s\\n' 17 18\n")
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", SLURM_NNODES="2",
               SLURM_JOB_NODELIST="gpu-node-[17-18]", SLURM_JOB_ID="4242", SLURM_JOBID="4242", SLURM_GPUS_ON_NODE="4",
               PYTHON=str(tmp_path / "bin" / "python"), RECORD=str(tmp_path / "record"))
    proc = subprocess.run(["bash", os.path.join(REPO_ROOT, "tools", "slurm", "pretrain.sbatch"),
                           "bundles/hybridmim_unet_pretrain", "/data/pool", "--resume", "true"], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for node in range(2):
        args, _, environment = (tmp_path / f"record.{node}").read_text().partition("---\n")
        assert args.split("\n")[:-1] == [
            "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "4", "--rdzv_backend", "c10d",
            "--rdzv_endpoint", "gpu-node-17:29500", "--rdzv_id", "4242", "--max_restarts", "0",
            "-m", "monai.bundle", "run", "--config_file", "['configs/train.json','configs/multi_gpu_train.json']",
            "--dataset_dir", "/data/pool", "--resume", "true"]
        variables = dict(line.split("=", 1) for line in environment.splitlines() if "=" in line)
        assert "SLURM_JOB_ID" not in variables and "SLURM_JOBID" not in variables
        assert variables["PWD"].endswith("bundles/hybridmim_unet_pretrain")


def test_slurm_script_refuses_a_folder_that_is_no_bundle(tmp_path):
    _fake_slurm(tmp_path / "bin")
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", SLURM_NNODES="2",
               SLURM_JOB_NODELIST="n[0-1]", SLURM_JOB_ID="1")
    proc = subprocess.run(["bash", os.path.join(REPO_ROOT, "tools", "slurm", "pretrain.sbatch"),
                           "bundles/no_such_bundle", "/data"], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "no bundles/no_such_bundle/configs/multi_gpu_train.json" in proc.stderr
