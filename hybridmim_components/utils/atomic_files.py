"""Files that are whole or absent: every file the project writes (checkpoints, provenance records, pool stores, packed
bundles, downloads, experiment tables) goes through here, so that a kill, a full disk or an exception half-way never
leaves half a file under the real name for a later reader (a resume, a finetune, a rerun that skips finished work).

The content is written to a hidden temporary file in the same folder (``os.replace`` is atomic only on one file
system), which keeps the name's extensions (nibabel, matplotlib and zipfile pick the format by them), and renamed over
the target once it is complete; on an error the temporary file is removed and the target is left as it was. With
``fsync`` the data reach the disk before the rename and the folder after it (the rename is durable too).

A process killed with SIGKILL mid-write cannot remove its temporary file: the first write of a later process into
the same folder removes the ones of dead processes of this machine (:func:`remove_leftovers`); the name carries the
writer's pid and host, so a live writer's file (here, or on another node of a shared file system) is never touched.
"""
from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

__all__ = ["temporary_name", "atomic_path", "atomic_open", "remove_leftovers"]

logger = logging.getLogger(__name__)

# this machine in temporary names (letters, digits and '-' only: the name's extensions stay the target's)
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:63] or "host"
# .<stem>.part<pid>[@<host>][.<extensions>]; names without host were written by older versions
_TEMPORARY = re.compile(r"\.[^.]*\.part(?P<pid>\d+)(?:@(?P<host>[A-Za-z0-9-]+))?(?:\..*)?")
# folders whose leftovers this process has already removed (once per folder and process)
_CLEANED: set[str] = set()


def temporary_name(path: str | os.PathLike) -> str:
    """``<folder>/.<stem>.part<pid>@<host>.<extensions>`` beside ``path``: hidden (no ``checkpoint*.pt`` or
    ``*.nii.gz`` glob matches it), unique per process and machine, with ``path``'s extensions."""
    folder, name = os.path.split(os.path.abspath(path))
    stem, dot, extensions = name.partition(".")
    return os.path.join(folder, f".{stem}.part{os.getpid()}@{_HOST}{dot}{extensions}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_leftovers(folder: str | os.PathLike) -> list[str]:
    """Remove the temporary files in ``folder`` left by dead processes of this machine (a SIGKILL mid-write);
    returns their names (logged). A live process's file, another machine's and any other file stay."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        match = _TEMPORARY.fullmatch(name)
        if match is None or match["host"] not in (None, _HOST):
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or _alive(pid):
            continue
        try:
            os.remove(os.path.join(folder, name))
        except FileNotFoundError:  # removed by another process meanwhile
            continue
        removed.append(name)
    if removed:
        logger.info(f"removed {len(removed)} temporary file(s) of killed processes in '{folder}': "
                    f"{', '.join(sorted(removed))}.")
    return removed


def _fsync_folder(folder: str) -> None:
    """Make a rename in ``folder`` durable (POSIX: the directory entry is data of the folder)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = False) -> Iterator[str]:
    """``with atomic_path(path) as tmp:`` write the file at ``tmp``; on leaving the block it becomes ``path``.

    Args:
        path: the target; its folder is created.
        fsync: flush the file to the disk before the rename (checkpoints: the rename must not reach the disk before
            the data do, or a power cut leaves an empty file under the real name), and the folder after it.
    """
    target = os.path.abspath(path)
    folder = os.path.dirname(target)
    os.makedirs(folder, exist_ok=True)
    if folder not in _CLEANED:  # the first write of this process here: leftovers of killed writers go
        _CLEANED.add(folder)
        remove_leftovers(folder)
    tmp = temporary_name(target)
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, target)
        if fsync:
            _fsync_folder(folder)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", fsync: bool = False, **kwargs) -> Iterator[IO]:
    """``with atomic_open(path, "wb") as f:`` as ``open``, but ``path`` appears only complete (:func:`atomic_path`).
    ``kwargs`` go to ``open`` (``encoding``, ``newline``)."""
    if not any(m in mode for m in "wx"):
        raise ValueError(f"atomic_open writes a new file: mode must contain 'w' or 'x', got {mode!r}.")
    with atomic_path(path, fsync=fsync) as tmp:
        with open(tmp, mode, **kwargs) as f:
            yield f
