"""What a set of pretrained weights was trained with, written beside the weights and checked by a finetune.

Weights only compute what they computed in pretraining when the finetune feeds them the same kind of input: the same
voxel spacing, orientation, intensity window and scaling, and (for SwinUNETR) the same patch-merging order. A
pretraining bundle therefore writes a *provenance record* beside its weights (``models/model.provenance.json`` for
``models/model.pt``), and the finetune bundles compare it with their own preprocessing when they load the weights:
each mismatch is named in a warning, or stops the run with ``strict_preprocessing true``.

A record is a JSON object::

    {"format": "hybridmim-provenance/1",
     "backbone": "SwinUNETR", "width": 48, "in_channels": 1, "downsample": "merging",
     "preprocessing": {"orientation": "RAS", "spacing": [1.5, 1.5, 2.0], "crop": [96, 96, 96],
                       "intensity": {"kind": "window", "a_min": -1000.0, "a_max": 1000.0,
                                     "b_min": 0.0, "b_max": 1.0, "clip": true}},
     "pool_size": 120, "steps_planned": 100000, "steps_done": 100000,
     "monai_version": "1.6.1", "torch_version": "2.13.0", "source": "hybridmim_swin_pretrain"}

``intensity`` is ``{"kind": "window", a_min, a_max, b_min, b_max, clip}`` (MONAI ``ScaleIntensityRanged``) or
``{"kind": "zscore", "nonzero": ..., "channel_wise": ...}`` (``NormalizeIntensityd``). Fields a publisher did not
state are ``null`` and are not compared.
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping

from hybridmim_components.utils.atomic_files import atomic_open

__all__ = [
    "PROVENANCE_FORMAT",
    "PreprocessingMismatchError",
    "provenance_path",
    "read_provenance",
    "write_provenance",
    "provenance_text",
    "make_record",
    "runtime_versions",
    "window_intensity",
    "zscore_intensity",
    "compare_preprocessing",
    "record_from_layout",
    "ProvenanceRecorder",
]

logger = logging.getLogger(__name__)

PROVENANCE_FORMAT = "hybridmim-provenance/1"
COMPARED = ("orientation", "spacing", "intensity", "crop")  # the preprocessing fields a finetune must match


class PreprocessingMismatchError(ValueError):
    """The finetune's preprocessing differs from the one the weights were trained with (``strict_preprocessing``)."""


def provenance_path(weights: str | os.PathLike) -> str:
    """The sidecar of a weights file: ``models/model.pt`` -> ``models/model.provenance.json``."""
    return os.path.splitext(os.fspath(weights))[0] + ".provenance.json"


def read_provenance(weights: str | os.PathLike) -> dict | None:
    """The record beside ``weights``, or ``None`` when there is none; a malformed one raises naming the file."""
    path = provenance_path(weights)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the provenance record {path}: {e}") from e
    if not isinstance(record, Mapping) or record.get("format") != PROVENANCE_FORMAT:
        raise ValueError(f"{path} is not a provenance record (expected a JSON object with format {PROVENANCE_FORMAT!r}).")
    return dict(record)


def provenance_text(record: Mapping) -> str:
    """A record as its file holds it (sorted keys, indented, a final newline): written here and packed as is."""
    return json.dumps(_plain(record), indent=2, sort_keys=True) + "\n"


def write_provenance(weights: str | os.PathLike, record: Mapping) -> str:
    """Write ``record`` beside ``weights`` atomically (a reader never sees half a file); returns the path."""
    path = provenance_path(weights)
    with atomic_open(path, "w") as f:
        f.write(provenance_text(record))
    return path


def window_intensity(a_min: float, a_max: float, b_min: float = 0.0, b_max: float = 1.0, clip: bool = True) -> dict:
    """The record of a CT window (MONAI ``ScaleIntensityRanged``)."""
    return {"kind": "window", "a_min": float(a_min), "a_max": float(a_max), "b_min": float(b_min),
            "b_max": float(b_max), "clip": bool(clip)}


def zscore_intensity(nonzero: bool = True, channel_wise: bool = True) -> dict:
    """The record of a z-score normalisation (MONAI ``NormalizeIntensityd``)."""
    return {"kind": "zscore", "nonzero": bool(nonzero), "channel_wise": bool(channel_wise)}


def runtime_versions() -> dict:
    """``monai_version`` and ``torch_version`` of this process."""
    import monai
    import torch

    return {"monai_version": monai.__version__, "torch_version": torch.__version__}


def make_record(
    backbone: str,
    width,
    in_channels: int,
    preprocessing: Mapping,
    downsample: str | None = None,
    pool_size: int | None = None,
    steps_planned: int | None = None,
    source: str | None = None,
    **extra,
) -> dict:
    """A provenance record with the MONAI and torch versions of this process filled in.

    Args:
        backbone: ``"SwinUNETR"`` or ``"BasicUNet"``.
        width: ``feature_size`` (SwinUNETR) or ``features`` (BasicUNet).
        in_channels: input channels of the network.
        preprocessing: ``orientation``, ``spacing``, ``intensity`` (see :func:`window_intensity`), ``crop``.
        downsample: SwinUNETR patch-merging order (``"merging"``, ``"merging_legacy"``, ``"mergingv2"``).
    """
    unknown = sorted(set(preprocessing) - set(COMPARED))
    if unknown:
        raise ValueError(f"preprocessing has unknown fields {unknown}; expected some of {list(COMPARED)}.")
    return _plain({
        "format": PROVENANCE_FORMAT,
        "backbone": backbone,
        "width": width,
        "in_channels": int(in_channels),
        "downsample": downsample,
        "preprocessing": {k: preprocessing.get(k) for k in COMPARED},
        "pool_size": pool_size,
        "steps_planned": steps_planned,
        "steps_done": None,
        **runtime_versions(),
        "source": source,
        **extra,
    })


def _plain(value):
    """JSON-ready copy: tuples/tensors/numpy values to lists and Python numbers."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _same(a, b) -> bool:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        keys = set(a) | set(b)
        return all(a.get(k) is None or b.get(k) is None or _same(a.get(k), b.get(k)) for k in keys)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)
    return a == b


def compare_preprocessing(
    record: Mapping | None, expected: Mapping | None, strict: bool = False, what: str = "the pretrained weights"
) -> list[str]:
    """Compare the preprocessing a record states with the finetune's own (``expected``, the same fields).

    Returns:
        One line per mismatch (``"spacing: weights [1.5, 1.5, 2.0], this bundle [1.0, 1.0, 1.0]"``); each is also
        logged as a warning. Fields ``None`` on either side are not compared.

    Raises:
        PreprocessingMismatchError: ``strict`` and at least one mismatch (names every field and the option).
    """
    if not record or not expected:
        if expected and not record:
            logger.warning(f"{what} come without a provenance record: their preprocessing cannot be checked.")
        return []
    stated = record.get("preprocessing") or {}
    mismatches = []
    for key in COMPARED:
        theirs, ours = stated.get(key), expected.get(key)
        if theirs is None or ours is None or _same(theirs, ours):
            continue
        mismatches.append(f"{key}: weights {_plain(theirs)}, this bundle {_plain(ours)}")
    if mismatches:
        text = (f"{what} were trained with another preprocessing than this bundle's ({len(mismatches)} "
                "differences):\n  " + "\n  ".join(mismatches))
        if strict:
            raise PreprocessingMismatchError(
                text + "\nstrict_preprocessing is true: set the bundle's keys (pixdim, a_min, a_max, roi_size, ...) "
                "to the weights' values, or run with --strict_preprocessing false to train anyway."
            )
        logger.warning(text + "\n(set strict_preprocessing true to stop on this)")
    else:
        logger.info(f"{what}: preprocessing matches this bundle's ({', '.join(k for k in COMPARED if stated.get(k) is not None)}).")
    return mismatches


def record_from_layout(layout) -> dict | None:
    """The record of a public checkpoint layout (:class:`hybridmim_components.weights.public_weights.Layout`): its
    publishers' stated preprocessing, architecture and the patch-merging order it was trained with. ``None`` for the
    generic layout of files in MONAI's own names (``hybridmim_bundle``): their origin is unknown without a record
    beside them."""
    if getattr(layout, "name", None) == "hybridmim_bundle":
        return None
    pre = dict(getattr(layout, "preprocessing", None) or {})
    arch = dict(getattr(layout, "architecture", None) or {})
    return _plain({
        "format": PROVENANCE_FORMAT,
        "backbone": arch.get("backbone"),
        "width": arch.get("feature_size"),
        "in_channels": arch.get("in_channels"),
        "downsample": getattr(layout, "merging", None),
        "preprocessing": {k: pre.get(k) for k in COMPARED},
        "source": getattr(layout, "name", None),
        "url": getattr(layout, "url", None),
        "licence": getattr(layout, "licence", None),
    })


class ProvenanceRecorder:
    """Ignite handler of the pretraining bundles: writes the provenance record beside the weights they save.

    Written when training starts (``steps_done`` null, ``steps_planned`` from the config) and again after every epoch
    in which the weights file changed (the best-model saver runs in the epoch's validation, before this handler):
    ``steps_done`` is then the trainer iteration the saved weights were taken at. Rank 0 only.

    Args:
        weights_path: the weights file the record describes (e.g. ``models/model.pt``).
        record: a record from :func:`make_record`.
    """

    def __init__(self, weights_path: str, record: Mapping) -> None:
        self.weights_path = os.fspath(weights_path)
        self.record = dict(record)
        self._seen = None

    def _stamp(self):
        try:
            st = os.stat(self.weights_path)
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def started(self, engine) -> None:
        from hybridmim_components.utils.distributed import rank_and_world_size

        self._seen = self._stamp()
        if rank_and_world_size()[0] == 0 and (self._seen is None or read_provenance(self.weights_path) is None):
            write_provenance(self.weights_path, self.record)  # a resumed run keeps the record of its saved weights

    def epoch_completed(self, engine) -> None:
        from hybridmim_components.utils.distributed import rank_and_world_size

        stamp = self._stamp()
        if rank_and_world_size()[0] != 0 or stamp is None or stamp == self._seen:
            return
        self._seen = stamp
        write_provenance(self.weights_path, dict(self.record, steps_done=int(engine.state.iteration)))
