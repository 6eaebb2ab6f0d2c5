"""A MONAI Label server started for a block of code: the tests and the CPU latency benchmark use it.

``running_monailabel`` starts ``start_server.py start_server`` (this folder's wrapper: dcmqi on PATH) on a free port of
127.0.0.1 in its own process group, waits until ``/info/`` answers, yields ``(url, info)`` and stops the whole group
(SIGTERM, then SIGKILL) when the block ends, whatever happens: MONAI Label's uvicorn workers must not outlive a test.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Iterator, Sequence

START_SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "start_server.py")

__all__ = ["MonaiLabelError", "free_port", "log_tail", "running_monailabel", "stop_process_group", "START_SERVER"]


class MonaiLabelError(RuntimeError):
    """The server exited or did not answer; the message ends with its log."""


def free_port() -> int:
    """A TCP port of 127.0.0.1 free at the time of the call."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process_group(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM to ``proc``'s process group (started with ``start_new_session=True``), SIGKILL after ``timeout`` s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def log_tail(path: str, n: int = 6000) -> str:
    """The last ``n`` characters of a server's log (for an error message)."""
    with open(path, errors="replace") as f:
        return f.read()[-n:]


@contextlib.contextmanager
def running_monailabel(app_dir: str, studies: str, models: Sequence[str], log_path: str, *,
                       python: str = sys.executable, cwd: str | None = None, env: dict | None = None,
                       start_timeout_s: float = 300) -> Iterator[tuple[str, dict]]:
    """MONAI Label serving ``models`` (folders of ``app_dir``/model) of the ``monaibundle`` app at ``app_dir`` from
    ``studies`` (a folder or a DICOMweb URL), run by ``python``, its output in ``log_path``. No model zoo download,
    no SAM2, no trainers (inference only). Yields ``(url, the /info/ answer)``."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [python, START_SERVER, "start_server", "--app", app_dir, "--studies", studies,
            "--conf", "models", ",".join(models), "--conf", "zoo_source", "local", "--conf", "sam2", "false",
            "--conf", "skip_trainers", "true", "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + start_timeout_s
            while True:
                if proc.poll() is not None:
                    raise MonaiLabelError(f"the MONAI Label server exited ({proc.returncode}):\n{log_tail(log_path)}")
                try:
                    with urllib.request.urlopen(f"{url}/info/", timeout=5) as r:
                        info = json.load(r)
                    break
                except (urllib.error.URLError, ConnectionError):
                    if time.monotonic() > deadline:
                        raise MonaiLabelError(f"the MONAI Label server did not answer in {start_timeout_s:.0f} s:\n"
                                              f"{log_tail(log_path)}")
                    time.sleep(1)
            yield url, info
        finally:
            stop_process_group(proc)
