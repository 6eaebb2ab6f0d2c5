"""Pretrained-weight transfer into a finetuning network that fails loudly.

A HybridMIM pretraining run pretrains encoder *and* decoder; only the last 1×1×1 layer of the finetuning network
(as many channels as segmentation targets) starts from scratch. ``load_pretrained_weights`` therefore requires every
other parameter to load, and raises with a report (loaded / missing / unexpected / mis-shaped) otherwise, instead of
silently training from random weights.

``pretrained_path`` may also be a bundle folder (a pretraining bundle as ``python -m monai.bundle download``
unpacks it): its ``models/model.pt`` is loaded, after checking the file against the hash that the bundle's
``large_files.yml`` (``.yaml``/``.json``, the MONAI model zoo's format) lists for it.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping, Sequence

import torch
from torch import nn

__all__ = [
    "PretrainedWeightsError",
    "WeightsHashError",
    "load_pretrained_weights",
    "extract_state_dict",
    "last_layer_prefixes",
    "resolve_weights_file",
    "verify_weights_hash",
    "file_hash",
    "BUNDLE_WEIGHTS",
    "LARGE_FILES_NAMES",
]

logger = logging.getLogger(__name__)

_WRAPPER_KEYS = ("model", "state_dict", "network", "backbone")
_PREFIXES = ("module.", "backbone.")

BUNDLE_WEIGHTS = "models/model.pt"  # the weights of a bundle, relative to its root (MONAI bundle convention)
BUNDLE_METADATA = "configs/metadata.json"  # what makes a folder a bundle
LARGE_FILES_NAMES = ("large_files.yml", "large_files.yaml", "large_files.json")  # what download_large_files reads


class PretrainedWeightsError(ValueError):
    """Pretrained weights do not fit the network beyond its last layer; ``report`` holds the details."""

    def __init__(self, message: str, report: dict) -> None:
        super().__init__(message)
        self.report = report


class WeightsHashError(ValueError):
    """A weights file's hash differs from the one its bundle's ``large_files`` manifest lists."""


def file_hash(path: str | os.PathLike, hash_type: str = "sha256", chunk: int = 1 << 20) -> str:
    """Hex digest of a file, read in chunks (weights files can be hundreds of MB)."""
    h = hashlib.new(hash_type)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _manifest_entries(manifest: str) -> list:
    from monai.bundle import ConfigParser

    try:
        content = ConfigParser.load_config_file(manifest)
    except Exception as e:  # a YAML/JSON syntax error: name the file
        raise ValueError(f"cannot read the large-files manifest {manifest}: {e}") from e
    entries = content.get("large_files") if isinstance(content, Mapping) else None
    if not isinstance(entries, list) or not all(isinstance(e, Mapping) for e in entries):
        raise ValueError(
            f"{manifest}: expected a key 'large_files' holding a list of {{path, url, hash_val, hash_type}} entries "
            f"(the MONAI model zoo's large_files.yml format), got {type(content).__name__} "
            f"{list(content)[:5] if isinstance(content, Mapping) else content!r}."
        )
    return entries


def verify_weights_hash(bundle_dir: str | os.PathLike, relative: str = BUNDLE_WEIGHTS) -> str | None:
    """Check ``bundle_dir/relative`` against the hash its bundle's ``large_files`` manifest lists for it.

    Returns:
        ``"<hash_type> <digest>"`` when a manifest lists a hash for the file and it matches; ``None`` when the bundle
        has no manifest or the manifest lists no hash for the file (nothing to check against).

    Raises:
        WeightsHashError: the file's digest differs (names the file, the manifest and both digests).
        ValueError: a manifest that cannot be read, has no ``large_files`` list, or names an unknown ``hash_type``.
    """
    bundle_dir = os.fspath(bundle_dir)
    target = os.path.normpath(relative)
    weights = os.path.join(bundle_dir, relative)
    verified = None
    for name in LARGE_FILES_NAMES:
        manifest = os.path.join(bundle_dir, name)
        if not os.path.isfile(manifest):
            continue
        for entry in _manifest_entries(manifest):
            if os.path.normpath(str(entry.get("path", ""))) != target or not entry.get("hash_val"):
                continue
            hash_type, expected = str(entry.get("hash_type") or "md5").lower(), str(entry["hash_val"]).lower()
            # md5 is download_url's default when hash_type is left out; model zoo bundles list md5, ours sha256
            if hash_type not in hashlib.algorithms_guaranteed:
                raise ValueError(
                    f"{manifest}: hash_type {entry.get('hash_type')!r} of {relative} is not supported "
                    f"(expected one of sha256, md5, sha1, sha512)."
                )
            actual = file_hash(weights, hash_type)
            if actual != expected:
                raise WeightsHashError(
                    f"{hash_type} of {weights} is {actual}, but {manifest} lists {expected}: the file is corrupted, "
                    "truncated or not the one the bundle was packed with. Download the bundle again (into an empty "
                    "folder), or, if you retrained it yourself, re-pack it with tools/bundles/pack_bundle.py."
                )
            verified = f"{hash_type} {actual}"
            logger.info(f"{hash_type} {actual} of {weights} matches {manifest}.")
    return verified


def resolve_weights_file(path: str | os.PathLike) -> str:
    """The weights file ``pretrained_path`` means: the path itself, or a bundle folder's ``models/model.pt``.

    Raises:
        FileNotFoundError: nothing at ``path``; a folder without ``configs/metadata.json`` (not a bundle); a bundle
            folder without ``models/model.pt`` (each message names the path it looked for).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        metadata, weights = os.path.join(path, BUNDLE_METADATA), os.path.join(path, BUNDLE_WEIGHTS)
        if not os.path.isfile(metadata):
            raise FileNotFoundError(
                f"pretrained_path {path!r} is a folder but not a bundle: {metadata} not found. Set pretrained_path to "
                "a backbone checkpoint file or to a bundle folder (configs/metadata.json and models/model.pt)."
            )
        if not os.path.isfile(weights):
            raise FileNotFoundError(
                f"pretrained_path {path!r} is a bundle without weights: {weights} not found. Train that pretraining "
                "bundle first, or fetch its weights with `python -m monai.bundle download_large_files "
                f"--bundle_path {path}` if it lists them in large_files.yml."
            )
        return weights
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"pretrained weights not found: {path!r} (set pretrained_path to a backbone checkpoint, e.g. a pretrain "
            "bundle's models/model.pt, to a pretraining bundle folder, or to null to train from scratch)."
        )
    return path


def _bundle_of(weights: str) -> str | None:
    """The bundle folder holding ``weights`` as its ``models/model.pt``, if it is one."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(weights)))
    if os.path.normpath(os.path.relpath(os.path.abspath(weights), root)) != os.path.normpath(BUNDLE_WEIGHTS):
        return None
    return root if os.path.isfile(os.path.join(root, BUNDLE_METADATA)) else None


def last_layer_prefixes(network: nn.Module) -> tuple[str, ...]:
    """Parameter-name prefixes of the layer that finetuning replaces (the output layer).

    ``SwinUNETR``: ``out.``; ``BasicUNet``: ``final_conv.``; any other network: the module owning the last
    registered parameter.
    """
    from monai.networks.nets import BasicUNet, SwinUNETR

    if isinstance(network, SwinUNETR):
        return ("out.",)
    if isinstance(network, BasicUNet):
        return ("final_conv.",)
    names = [name for name, _ in network.named_parameters()]
    if not names:
        return ()
    return (names[-1].rsplit(".", 1)[0] + ".",)


def extract_state_dict(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """The flat ``{name: tensor}`` of a checkpoint: unwraps ``{"model": ...}``/``{"state_dict": ...}`` and strips
    leading ``module.``/``backbone.`` prefixes (repeatedly, as DDP around a pretraining wrapper stacks them)."""
    state = checkpoint
    while isinstance(state, Mapping) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        inner = next((state[k] for k in _WRAPPER_KEYS if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            raise ValueError(
                f"no state dict found: expected tensors or one of the keys {_WRAPPER_KEYS}, got keys {list(state)[:10]}."
            )
        state = inner
    flat = {}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        stripped = True
        while stripped:
            stripped = False
            for prefix in _PREFIXES:
                if name.startswith(prefix):
                    name, stripped = name[len(prefix) :], True
        flat[name] = value
    return flat


def _format_report(report: dict, limit: int = 20) -> str:
    lines = [f"pretrained weights {report['path']}:"]
    for key in ("loaded", "missing", "unexpected", "mis_shaped", "left_to_train"):
        names = report[key]
        shown = ", ".join(names[:limit]) + (f", ... (+{len(names) - limit})" if len(names) > limit else "")
        lines.append(f"  {key}: {len(names)}" + (f" [{shown}]" if names and key != "loaded" else ""))
    return "\n".join(lines)


def load_pretrained_weights(
    network: nn.Module,
    path: str | os.PathLike | None,
    map_location: str | torch.device = "cpu",
    allowed_new_prefixes: Sequence[str] | None = None,
) -> dict | None:
    """Load backbone weights from ``path`` into ``network``; everything but the last layer must load.

    Args:
        network: the finetuning network (e.g. ``SwinUNETR``/``BasicUNet`` with ``out_channels`` = classes).
        path: a checkpoint file (flat state dict, ``{"model": ...}``, ``{"state_dict": ...}``; ``module.``/
            ``backbone.`` prefixes are stripped), or a bundle folder (``configs/metadata.json`` and
            ``models/model.pt``, e.g. a downloaded pretraining bundle): its ``models/model.pt``. When that file sits
            in a bundle with a ``large_files.yml``/``.yaml``/``.json`` listing a hash for ``models/model.pt``, the
            file is verified first. ``None``, ``""`` or the strings ``"null"``/``"none"`` (what a command-line
            override delivers): train from scratch (logged, returns ``None``).
        map_location: passed to ``torch.load`` (always ``weights_only=True``).
        allowed_new_prefixes: parameter prefixes allowed to stay untrained; default: the network's last layer.

    Returns:
        The report: ``path`` (the weights file), ``sha256`` (its verified digest, ``None`` when nothing listed a
        sha256 for it) and name lists ``loaded``, ``missing``, ``unexpected``, ``mis_shaped`` and
        ``left_to_train`` (the allowed missing/mis-shaped ones).

    Raises:
        FileNotFoundError: ``path`` does not exist; a folder that is not a bundle or has no ``models/model.pt``.
        WeightsHashError: the weights differ from the hash their bundle's ``large_files`` manifest lists.
        PretrainedWeightsError: a parameter outside ``allowed_new_prefixes`` is missing or mis-shaped.
    """
    if path is None or str(path).strip().lower() in ("", "null", "none"):
        logger.info("pretrained_path is empty: training from scratch (random initialisation).")
        return None
    path = resolve_weights_file(path)
    bundle = _bundle_of(path)
    # verify before torch.load: a corrupted or swapped file must not get as far as the network
    verified = verify_weights_hash(bundle) if bundle else None
    source = extract_state_dict(torch.load(path, map_location=map_location, weights_only=True))
    allowed = tuple(last_layer_prefixes(network) if allowed_new_prefixes is None else allowed_new_prefixes)
    target = network.state_dict()
    loadable, mis_shaped = {}, []
    for name, value in source.items():
        if name in target:
            if target[name].shape == value.shape:
                loadable[name] = value
            else:
                mis_shaped.append(f"{name} {tuple(value.shape)}->{tuple(target[name].shape)}")
    missing = [name for name in target if name not in source]
    unexpected = [name for name in source if name not in target]
    is_allowed = lambda entry: entry.startswith(allowed)  # noqa: E731
    report = {
        "path": path,
        "sha256": verified.split()[1] if verified and verified.startswith("sha256 ") else None,
        "loaded": sorted(loadable),
        "missing": missing,
        "unexpected": unexpected,
        "mis_shaped": mis_shaped,
        "left_to_train": [n for n in missing if is_allowed(n)] + [m for m in mis_shaped if is_allowed(m)],
    }
    text = _format_report(report)
    failing = [n for n in missing if not is_allowed(n)] + [m for m in mis_shaped if not is_allowed(m)]
    if failing:
        raise PretrainedWeightsError(
            f"{text}\n{len(failing)} parameters outside the last layer {allowed} did not load: these weights do not "
            f"fit this network (wrong backbone, feature size or input channels?). Refusing to train from partially "
            f"random weights.",
            report,
        )
    network.load_state_dict(loadable, strict=False)
    logger.info(text)
    return report
