"""shutdown_process_group: the multi-GPU bundles' finalize waits for every rank before destroying the process group.

Two gloo processes (this file run as a script, ``init_method`` file://): rank 0 is slow to finish (it writes the final
checkpoint), rank 1 must not tear down before it; a rank that crashed makes the others fail fast, not hang.
"""
from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time

import torch.distributed as dist

from hybridmim_components.utils.distributed import shutdown_process_group

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _two_ranks(tmp_path, case: str, timeout: float = 120) -> list[subprocess.CompletedProcess]:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(rank), str(tmp_path), case], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)  # a hung rank fails here (TimeoutExpired)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
        return results
    finally:
        for p in procs:
            p.kill()


def _worker(rank: int, tmp: str, case: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    done = os.path.join(tmp, "rank0_done")
    if case == "slow_rank0":
        if rank == 0:
            time.sleep(3)  # rank 0 still writing checkpoint_final
            open(done, "w").close()
        shutdown_process_group()
        assert os.path.exists(done), "returned before rank 0 had finished"
        assert not dist.is_initialized()
        print(f"rank {rank} shut down")
    elif case == "rank0_crashes":
        if rank == 0:
            time.sleep(1)
            raise RuntimeError("rank 0 crashed")  # MONAI's run: no finalize
        start = time.monotonic()
        try:
            shutdown_process_group(timeout_s=300)
        finally:
            seconds = time.monotonic() - start
            print(f"rank 1 left the barrier after {seconds:.0f} s; initialized={dist.is_initialized()}")


def test_without_a_process_group_it_does_nothing():
    assert not dist.is_initialized()
    shutdown_process_group()
    shutdown_process_group()


def test_every_rank_waits_for_the_slowest_before_destroying(tmp_path):
    results = _two_ranks(tmp_path, "slow_rank0")
    for rank, r in enumerate(results):
        assert r.returncode == 0 and f"rank {rank} shut down" in r.stdout, r.stderr[-3000:]


def test_a_crashed_rank_makes_the_others_fail_fast_not_hang(tmp_path):
    rank0, rank1 = _two_ranks(tmp_path, "rank0_crashes")
    assert rank0.returncode == 1 and "rank 0 crashed" in rank0.stderr
    assert rank1.returncode == 1 and "Connection closed by peer" in rank1.stderr, rank1.stderr[-3000:]
    seconds = int(rank1.stdout.split("left the barrier after ")[1].split()[0])
    assert seconds < 60 and "initialized=False" in rank1.stdout  # far below timeout_s=300; destroyed anyway


if __name__ == "__main__":  # a rank: python test_ddp_shutdown.py RANK TMP_DIR CASE
    _worker(int(sys.argv[1]), sys.argv[2], sys.argv[3])
