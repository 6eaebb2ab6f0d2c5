"""The cost of one training step of each pretraining bundle at the paper's settings, computed (not measured).

For each bundle the network and loss are built from its own ``configs/train.json`` (``monai.bundle.ConfigParser``,
so the figures follow the bundle's defaults: crop, width, ``batch_size × samples_per_volume`` crops per step, the
contrastive views), the batch from its own random transforms (``train#random_transforms``: crop samples and
``HierarchicalMaskd``) and ``PrepareMIMBatch``. One training step (forward, loss, backward) then runs under

- ``torch.utils.flop_counter.FlopCounterMode``: FLOPs of the matrix products and convolutions, forward and backward
  (elementwise ops, norms and the optimizer are not counted: a few % of the FLOPs, though memory-bound, so not of
  the time);
- ``torch.autograd.graph.saved_tensors_hooks``: the bytes of the distinct storages autograd keeps for backward, the
  activation memory of the step (parameters, also saved by some ops, counted apart).

By default the step runs on PyTorch's ``meta`` device: same operators, same shapes, same FLOP count and saved
tensors, but no arithmetic, so the paper-scale steps take seconds on a CPU instead of minutes
(``--device cpu`` runs the real arithmetic; ``tests/test_step_cost.py`` checks both agree). The activations are
float32; under bf16/fp16 autocast most of them (the matmul/conv inputs) are half that size.

From the FLOPs: the step time an H100 SXM would need at 40 % of its dense BF16 peak (989 TFLOP/s, without
sparsity), i.e. ``flops / (0.4 · 989e12)``: an estimate of a well-fed GPU, not a measurement.

    python tools/benchmarks/compute_step_cost.py                   # the 4 pretraining bundles, paper settings
    python tools/benchmarks/compute_step_cost.py --bundles hybridmim_unet_pretrain --override features=[4,4,8,8,16,4]

Writes ``tools/benchmarks/results/step_cost.{json,md}`` (``--output`` elsewhere).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence

import torch
from hybridmim_components.utils.atomic_files import atomic_open

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

BUNDLES_DIR = os.path.join(REPO_ROOT, "bundles")
PRETRAIN_BUNDLES = ("hybridmim_swin_pretrain", "hybridmim_unet_pretrain",
                    "hybridmim_swin_pretrain_brats", "hybridmim_unet_pretrain_brats")
H100_BF16_DENSE_TFLOPS = 989.0  # H100 SXM5, dense BF16 tensor-core peak (NVIDIA datasheet; 1979 is with sparsity)
UTILISATION = 0.4
DEFAULT_OUTPUT = os.path.join(REPO_ROOT, "tools", "benchmarks", "results", "step_cost")


# ------------------------------------------------------------------------------------------------- bundle parts
def bundle_parser(name: str, overrides: Mapping | None = None, config: str = "train.json", missing_ok: bool = False):
    """``ConfigParser`` of ``bundles/<name>/configs/<config>`` with ``overrides`` (``{"feature_size": 12}``) applied.

    ``missing_ok``: skip overrides of keys the config lacks (one override set for Swin and UNet bundles:
    ``feature_size`` and ``features``); otherwise such a key is an error."""
    from monai.bundle import ConfigParser

    path = os.path.join(BUNDLES_DIR, name, "configs", config)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"bundle config '{path}' does not exist (bundle '{name}').")
    parser = ConfigParser()
    parser.read_config(path)
    parser["bundle_root"] = os.path.join(BUNDLES_DIR, name)
    for key, value in (overrides or {}).items():
        if key not in parser:
            if missing_ok:
                continue
            raise KeyError(f"override '{key}' is not a key of {path}.")
        parser[key] = value
    parser.get_parsed_content("imports")
    return parser


def pretrain_batch(parser, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """One training batch as the bundle's loader builds it, from random volumes of the crop's size.

    ``batch_size`` volumes ``C×D×H×W`` (``C = in_channels``, ``D×H×W = roi_size``) go through the bundle's
    ``train#random_transforms`` (``samples_per_volume`` crops each, then the hierarchical mask), are collated as the
    DataLoader does and split by ``PrepareMIMBatch``: ``image`` ``(batch_size·samples_per_volume)×C×D×H×W`` and the
    ``mim_*`` targets (plain tensors, CPU).
    """
    from monai.data import MetaTensor, list_data_collate
    from monai.transforms import Compose

    from hybridmim_components.workflow import PrepareMIMBatch

    transforms = Compose(parser.get_parsed_content("train#random_transforms")).set_random_state(seed)
    g = torch.Generator().manual_seed(seed)
    shape = (int(parser["in_channels"]), *map(int, parser["roi_size"]))
    samples = []
    for _ in range(int(parser["batch_size"])):
        out = transforms({"image": MetaTensor(torch.rand(shape, generator=g))})
        samples.extend(out if isinstance(out, list) else [out])
    image, targets = PrepareMIMBatch()(list_data_collate(samples), torch.device("cpu"))
    return image.as_tensor() if hasattr(image, "as_tensor") else image, targets


def finetune_batch(parser, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A finetuning batch of the bundle's shape: ``batch_size·num_samples`` crops ``C×roi_size`` (random
    intensities) and labels ``B×1×roi_size`` (random classes of the network's ``out_channels``)."""
    g = torch.Generator().manual_seed(seed)
    crops = int(parser["train#dataloader#batch_size"]) * int(parser["num_samples"])
    roi = tuple(map(int, parser["roi_size"]))
    channels, classes = int(parser["network_def#in_channels"]), int(parser["network_def#out_channels"])
    image = torch.rand((crops, channels, *roi), generator=g)
    label = torch.randint(0, classes, (crops, 1, *roi), generator=g).float()
    return image, label


def training_parts(name: str, overrides: Mapping | None = None, seed: int = 0, missing_ok: bool = True) -> dict:
    """Network, loss and one batch of bundle ``name`` (pretraining or finetuning), built from its ``train.json``.

    Returns ``{"network", "loss", "image", "targets", "crops", "settings"}``; the network in train mode on the CPU.
    """
    parser = bundle_parser(name, overrides, missing_ok=missing_ok)
    torch.manual_seed(seed)
    network = parser.get_parsed_content("network_def")
    loss = parser.get_parsed_content("loss")
    pretrain = "train#random_transforms" in parser and "sub_volume_size" in parser
    if pretrain:
        image, targets = pretrain_batch(parser, seed)
    else:
        image, targets = finetune_batch(parser, seed)
    network.train()
    width = parser["feature_size"] if "feature_size" in parser else parser["features"]
    settings = {"roi_size": list(map(int, parser["roi_size"])), "crops_per_step": int(image.shape[0]),
                "in_channels": int(image.shape[1]), "width": width,
                "amp_dtype": parser["amp_dtype"] if "amp_dtype" in parser else None}
    if pretrain:
        settings.update(batch_size=int(parser["batch_size"]), samples_per_volume=int(parser["samples_per_volume"]),
                        region_size=list(map(int, parser["region_size"])))
    return {"network": network, "loss": loss, "image": image, "targets": targets, "crops": int(image.shape[0]),
            "settings": settings, "parser": parser, "pretrain": pretrain}


def to_device(obj, device: torch.device | str):
    """``obj`` (tensor, or dict/list/tuple of them) on ``device``; other values unchanged."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


# ------------------------------------------------------------------------------------------------------ counting
def _storage_key(t: torch.Tensor) -> int:
    """Identity of the memory block behind ``t`` (shared by its views); works on the meta device too."""
    return t.untyped_storage()._cdata


def count_step(step: Callable[[], torch.Tensor], parameters: Sequence[torch.Tensor] = ()) -> dict:
    """Run ``step`` (forward and loss, returning the loss), then its backward, counting FLOPs and saved tensors.

    Returns ``{"flops", "flops_forward", "flops_backward", "saved_activation_bytes", "saved_parameter_bytes",
    "saved_tensors"}``: FLOPs as ``FlopCounterMode`` counts them (a multiply-add is 2), bytes of the distinct
    storages held for backward at the end of the forward pass (the peak of what the step keeps alive).
    """
    from torch.utils.flop_counter import FlopCounterMode

    param_keys = {_storage_key(p) for p in parameters}
    saved: dict[int, int] = {}
    count = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        count[0] += 1
        saved[_storage_key(t)] = t.untyped_storage().nbytes()
        return t

    with FlopCounterMode(display=False) as forward_counter:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = step()
    with FlopCounterMode(display=False) as backward_counter:
        loss.backward()
    forward, backward = forward_counter.get_total_flops(), backward_counter.get_total_flops()
    return {
        "flops": int(forward + backward),
        "flops_forward": int(forward),
        "flops_backward": int(backward),
        "saved_activation_bytes": int(sum(b for k, b in saved.items() if k not in param_keys)),
        "saved_parameter_bytes": int(sum(b for k, b in saved.items() if k in param_keys)),
        "saved_tensors": count[0],
    }


def training_step_cost(name: str, overrides: Mapping | None = None, device: str = "meta") -> dict:
    """:func:`count_step` of one training step of bundle ``name`` on ``device`` (``"meta"``: shapes only)."""
    parts = training_parts(name, overrides)
    network = parts["network"].to(device)
    image, targets, loss_fn = to_device(parts["image"], device), to_device(parts["targets"], device), parts["loss"]
    params = list(network.parameters())
    start = time.perf_counter()
    cost = count_step(lambda: loss_fn(network(image), targets), params)
    cost["seconds"] = round(time.perf_counter() - start, 3)
    cost["parameters"] = int(sum(p.numel() for p in params))
    return {"bundle": name, "device": device, "settings": parts["settings"], **cost}


def h100_seconds(flops: float, utilisation: float = UTILISATION, peak_tflops: float = H100_BF16_DENSE_TFLOPS) -> float:
    """Seconds for ``flops`` at ``utilisation`` of the H100 SXM dense BF16 peak."""
    return flops / (utilisation * peak_tflops * 1e12)


# ------------------------------------------------------------------------------------------------------ reporting
def with_estimates(row: dict) -> dict:
    seconds = h100_seconds(row["flops"])
    return {**row, "tflop_per_step": row["flops"] / 1e12, "gflop_per_crop": row["flops"] / 1e9 / row["settings"]["crops_per_step"],
            "saved_activation_gib": row["saved_activation_bytes"] / 2**30,
            "h100_40pct_step_s": seconds, "h100_40pct_crops_per_s": row["settings"]["crops_per_step"] / seconds}


def markdown(rows: Sequence[dict], command: str) -> str:
    lines = [
        "# Cost of one pretraining step (computed, not measured)",
        "",
        f"Computed by `{command}` (`tools/benchmarks/compute_step_cost.py`; figures in `step_cost.json`): one "
        "training step (forward, loss, backward) of each bundle's own network, loss and batch at its default "
        "settings, FLOPs from `torch.utils.flop_counter.FlopCounterMode` (matmuls and convolutions), activation "
        "memory = the distinct float32 storages autograd saves for backward (`saved_tensors_hooks`; parameters "
        f"excluded). H100 time: FLOPs / ({UTILISATION:.0%} of the H100 SXM dense BF16 peak, "
        f"{H100_BF16_DENSE_TFLOPS:g} TFLOP/s); an estimate, no GPU was used.",
        "",
        "| bundle | crop | crops/step | width | parameters | TFLOP/step | GFLOP/crop | activations for backward (GiB, fp32) "
        "| H100 at 40 % bf16 peak: ms/step | crops/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r["settings"]
        lines.append(
            f"| {r['bundle']} | {'×'.join(map(str, s['roi_size']))} | {s['crops_per_step']} | {s['width']} "
            f"| {r['parameters'] / 1e6:.1f} M | {r['tflop_per_step']:.2f} | {r['gflop_per_crop']:.0f} "
            f"| {r['saved_activation_gib']:.1f} | {r['h100_40pct_step_s'] * 1e3:.1f} | {r['h100_40pct_crops_per_s']:.0f} |")
    return "\n".join(lines) + "\n"


def _parse_override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--override expects KEY=VALUE (JSON value), got {text!r}.")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main(argv: Sequence[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundles", nargs="+", default=list(PRETRAIN_BUNDLES))
    ap.add_argument("--override", action="append", type=_parse_override, default=[],
                    help="KEY=VALUE config override for every bundle (tests shrink the settings this way)")
    ap.add_argument("--device", default="meta", help="meta (shapes only, default) or cpu (real arithmetic)")
    ap.add_argument("--output", default=DEFAULT_OUTPUT, help="path without extension: writes .json and .md")
    args = ap.parse_args(argv)
    overrides = dict(args.override)
    for key in overrides:  # each override must mean something to at least one of the bundles
        if not any(key in bundle_parser(name) for name in args.bundles):
            ap.error(f"--override {key}=...: no bundle of {args.bundles} has the key '{key}' in configs/train.json")
    rows = []
    for name in args.bundles:
        row = with_estimates(training_step_cost(name, overrides, args.device))
        rows.append(row)
        print(f"{name}: {row['tflop_per_step']:.3f} TFLOP/step, activations {row['saved_activation_gib']:.2f} GiB, "
              f"H100 at 40% bf16 peak {row['h100_40pct_step_s'] * 1e3:.1f} ms/step ({row['seconds']:.1f} s here)")
    import shlex

    command = shlex.join(["python", "tools/benchmarks/compute_step_cost.py", *(sys.argv[1:] if argv is None else argv)])
    result = {"command": command, "computed_not_measured": True, "device": args.device,
              "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "h100_bf16_dense_tflops": H100_BF16_DENSE_TFLOPS, "utilisation": UTILISATION,
              "overrides": overrides, "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with atomic_open(args.output + ".json", "w") as f:
        json.dump(result, f, indent=2)
    with atomic_open(args.output + ".md", "w") as f:
        f.write(markdown(rows, command))
    print(f"wrote {args.output}.json and {args.output}.md")
    return rows


if __name__ == "__main__":
    main()
