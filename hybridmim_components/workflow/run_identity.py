"""The identity of a training run: which full checkpoints ``--resume true`` may continue.

A full checkpoint carries :class:`RunIdentity`'s record: one canonical text per setting that changes what is trained
(the data, the network's architecture and width, preprocessing, masking, seed, loss weights, optimiser, batch) and a
SHA-256 over all of them. Settings a resume may change (``max_epochs``, workers, device, AMP, output folders, the
path of the pretrained weights, which a resume never reads) are not part of it. The bundles list the settings in
``train#run_identity``, from the config in effect (command-line overrides included).

- :class:`RunIdentity`: the record (a stateful object saved in the full checkpoint) and its comparison with a saved one.
- :func:`datalist_identity`: the data a run trains and validates on, independent of where the dataset lies.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["RunIdentity", "datalist_identity", "FORMAT"]

# version of the record's layout (a later layout may compare differently)
FORMAT = 1


def _canonical(value: Any) -> str:
    """One text per value: JSON with sorted keys; tuples are lists, numbers as JSON writes them (1e-4 == 0.0001)."""
    if hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        value = value.tolist()
    return json.dumps(value, sort_keys=True, default=str)


class RunIdentity:
    """The settings that make a run this run, as a stateful object for the full checkpoint.

    ``state_dict()`` = ``{"format": 1, "digest": sha256 hex, "settings": {name: canonical JSON text}}`` (plain strings:
    loadable with ``weights_only=True``). :meth:`differences` names what differs from a saved record.

    Args:
        settings: setting name -> value (plain values: numbers, strings, lists, dicts; e.g. ``"optimizer#lr":
            1e-4``, ``"data": datalist_identity(...)``).
    """

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self.settings = {str(k): _canonical(v) for k, v in settings.items()}
        text = json.dumps(self.settings, sort_keys=True)
        self.digest = hashlib.sha256(text.encode("utf-8")).hexdigest()

    def state_dict(self) -> dict:
        return {"format": FORMAT, "digest": self.digest, "settings": dict(self.settings)}

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Nothing to restore: the identity comes from the config; the comparison happens when a file is chosen."""

    def differences(self, saved: Mapping) -> list[str]:
        """``"name: <saved> in the checkpoint, <now> now"`` per differing setting (empty: the same run)."""
        if saved.get("digest") == self.digest:
            return []
        theirs = dict(saved.get("settings") or {})
        out = []
        for name in sorted(set(theirs) | set(self.settings)):
            old, new = theirs.get(name, "(not recorded)"), self.settings.get(name, "(not recorded)")
            if old != new:
                out.append(f"{name}: {_short(old)} in the checkpoint, {_short(new)} now")
        return out or ["the identity digest differs"]


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def datalist_identity(
    dataset_dir: str | None,
    data_list_file_path: str,
    sections: Sequence[str] = ("training", "validation"),
    label_fraction: float = 1.0,
    seed: int = 0,
) -> str:
    """SHA-256 of the entries a run uses: each list of ``sections`` as ``load_datalist`` keeps it (``label_fraction``
    applied to ``training``), file paths relative to ``dataset_dir``. A moved dataset keeps its identity; another
    datalist, another fraction or other files do not. The files themselves are not read (a run from a pool store
    may not have the raw files)."""
    from .data import load_datalist, resolve_datalist_path

    path = resolve_datalist_path(dataset_dir, data_list_file_path)
    base = os.path.abspath(os.path.expanduser(str(dataset_dir))) if dataset_dir else os.path.dirname(path)
    with open(path, encoding="utf-8") as f:
        present = set(json.load(f))

    def relative(value):
        if isinstance(value, str) and os.path.isabs(value):
            return os.path.relpath(value, base)
        if isinstance(value, list):
            return [relative(v) for v in value]
        return value

    lists = {}
    for section in sections:
        if section not in present:
            continue
        fraction = label_fraction if section == "training" else 1.0
        entries = load_datalist(dataset_dir, data_list_file_path, section, label_fraction=fraction,
                                check_files=False, seed=seed)
        lists[section] = [{k: relative(v) for k, v in entry.items()} for entry in entries]
    return hashlib.sha256(_canonical(lists).encode("utf-8")).hexdigest()
