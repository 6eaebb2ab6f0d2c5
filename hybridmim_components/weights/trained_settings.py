"""Trained weights computed with the settings they were trained with, or a stop that says which key differs.

A finetune writes ``models/model.provenance.json`` beside ``models/model.pt``
(:mod:`hybridmim_components.weights.provenance`): the width, input and output channels, SwinUNETR's patch-merging order, spacing, orientation and intensity window the
weights were trained with. Two SwinUNETRs that differ only in their merging order have the same parameter shapes, so a
plain ``CheckpointLoader`` loads the weights of one into the other without a word and the network computes other
features; a different spacing or window feeds the network input it never saw. Every config that builds a network for
trained weights therefore compares its own settings with the record before anything is computed:

- ``inference.json`` and MONAI Label (which parse ``network_def``: the check is its ``_requires_``), ``evaluate.json``,
  ``onnx_export`` (architecture and preprocessing);
- ``inference_onnx.json`` (preprocessing only: the architecture is fixed in the exported graph).

A difference stops with :class:`TrainedSettingsMismatchError` naming the config key, both values and the override
that fixes it; ``--check_trained_settings false`` turns the stop into a warning (never silent). Weights without a
record are used as the config says, with a warning that nothing could be checked. ``tools/bundles/pack_bundle.py``
writes the recorded values into a packed bundle's configs, so that its default commands are right by construction.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from hybridmim_components.weights.provenance import _plain, _same, provenance_path, read_provenance

__all__ = [
    "TrainedSettingsMismatchError",
    "ARCHITECTURE_KEYS",
    "PREPROCESSING_KEYS",
    "config_values_from_record",
    "trained_settings_differences",
    "check_trained_settings",
]

logger = logging.getLogger(__name__)

#: record field -> how a bundle config spells it (``width`` depends on the backbone: see :func:`_width_key`)
ARCHITECTURE_KEYS = {
    "width": None,
    "in_channels": "network_def#in_channels",
    "out_channels": "network_def#out_channels",
    "downsample": "downsample",
    "use_v2": "use_v2",
}
#: record ``preprocessing`` fields compared at inference (``crop`` is not: a sliding window may use another patch)
PREPROCESSING_KEYS = ("orientation", "spacing", "intensity")


class TrainedSettingsMismatchError(ValueError):
    """A config would compute with other settings than its trained weights were trained with."""


def _width_key(backbone: str | None) -> str:
    return "features" if backbone == "BasicUNet" else "feature_size"


def config_values_from_record(record: Mapping, with_crop: bool = True) -> dict:
    """The config keys (MONAI config ids) and values a record states: what a config must hold to compute as trained.

    ``{"feature_size": 48, "downsample": "merging_legacy", "network_def#in_channels": 1, "pixdim": [1.5, 1.5, 2.0],
    "a_min": -1000.0, "a_max": 1000.0, "roi_size": [96, 96, 96], ...}``; fields the record leaves ``null`` are left
    out. ``orientation`` and z-score settings have no key (the bundles fix them).
    """
    values = {}
    for field, key in ARCHITECTURE_KEYS.items():
        if record.get(field) is not None:
            values[key or _width_key(record.get("backbone"))] = _plain(record[field])
    pre = record.get("preprocessing") or {}
    if pre.get("spacing") is not None:
        values["pixdim"] = _plain(pre["spacing"])
    intensity = pre.get("intensity") or {}
    if intensity.get("kind") == "window":
        for key in ("a_min", "a_max"):
            if intensity.get(key) is not None:
                values[key] = float(intensity[key])
    if with_crop and pre.get("crop") is not None:
        values["roi_size"] = _plain(pre["crop"])
    return values


def _override(key: str, value) -> str:
    import json

    value = _plain(value)
    if isinstance(value, str):
        return f"--{key} {value}"
    text = json.dumps(value)
    return f"--{key} {repr(text) if isinstance(value, (list, dict)) else text}"  # a list quoted for the shell


def trained_settings_differences(record: Mapping, architecture: Mapping | None,
                                 preprocessing: Mapping | None) -> list[str]:
    """One line per setting in which the config (``architecture``: record fields such as ``width``, ``downsample``;
    ``preprocessing``: ``orientation``, ``spacing``, ``intensity``) differs from the record: the key, both values and
    the override. Fields ``None`` on either side are not compared."""
    lines = []
    theirs_arch, arch = record, dict(architecture or {})
    if arch.get("backbone") and theirs_arch.get("backbone") and arch["backbone"] != theirs_arch["backbone"]:
        lines.append(f"backbone: trained as {theirs_arch['backbone']}, this config builds {arch['backbone']} "
                     "(these weights belong to another bundle)")
    for field, key in ARCHITECTURE_KEYS.items():
        key = key or _width_key(theirs_arch.get("backbone") or arch.get("backbone"))
        trained, ours = theirs_arch.get(field), arch.get(field)
        if trained is None or ours is None or _same(trained, ours):
            continue
        lines.append(f"{key}: trained with {_plain(trained)!r}, this config has {_plain(ours)!r} "
                     f"(override: {_override(key, trained)})")
    stated, pre = record.get("preprocessing") or {}, dict(preprocessing or {})
    for field in PREPROCESSING_KEYS:
        trained, ours = stated.get(field), pre.get(field)
        if trained is None or ours is None or _same(trained, ours):
            continue
        if field == "spacing":
            fix = f"override: {_override('pixdim', trained)}"
        elif field == "intensity" and trained.get("kind") == "window" and ours.get("kind") == "window":
            fix = f"override: --a_min {trained.get('a_min')} --a_max {trained.get('a_max')}"
        else:
            fix = "no key of this bundle sets it: use a bundle whose preprocessing matches the weights"
        lines.append(f"{field}: trained with {_plain(trained)}, this config has {_plain(ours)} ({fix})")
    return lines


def _bundle_root(weights: str) -> str | None:
    """The bundle folder of ``<bundle>/models/<file>``, if ``weights`` sits there."""
    models = os.path.dirname(os.path.abspath(weights))
    return os.path.dirname(models) if os.path.basename(models) == "models" else None


def _verify_packed_hashes(weights: str, record: Mapping) -> None:
    """A packed bundle lists the record's and the weights' SHA-256 (``large_files.yml``); the record names the
    weights' hash (``weights_sha256``): a record that does not belong to these weights is refused."""
    from hybridmim_components.weights.transfer import file_hash, verify_weights_hash

    root = _bundle_root(weights)
    if root is not None:
        verify_weights_hash(root, os.path.relpath(provenance_path(weights), root))
    expected = record.get("weights_sha256")
    if expected and os.path.splitext(weights)[1] == ".pt":
        actual = file_hash(weights, "sha256")
        if actual != expected:
            raise TrainedSettingsMismatchError(
                f"{provenance_path(weights)} describes weights with sha256 {expected}, but {weights} has sha256 "
                f"{actual}: the record belongs to other weights. Download the bundle again, or re-pack it "
                "(tools/bundles/pack_bundle.py) after retraining."
            )


def check_trained_settings(
    weights: str | os.PathLike,
    architecture: Mapping | None = None,
    preprocessing: Mapping | None = None,
    enabled: bool = True,
) -> list[str]:
    """Compare a config's settings with the record of the trained weights it is about to load; stop on a difference.

    Args:
        weights: the trained weights (``models/model.pt``, or ``models/model.onnx``: the record is the same sidecar,
            ``models/model.provenance.json``).
        architecture: the config's network in record fields: ``backbone`` (``"SwinUNETR"``/``"BasicUNet"``),
            ``width`` (``feature_size`` or ``features``), ``in_channels``, ``out_channels``, ``downsample``, ``use_v2``.
            ``None``: not compared (an ONNX graph fixes it).
        preprocessing: ``orientation``, ``spacing``, ``intensity`` as
            :mod:`hybridmim_components.weights.provenance` writes them. ``None``: not compared.
        enabled: ``False`` (``--check_trained_settings false``) logs each difference as a warning instead of stopping.

    Returns:
        The differences found (empty when the config matches, or when there is nothing to compare).

    Raises:
        TrainedSettingsMismatchError: ``enabled`` and at least one difference; or a record whose hashes do not match
            the files it came with.
    """
    from hybridmim_components.workflow.flags import config_flag

    enabled = config_flag(enabled, "check_trained_settings")
    weights = os.fspath(weights)
    if not os.path.isfile(weights):
        # nothing to compare with: a loader of this path names the missing file; a tool given its weights by another
        # path (onnx_export --ckpt_file, run outside the bundle) must not pass unchecked without a word
        logger.warning(f"no trained weights at {weights}: this config's settings are not checked against a record "
                       "(run from the bundle folder, or set --bundle_root to it).")
        return []
    record = read_provenance(weights)
    if record is None:
        logger.warning(
            f"{weights} comes without a provenance record ({provenance_path(weights)}): this config's network and "
            "preprocessing cannot be checked against the ones the weights were trained with and are used as they are."
        )
        return []
    _verify_packed_hashes(weights, record)
    differences = trained_settings_differences(record, architecture, preprocessing)
    if not differences:
        logger.info(f"{weights}: this config's settings match the ones the weights were trained with "
                    f"({provenance_path(weights)}).")
        return []
    text = (f"{weights} was trained with other settings than this config's ({provenance_path(weights)} says so); "
            "the network would compute something else than it did in training:\n  " + "\n  ".join(differences))
    if enabled:
        raise TrainedSettingsMismatchError(
            text + "\nRun with the overrides above, or pack the trained bundle (tools/bundles/pack_bundle.py writes "
            "the trained settings into its configs). --check_trained_settings false runs with this config's "
            "settings anyway."
        )
    logger.warning(text + "\n(check_trained_settings is false: running with this config's settings)")
    return differences
