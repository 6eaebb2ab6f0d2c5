"""tools/monailabel/server.py without MONAI Label: a server that dies is reported with its log, and stopping a
process group ends its children too (MONAI Label's workers, Orthanc)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from tools.monailabel.server import MonaiLabelError, free_port, running_monailabel, stop_process_group  # noqa: E402


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie awaiting its reaper counts as gone
        return f.read().split(")")[-1].split()[0] != "Z"


def test_a_server_that_exits_is_reported_with_its_log(tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'ModuleNotFoundError: No module named monailabel' >&2\nexit 3\n")
    fake.chmod(0o755)
    log = tmp_path / "server.log"
    with pytest.raises(MonaiLabelError, match=r"exited \(3\):\n.*No module named monailabel"):
        with running_monailabel(str(tmp_path), str(tmp_path), ["m"], str(log), python=str(fake), start_timeout_s=30):
            pytest.fail("the block ran without a server")


def test_stopping_the_group_ends_the_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    proc = subprocess.Popen(["sh", "-c", f"sleep 300 & echo $! > {pid_file}; wait"], start_new_session=True)
    deadline = time.monotonic() + 10
    while not (pid_file.exists() and pid_file.read_text().strip()):
        assert time.monotonic() < deadline, "the shell did not start its child"
        time.sleep(0.05)
    child = int(pid_file.read_text())
    assert _alive(child)
    stop_process_group(proc, timeout=10)
    assert proc.returncode is not None
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "the shell's child outlived the stop"


def test_free_port_can_be_bound():
    import socket

    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
