"""Pretrained-weight transfer into a finetuning network that fails loudly.

A HybridMIM pretraining run pretrains encoder *and* decoder; only the last 1×1×1 layer of the finetuning network
(as many channels as segmentation targets) starts from scratch. ``load_pretrained_weights`` therefore requires every
other parameter to load, and raises with a report (loaded / missing / unexpected / mis-shaped) otherwise, instead of
silently training from random weights.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import torch
from torch import nn

__all__ = ["PretrainedWeightsError", "load_pretrained_weights", "extract_state_dict", "last_layer_prefixes"]

logger = logging.getLogger(__name__)

_WRAPPER_KEYS = ("model", "state_dict", "network", "backbone")
_PREFIXES = ("module.", "backbone.")


class PretrainedWeightsError(ValueError):
    """Pretrained weights do not fit the network beyond its last layer; ``report`` holds the details."""

    def __init__(self, message: str, report: dict) -> None:
        super().__init__(message)
        self.report = report


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
            ``backbone.`` prefixes are stripped). ``None``, ``""`` or the strings ``"null"``/``"none"`` (what a
            command-line override delivers): train from scratch (logged, returns ``None``).
        map_location: passed to ``torch.load`` (always ``weights_only=True``).
        allowed_new_prefixes: parameter prefixes allowed to stay untrained; default: the network's last layer.

    Returns:
        The report: ``path`` and name lists ``loaded``, ``missing``, ``unexpected``, ``mis_shaped`` and
        ``left_to_train`` (the allowed missing/mis-shaped ones).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        PretrainedWeightsError: a parameter outside ``allowed_new_prefixes`` is missing or mis-shaped.
    """
    if path is None or str(path).strip().lower() in ("", "null", "none"):
        logger.info("pretrained_path is empty: training from scratch (random initialisation).")
        return None
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"pretrained weights not found: {path!r} (set pretrained_path to a backbone checkpoint, e.g. a pretrain "
            "bundle's models/model.pt, or to null to train from scratch)."
        )
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
