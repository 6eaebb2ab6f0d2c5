"""Files that are whole or absent: every file the project writes (checkpoints, provenance records, pool stores, packed
bundles, downloads, experiment tables) goes through here, so that a kill, a full disk or an exception half-way never
leaves half a file under the real name for a later reader (a resume, a finetune, a rerun that skips finished work).

The content is written to a hidden temporary file in the same folder (``os.replace`` is atomic only on one file
system), which keeps the name's extensions (nibabel, matplotlib and zipfile pick the format by them), and renamed over
the target once it is complete; on an error the temporary file is removed and the target is left as it was.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

__all__ = ["temporary_name", "atomic_path", "atomic_open"]


def temporary_name(path: str | os.PathLike) -> str:
    """``<folder>/.<stem>.part<pid>.<extensions>`` beside ``path``: hidden (no ``checkpoint*.pt`` or ``*.nii.gz``
    glob matches it), unique per process, with ``path``'s extensions."""
    folder, name = os.path.split(os.path.abspath(path))
    stem, dot, extensions = name.partition(".")
    return os.path.join(folder, f".{stem}.part{os.getpid()}{dot}{extensions}")


@contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = False) -> Iterator[str]:
    """``with atomic_path(path) as tmp:`` write the file at ``tmp``; on leaving the block it becomes ``path``.

    Args:
        path: the target; its folder is created.
        fsync: flush the file to the disk before the rename (checkpoints: the rename must not reach the disk before
            the data do, or a power cut leaves an empty file under the real name).
    """
    target = os.path.abspath(path)
    os.makedirs(os.path.dirname(target), exist_ok=True)
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
