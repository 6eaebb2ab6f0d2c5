"""Sliding-window inference of the demo CT with PyTorch and with onnxruntime, side by side in one run.

For each backbone, the BTCV finetuning bundle's own ``inference.json`` gives the network (its default width unless
``--feature-size`` / ``--features``), the preprocessing of the demo CT (``tools/data/fetch_demo_ct.py``'s
``images/abdomen_val.nii.gz``, the demo's testing image; orientation, 1.5 x 1.5 x 2 mm resampling, HU window,
foreground crop) and the ``SlidingWindowInferer`` (``roi_size`` 96^3, ``sw_batch_size`` 4, overlap 0.5). The network
(random weights, seeded: the timing does not depend on them) is exported with MONAI's ``onnx_export`` exactly as the
bundle README's command does it (dynamic batch axis), then the inferer is timed with the PyTorch network (float32,
``torch.no_grad``) and with :class:`hybridmim_components.workflow.OnnxNetwork`, the backends interleaved
(A B A B ...) so that load from other jobs on the machine hits both alike. Preprocessing, export and session creation
are not timed. One untimed warm-up patch each; the median of ``--repeats`` timed passes is reported, with the ratio
onnxruntime / PyTorch and the largest logit difference between the two.

``--variants`` adds onnxruntime settings to the same interleaved loop (``name=key:value,...`` with keys
``threads``, ``opt`` (graph optimisation: all/extended/basic/disabled), ``stable`` (0: onnxruntime's own instance
norm kernel) and ``batch`` (patches per onnxruntime call, ``OnnxNetwork``'s ``max_batch``)).

    python tools/benchmarks/benchmark_onnx_inference.py --repeats 2 --crop 144 --sw-batch-size 1 \\
        --output tools/benchmarks/results/onnx_inference.json

``--crop`` and ``--sw-batch-size`` keep a run within the time and memory of a shared 2-core, 23 GB machine:
SwinUNETR at feature size 48 needs several GB per patch in flight, and every pass is timed twice per backend.

Writes the JSON and a Markdown table next to it (same name, ``.md``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from hybridmim_components.workflow import OnnxNetwork  # noqa: E402
from tools.bundles.bundlegen.onnx import CONVERTER_KWARGS  # noqa: E402
from hybridmim_components.utils.atomic_files import atomic_open  # noqa: E402

BUNDLES_DIR = os.path.join(REPO_ROOT, "bundles")
DEFAULT_VARIANT = {"threads": 0, "opt": "all", "stable": 1, "batch": 1}


def parse_variant(text: str) -> tuple[str, dict]:
    """``"name=threads:1,opt:basic"`` -> ``("name", {"threads": 1, "opt": "basic", "stable": 1})``."""
    name, _, spec = text.partition("=")
    settings = dict(DEFAULT_VARIANT)
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition(":")
        if key not in settings:
            raise ValueError(f"variant {text!r}: unknown key {key!r} (expected {sorted(settings)})")
        settings[key] = value if key == "opt" else int(value)
    return name, settings


def load_bundle(backbone: str, overrides: dict):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    bundle = os.path.join(BUNDLES_DIR, f"hybridmim_{backbone}_btcv")
    parser.read_config(os.path.join(bundle, "configs", "inference.json"))
    parser.read_meta(os.path.join(bundle, "configs", "metadata.json"))
    parser.update(overrides)
    return bundle, parser


def preprocessed_ct(parser, image: str) -> torch.Tensor:
    """``1 x 1 x D x H x W``: the bundle's inference preprocessing of ``image``."""
    data = parser.get_parsed_content("preprocessing")({"image": image})
    return torch.as_tensor(data["image"].as_tensor() if hasattr(data["image"], "as_tensor") else data["image"])[None]


def export(bundle: str, overrides: dict, work: str, net: torch.nn.Module, roi: list) -> str:
    """``work/model.onnx`` written by MONAI's ``onnx_export`` from ``net``'s weights (the README command)."""
    import ast

    from monai.bundle import onnx_export

    ckpt = os.path.join(work, "model.pt")
    torch.save(net.state_dict(), ckpt)
    path = os.path.join(work, "model.onnx")
    onnx_export(net_id="network_def", filepath=path, ckpt_file=ckpt,
                meta_file=os.path.join(bundle, "configs", "metadata.json"),
                config_file=os.path.join(bundle, "configs", "inference.json"),
                input_shape=[2, 1, *roi], converter_kwargs=ast.literal_eval(CONVERTER_KWARGS),
                use_trace=True, **overrides)
    return path


def timed(fn) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def benchmark_backbone(backbone: str, args, image: str, variants: dict) -> dict:
    from monai.inferers import SlidingWindowInferer

    overrides = {}
    if backbone == "swin" and args.feature_size:
        overrides["feature_size"] = args.feature_size
    if backbone == "unet" and args.features:
        overrides["features"] = json.loads(args.features)
    bundle, parser = load_bundle(backbone, overrides)
    width_key = "feature_size" if backbone == "swin" else "features"
    width = parser[width_key]
    roi = list(parser["roi_size"])
    x = preprocessed_ct(parser, image)
    if args.crop:  # a centred in-plane crop: fewer windows, so that every backend runs several times
        sides = [min(s, args.crop) for s in x.shape[2:4]]
        starts = [(s - c) // 2 for s, c in zip(x.shape[2:4], sides)]
        x = x[:, :, starts[0]:starts[0] + sides[0], starts[1]:starts[1] + sides[1]].contiguous()
    inferer_cfg = parser["inferer"]
    sw_batch_size = args.sw_batch_size or int(inferer_cfg["sw_batch_size"])
    inferer = SlidingWindowInferer(roi_size=roi, sw_batch_size=sw_batch_size, overlap=float(inferer_cfg["overlap"]))
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def").eval()
    with tempfile.TemporaryDirectory() as work:
        t_export, path = timed(lambda: export(bundle, overrides, work, net, roi))
        sessions = {name: OnnxNetwork(path, intra_op_num_threads=v["threads"], graph_optimization=v["opt"],
                                      max_batch=v["batch"], stable_norm=bool(v["stable"]))
                    for name, v in variants.items()}
        onnx_size = os.path.getsize(path)

    def run_torch():
        with torch.no_grad():
            return inferer(x, net)

    backends = {"pytorch": run_torch}
    backends.update({name: (lambda s=s: inferer(x, s)) for name, s in sessions.items()})
    patch = torch.zeros(1, x.shape[1], *roi)
    with torch.no_grad():  # warm-up on one patch (first-call allocations, onnxruntime's lazy initialisation)
        net(patch)
    for s in sessions.values():
        s(patch)
    outputs, times = {}, {name: [] for name in backends}
    for _ in range(args.repeats):
        for name, fn in backends.items():  # interleaved: A B A B
            seconds, outputs[name] = timed(fn)
            times[name].append(seconds)
            print(f"{backbone} {name}: {seconds:.2f} s", flush=True)
    ref = outputs["pytorch"]
    medians = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "bundle": os.path.basename(bundle),
        width_key: width,
        "input_shape": list(x.shape),
        "roi_size": roi,
        "sw_batch_size": inferer.sw_batch_size,
        "crop": args.crop,
        "overlap": inferer.overlap,
        "windows": int(np.prod([max(1, int(np.ceil((s - r) / (r * 0.5))) + 1) if s > r else 1
                                for s, r in zip(x.shape[2:], roi)])),
        "export_s": round(t_export, 1),
        "onnx_mb": round(onnx_size / 2**20, 1),
        "seconds": {name: [round(t, 2) for t in ts] for name, ts in times.items()},
        "median_s": {name: round(m, 2) for name, m in medians.items()},
        "ratio_to_pytorch": {name: round(medians[name] / medians["pytorch"], 3) for name in sessions},
        "max_abs_logit_diff": {name: float((outputs[name] - ref).abs().max()) for name in sessions},
        "label_voxels_differing": {name: int((outputs[name].argmax(1) != ref.argmax(1)).sum()) for name in sessions},
        "voxels": int(ref[:, 0].numel()),
        "variants": variants,
    }
    return result


def markdown(report: dict, command: str) -> str:
    lines = [
        "# Sliding-window inference on CPU: PyTorch vs onnxruntime",
        "",
        f"Measured with `{command}` (result: `{os.path.basename(report['output'])}`) on {report['machine']}, shared "
        "with other jobs: the backends were interleaved (A B A B) so load hits both; absolute seconds are noisy, the "
        "ratio is what to read. The demo CT (`abdomen_val.nii.gz` of `tools/data/fetch_demo_ct.py`) after the BTCV "
        "bundle's inference preprocessing; only the `SlidingWindowInferer` call is timed (median of the timed "
        "passes, float32 both).",
        "",
        "| backbone (width) | input | windows | PyTorch | onnxruntime | ratio | max logit diff | label voxels differing |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for backbone, r in report["results"].items():
        width = r.get("feature_size", r.get("features"))
        for name in r["ratio_to_pytorch"]:
            lines.append(
                f"| {backbone} ({width}) | {'x'.join(map(str, r['input_shape'][2:]))} | {r['windows']} | "
                f"{r['median_s']['pytorch']:.1f} s | {r['median_s'][name]:.1f} s ({name}) | "
                f"{r['ratio_to_pytorch'][name]:.2f} | {r['max_abs_logit_diff'][name]:.1e} | "
                f"{r['label_voxels_differing'][name]} of {r['voxels']} |")
    lines += ["", "All timed passes (s): " + "; ".join(
        f"{b} {n}: {', '.join(f'{t:.1f}' for t in ts)}" for b, r in report["results"].items()
        for n, ts in r["seconds"].items()), ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", nargs="+", default=["swin", "unet"], choices=["swin", "unet"])
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per backend (after one warm-up)")
    parser.add_argument("--feature-size", type=int, default=None, help="SwinUNETR width (default: the bundle's)")
    parser.add_argument("--features", default=None, help="BasicUNet widths as JSON (default: the bundle's)")
    parser.add_argument("--image", default=None, help="a NIfTI CT instead of the demo CT")
    parser.add_argument("--crop", type=int, default=0, help="centred in-plane crop side after preprocessing (0: none)")
    parser.add_argument("--sw-batch-size", type=int, default=0, help="patches per network call (0: the bundle's)")
    parser.add_argument("--variants", nargs="*", default=[], help="extra onnxruntime settings, name=key:value,...")
    parser.add_argument("--output", default=None, help="JSON file (a .md with the table is written beside it)")
    args = parser.parse_args(argv)

    variants = {"onnxruntime": dict(DEFAULT_VARIANT)}
    variants.update(parse_variant(v) for v in args.variants)
    image = args.image
    if image is None:
        from tools.data import fetch_demo_ct as demo

        out = os.path.join(tempfile.gettempdir(), "hybridmim_demo_ct")
        demo.prepare(out)
        image = os.path.join(out, "images", "abdomen_val.nii.gz")
    import onnxruntime

    report = {
        "machine": f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime {onnxruntime.__version__}",
        "image": os.path.basename(image),
        "repeats": args.repeats,
        "output": args.output or "",
        "results": {},
    }
    for backbone in args.backbones:
        report["results"][backbone] = benchmark_backbone(backbone, args, image, variants)
        r = report["results"][backbone]
        print(f"{backbone}: median PyTorch {r['median_s']['pytorch']:.2f} s, "
              + ", ".join(f"{n} {r['median_s'][n]:.2f} s (x{q:.2f})" for n, q in r["ratio_to_pytorch"].items()),
              flush=True)
    command = "python tools/benchmarks/benchmark_onnx_inference.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report["command"] = command.strip()
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with atomic_open(args.output, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        with atomic_open(os.path.splitext(args.output)[0] + ".md", "w") as f:
            f.write(markdown(report, report["command"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
