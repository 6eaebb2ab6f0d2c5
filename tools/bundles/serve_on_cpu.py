"""Make a finetuning bundle that MONAI Label serves from its ONNX graph: for an annotation workstation without a GPU.

MONAI Label reads one config, ``configs/inference.json``: it instantiates ``network_def``, loads ``models/model.pt``
into it and runs the config's preprocessing, inferer and postprocessing. ``configs/inference_onnx.json`` (and
``inference_cpu_fast.json``) are never merged by it. This tool turns a copy of a bundle (e.g. the one in MONAI
Label's ``model/`` folder) into one whose ``inference.json`` runs onnxruntime:

1. ``models/model.onnx`` is exported from ``models/model.pt`` with MONAI's ``onnx_export`` (the bundle README's
   command, the trained-settings check included), unless an export newer than ``model.pt`` is there;
2. the PyTorch config is kept as ``configs/inference_pytorch.json`` (a rerun starts from it), and
   ``configs/inference.json`` becomes ``inference.json`` + ``inference_onnx.json`` (+ ``inference_cpu_fast.json``
   with ``--fast``), merged as ``--config_file "[...]"`` merges them (top-level keys, later files win), with
   ``network_def`` the onnxruntime network (MONAI Label's ``load_state_dict`` of ``model.pt`` into it is ignored:
   the graph holds the weights) and the preprocessing check of the weights' record as its ``_requires_``
   (MONAI Label does not run ``initialize``).

``--fast`` takes the settings measured in ``docs/cpu_inference.md`` (they change the label map slightly, which that
page measures); without it the label map is the float32 one. Command line::

    python tools/bundles/serve_on_cpu.py apps/monaibundle/model/hybridmim_unet_btcv [--fast]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

if __package__ in (None, ""):  # run as a file: make ``tools`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from hybridmim_components.utils.atomic_files import atomic_open  # noqa: E402
from tools.bundles.bundlegen.onnx import CONVERTER_KWARGS, USE_TRACE  # noqa: E402

__all__ = ["served_config", "export_onnx", "serve_on_cpu"]

PYTORCH_CONFIG = "inference_pytorch.json"
LAYERS = ("inference_onnx.json",)
FAST_LAYER = "inference_cpu_fast.json"


def _load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def served_config(base: dict, layers: list[dict]) -> dict:
    """``base`` with ``layers`` merged over it (top-level keys, later wins), ``network_def`` made the onnxruntime
    network of the ONNX layer (with the preprocessing check as ``_requires_``) and ``network`` that same object."""
    merged = dict(base)
    for layer in layers:
        merged.update(layer)
    onnx_net = merged.get("network")
    if not isinstance(onnx_net, dict) or not str(onnx_net.get("_target_", "")).endswith("OnnxNetwork"):
        raise ValueError(f"the merged config's 'network' is not an OnnxNetwork ({onnx_net!r}): not an ONNX layer")
    checks = [e for e in merged.get("initialize", []) if "check_trained_settings" in str(e)]
    network_def = dict(onnx_net)
    if checks:
        network_def["_requires_"] = checks[0]
    merged["network_def"] = network_def
    merged["network"] = "@network_def"
    return merged


def export_onnx(root: str, config: dict, config_path: str) -> str:
    """Export ``models/model.onnx`` from ``models/model.pt`` with MONAI's ``onnx_export`` (``config_path`` the PyTorch
    config); skipped when an export newer than ``model.pt`` exists. Returns the ONNX path."""
    pt, onnx = os.path.join(root, "models", "model.pt"), os.path.join(root, "models", "model.onnx")
    if not os.path.isfile(pt):
        raise FileNotFoundError(f"{pt}: the bundle has no trained weights to export")
    if os.path.isfile(onnx) and os.path.getmtime(onnx) >= os.path.getmtime(pt):
        return onnx
    roi = config["roi_size"]
    channels = config["network_def"]["in_channels"]
    args = [sys.executable, "-m", "monai.bundle", "onnx_export", "network_def", "--filepath", onnx,
            "--ckpt_file", pt, "--meta_file", os.path.join(root, "configs", "metadata.json"),
            "--config_file", config_path, "--bundle_root", root,
            "--input_shape", json.dumps([2, channels, *roi]), "--converter_kwargs", CONVERTER_KWARGS, *USE_TRACE]
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"onnx_export of {root} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    return onnx


def serve_on_cpu(root: str, fast: bool = False) -> str:
    """Rewrite ``root``'s ``configs/inference.json`` for onnxruntime (see the module docstring); returns its path."""
    configs = os.path.join(root, "configs")
    current, kept = os.path.join(configs, "inference.json"), os.path.join(configs, PYTORCH_CONFIG)
    if not os.path.isfile(kept):
        base = _load(current)
        if isinstance(base.get("network_def"), dict) and "OnnxNetwork" in str(base["network_def"].get("_target_")):
            raise ValueError(f"{current} already runs ONNX but {kept} is missing: restore the bundle's own config")
        with atomic_open(kept, "w") as f:
            json.dump(base, f, indent=4)
    base = _load(kept)
    names = list(LAYERS) + ([FAST_LAYER] if fast else [])
    missing = [n for n in names if not os.path.isfile(os.path.join(configs, n))]
    if missing:
        raise FileNotFoundError(f"{configs} has no {', '.join(missing)}: a finetuning bundle of hybridmim-components "
                                f">= 0.2.0 carries them")
    export_onnx(root, base, kept)
    served = served_config(base, [_load(os.path.join(configs, n)) for n in names])
    with atomic_open(current, "w") as f:
        json.dump(served, f, indent=4)
    return current


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle", help="the bundle folder to rewrite (a served copy, e.g. in MONAI Label's model/)")
    parser.add_argument("--fast", action="store_true", help=f"also merge {FAST_LAYER} (docs/cpu_inference.md)")
    args = parser.parse_args(argv)
    path = serve_on_cpu(args.bundle, args.fast)
    print(f"{path}: onnxruntime{' with the CPU-fast settings' if args.fast else ''}; PyTorch config kept as "
          f"{PYTORCH_CONFIG}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
