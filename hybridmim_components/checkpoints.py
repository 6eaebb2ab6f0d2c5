"""Finding the full training checkpoint to resume from (shared by the pretraining and finetuning bundles)."""
from __future__ import annotations

import glob
import logging
import os
import re

__all__ = ["latest_checkpoint"]

logger = logging.getLogger(__name__)


def latest_checkpoint(ckpt_dir: str | None, prefix: str = "checkpoint") -> str | None:
    """The newest full training checkpoint ``{ckpt_dir}/{prefix}*.pt``, or ``None`` (logged) when there is none.

    Newest = latest modification time; ties are broken by the number in the name (``checkpoint_epoch=12.pt``).
    ``model.pt`` (the best weights alone) is not a full checkpoint and never matches.
    """
    candidates = []
    if ckpt_dir and os.path.isdir(ckpt_dir):
        pattern = os.path.join(glob.escape(ckpt_dir), f"{prefix}*.pt")
        candidates = [p for p in glob.glob(pattern) if os.path.isfile(p)]
    if not candidates:
        logger.info(f"no full checkpoint {prefix}*.pt in '{ckpt_dir}': nothing to resume from.")
        return None

    def key(path: str):
        numbers = re.findall(r"=(\d+)", os.path.basename(path))
        return os.path.getmtime(path), int(numbers[-1]) if numbers else -1

    newest = max(candidates, key=key)
    logger.info(f"resuming from full checkpoint '{newest}'.")
    return newest
