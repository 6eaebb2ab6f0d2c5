"""Whether two paths hold the same image: the same file, or a byte-identical copy under another name.

Used wherever a held-out image must be kept out of training data given as separate lists (the pool builder's
``--exclude``, the patient study's folds): comparing paths alone misses a copy, so files of equal size are compared
by SHA-256 (computed once per file version).
"""
from __future__ import annotations

import hashlib
import os
from functools import lru_cache


def sha256_of(path: str) -> str:
    """SHA-256 (hex) of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@lru_cache(maxsize=None)
def _cached_sha256(real_path: str, size: int, mtime_ns: int) -> str:  # size and mtime key the file's version
    return sha256_of(real_path)


def content_hash(path: str) -> str:
    """SHA-256 of a file's bytes, computed once per file version (path, size, modification time)."""
    real = os.path.realpath(path)
    stat = os.stat(real)
    return _cached_sha256(real, stat.st_size, stat.st_mtime_ns)


def same_file(a: str, b: str) -> bool:
    """``a`` and ``b`` are one file (after resolving links) or have equal size and equal SHA-256."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    return content_hash(a) == content_hash(b)
