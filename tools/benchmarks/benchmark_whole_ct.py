"""Whole-CT inference on the CPU: every finetune backbone, through its BTCV bundle's own configs, timed end to end.

For each backbone (``unet``: BasicUNet, ``swin``: SwinUNETR; the bundles' default widths, i.e. the paper's) and each
setting, the bundle's inference pipeline is built with ``monai.bundle.ConfigWorkflow`` from the config layers of the
setting and run on WHOLE CTs at the bundle's own spacing (1.5 x 1.5 x 2 mm), HU window and 96^3 sliding window:

* ``torch``: ``inference.json`` (PyTorch float32: ``amp`` false; the reference of the agreement),
* ``onnx``: ``inference.json`` + ``inference_onnx.json`` (onnxruntime, float32 unless ``onnx_quantization``),
* ``fast``: ``inference.json`` + ``inference_onnx.json`` + ``inference_cpu_fast.json`` (the recommended CPU setting),

each optionally with config overrides (``--setting name=layers`` or ``name=layers:{json overrides}``).

Timed per setting and CT: end to end (the workflow built, weights/ONNX session loaded, CT read and preprocessed,
sliding window, postprocessing, label map written; Python start-up and imports excluded) and the sliding-window
part alone (the evaluator's inferer wrapped). Reported with the number of windows, the network's GFLOP per window
(``torch.utils.flop_counter``, forward, one 96^3 window), the achieved GFLOP/s of the sliding window (windows x GFLOP
/ seconds; for int8 settings the float32 FLOP count, i.e. the float32-equivalent rate) and its fraction of this
CPU's float32 matmul rate, measured in the same run (``torch.matmul`` of square float32 matrices with the same thread
count, best of several, before the backbones and after them). Agreement: Dice per label (labels present in either
map) and voxels differing between each setting's label map and the reference's (``--reference``, by default the first
setting: ``torch``, the bundle defaults; it may run last, so that a long reference stopped early leaves the others).

The trained weights come from ``--unet-models`` / ``--swin-models``: a ``models`` folder of a finetune run of the
bundle (``model.pt`` and its ``model.provenance.json``); ``model.onnx`` is exported there with the bundle README's
``onnx_export`` command when it is missing. The CTs default to the two whole CTs of the demo's data source
(``tools/data/fetch_demo_ct.py``'s TotalSegmentator sdist: ``example_ct`` 3 mm abdomen and the ``aorta_report`` CT).

    python tools/benchmarks/benchmark_whole_ct.py --unet-models demo_run/whole_ct/unet/models \\
        --swin-models demo_run/whole_ct/swin/models --output tools/benchmarks/results/whole_ct_cpu.json

Writes the JSON and a Markdown table next to it (same name, ``.md``), after every setting (a long run that is
stopped keeps what it measured).
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import subprocess
import sys
import tarfile
import time

import numpy as np
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from hybridmim_components.utils.atomic_files import atomic_open, atomic_path  # noqa: E402
from tools.bundles.bundlegen.onnx import CONVERTER_KWARGS  # noqa: E402

BUNDLES_DIR = os.path.join(REPO_ROOT, "bundles")
LAYERS = {
    "torch": ["inference.json"],
    "onnx": ["inference.json", "inference_onnx.json"],
    "fast": ["inference.json", "inference_onnx.json", "inference_cpu_fast.json"],
}
#: members of the TotalSegmentator sdist that are whole CTs (see tools/data/fetch_demo_ct.py)
WHOLE_CTS = {
    "example_ct": "tests/reference_files/example_ct.nii.gz",
    "aorta_ct": "tests/reference_files/aorta_report/example_ct.nii.gz",
}
DEFAULT_SETTINGS = ["torch=torch", "onnx=onnx", "fast=fast"]


def parse_setting(text: str) -> tuple[str, dict]:
    """``"name=onnx:{\"onnx_quantization\": \"int8\"}"`` -> ``("name", {"layers": "onnx", "overrides": {...}})``."""
    name, sep, spec = text.partition("=")
    layers, _, overrides = spec.partition(":")
    if not sep or layers not in LAYERS:
        raise ValueError(f"setting {text!r}: expected name=LAYERS[:json], LAYERS one of {sorted(LAYERS)}")
    try:
        extra = json.loads(overrides) if overrides else {}
    except json.JSONDecodeError as err:
        raise ValueError(f"setting {text!r}: the overrides after ':' are not JSON ({err})") from err
    if not isinstance(extra, dict):
        raise ValueError(f"setting {text!r}: the overrides after ':' must be a JSON object, got {overrides!r}")
    return name, {"layers": layers, "overrides": extra}


def whole_cts(names: list[str], out_dir: str) -> dict[str, str]:
    """``{name: path}`` of the whole CTs, extracted once from the cached TotalSegmentator sdist into ``out_dir``."""
    from tools.data.fetch_demo_ct import fetch_sdist

    paths = {name: os.path.join(out_dir, f"{name}.nii.gz") for name in names}
    missing = [n for n in names if not os.path.isfile(paths[n])]
    if missing:
        sdist = fetch_sdist()
        with tarfile.open(sdist) as tar:
            members = {m.name.split("/", 1)[1]: m for m in tar.getmembers() if "/" in m.name}
            for name in missing:
                data = tar.extractfile(members[WHOLE_CTS[name]]).read()
                with atomic_open(paths[name], "wb") as f:
                    f.write(data)
    return paths


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best float32 ``torch.matmul`` rate (GFLOP/s) of two ``n x n`` matrices at torch's current thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def gflop_per_window(net: torch.nn.Module, roi: list, in_channels: int) -> float:
    """Forward GFLOP of ``net`` on one ``1 x C x roi`` window (matrix products and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        net(torch.zeros(1, in_channels, *roi))
    return counter.get_total_flops() / 1e9


def window_count(shape, roi, overlap: float) -> int:
    """Windows of MONAI's sliding window over a ``D x H x W`` volume (as ``monai.inferers.sliding_window_inference``)."""
    count = 1
    for size, r in zip(shape, roi):
        if size <= r:
            continue
        interval = max(1, int(r * (1 - overlap)))
        count *= int(np.ceil((size - r) / interval)) + 1
    return count


class TimedInferer:
    """Wraps an inferer: the seconds and input shapes of its calls (the sliding-window part of a run)."""

    def __init__(self, inferer):
        self.inferer, self.seconds, self.shapes = inferer, [], []

    def __call__(self, inputs, network, *args, **kwargs):
        start = time.perf_counter()
        out = self.inferer(inputs, network, *args, **kwargs)
        self.seconds.append(time.perf_counter() - start)
        self.shapes.append(list(inputs.shape))
        return out


def ensure_onnx(backbone: str, models: str) -> str:
    """``models/model.onnx``, exported from ``models/model.pt`` with the bundle README's command when missing."""
    from monai.bundle import onnx_export

    path = os.path.join(models, "model.onnx")
    if os.path.isfile(path) and os.path.getmtime(path) >= os.path.getmtime(os.path.join(models, "model.pt")):
        return path
    bundle = os.path.join(BUNDLES_DIR, f"hybridmim_{backbone}_btcv")
    cfg = os.path.join(bundle, "configs")
    with atomic_path(path) as tmp:
        onnx_export(net_id="network_def", filepath=tmp, ckpt_file=os.path.join(models, "model.pt"),
                    meta_file=os.path.join(cfg, "metadata.json"), config_file=os.path.join(cfg, "inference.json"),
                    input_shape=[2, 1, 96, 96, 96], converter_kwargs=ast.literal_eval(CONVERTER_KWARGS),
                    use_trace=True, bundle_root=bundle, ckpt_dir=models)
    return path


def run_setting(backbone: str, setting: dict, models: str, image: str, out_dir: str) -> dict:
    """One bundle inference of ``image``; returns times, windows and the label map's path."""
    from monai.bundle import ConfigWorkflow

    bundle = os.path.join(BUNDLES_DIR, f"hybridmim_{backbone}_btcv")
    cfg = os.path.join(bundle, "configs")
    work = os.path.dirname(out_dir)
    datalist = os.path.join(work, f"datalist_{os.path.basename(image).split('.')[0]}.json")
    with atomic_open(datalist, "w") as f:
        json.dump({"testing": [{"image": os.path.abspath(image)}]}, f)
    overrides = {
        "bundle_root": bundle,
        "ckpt_dir": os.path.abspath(models),
        "output_dir": os.path.abspath(out_dir),
        "dataset_dir": os.path.abspath(work),
        "data_list_file_path": os.path.basename(datalist),
        "dataloader#num_workers": 0,  # 2 cores: a worker process would only compete with the network
        "device": "$torch.device('cpu')",
        "amp": False,  # the PyTorch reference is float32 (the ONNX layers set it too)
        **setting["overrides"],
    }
    start = time.perf_counter()
    workflow = ConfigWorkflow(config_file=[os.path.join(cfg, c) for c in LAYERS[setting["layers"]]],
                              meta_file=os.path.join(cfg, "metadata.json"), workflow_type="infer", **overrides)
    workflow.initialize()
    evaluator = workflow.parser.get_parsed_content("evaluator")
    timed = TimedInferer(evaluator.inferer)
    evaluator.inferer = timed
    workflow.run()
    total = time.perf_counter() - start
    inferer = timed.inferer
    roi = list(inferer.roi_size)
    overlap = float(np.atleast_1d(inferer.overlap)[0])
    shape = timed.shapes[0][2:]
    stem = os.path.basename(image).split(".")[0]
    label = os.path.join(out_dir, f"{stem}_seg.nii.gz")
    if not os.path.isfile(label):
        raise FileNotFoundError(f"the run wrote no label map {label} (contents: {os.listdir(out_dir)})")
    network = workflow.parser.get_parsed_content("network")
    workflow.finalize()
    return {
        "end_to_end_s": round(total, 1),
        "sliding_window_s": round(sum(timed.seconds), 1),
        "preprocessed_shape": shape,
        "overlap": overlap,
        "sw_batch_size": int(inferer.sw_batch_size),
        "windows": window_count(shape, roi, overlap),
        "quantization": getattr(network, "quantization", "none (PyTorch)"),
        # other jobs on the machine: the 1-minute load average at the end (this run alone would be about the threads)
        "load_average_1min": round(os.getloadavg()[0], 2),
        "label_map": label,
    }


def agreement(label: str, reference: str) -> dict:
    """Dice per label (present in either map) and voxels differing between two label maps of the same CT."""
    import nibabel as nib

    a = np.asarray(nib.load(label).dataobj)
    b = np.asarray(nib.load(reference).dataobj)
    if a.shape != b.shape:
        raise ValueError(f"{label} has shape {a.shape}, the reference {reference} {b.shape}")
    dice = {}
    for k in sorted(set(np.unique(a).tolist()) | set(np.unique(b).tolist())):
        if k == 0:
            continue
        p, t = a == k, b == k
        dice[int(k)] = round(float(2 * np.logical_and(p, t).sum() / (p.sum() + t.sum())), 5)
    return {"dice_per_label": dice, "dice_min": min(dice.values()) if dice else 1.0,
            "voxels_differing": int((a != b).sum()), "voxels": int(a.size)}


def markdown(report: dict) -> str:
    lines = [
        "# Whole-CT inference on the CPU",
        "",
        f"Measured with `{report['command']}` on {report['machine']} (shared with another worker's jobs: seconds are "
        f"noisy). float32 matmul rate of this CPU in the same run: {report['matmul_gflops']} GFLOP/s (best of "
        "`torch.matmul` 2048^2, same threads; before and after). Agreement against the setting "
        f"`{report['reference']}` (PyTorch float32, bundle defaults). load: the machine's 1-minute load average at the end of the run (2 cores; above "
        "the run's own threads = other jobs).",
        "",
        "| backbone | CT | setting | end to end | sliding window | windows | GFLOP/window | GFLOP/s | of matmul |"
        " Dice min | voxels differing | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for backbone, b in report["results"].items():
        for ct, runs in b["runs"].items():
            for name, r in runs.items():
                agree = r.get("agreement")
                lines.append(
                    f"| {backbone} | {ct} | {name} | {r['end_to_end_s']:.0f} s | {r['sliding_window_s']:.0f} s | "
                    f"{r['windows']} | {b['gflop_per_window']:.0f} | {r['gflops']:.0f} | {r['fraction_of_matmul']:.2f} | "
                    + (f"{agree['dice_min']:.4f} | {agree['voxels_differing']} of {agree['voxels']} |" if agree
                       else ("reference | - |" if name == report["reference"] else "no reference run | - |"))
                    + f" {r['load_average_1min']} |")
    lines += ["", "Settings (config layers and overrides):", ""]
    for name, s in report["settings"].items():
        lines.append(f"- `{name}`: {' + '.join(LAYERS[s['layers']])}" +
                     (f", overrides `{json.dumps(s['overrides'])}`" if s["overrides"] else ""))
    return "\n".join(lines) + "\n"


def write(report: dict, output: str | None) -> None:
    if not output:
        return
    with atomic_open(output, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    with atomic_open(os.path.splitext(output)[0] + ".md", "w") as f:
        f.write(markdown(report))


def combine(paths: list[str]) -> dict:
    """One report from several runs of this script (e.g. one per backbone, or a further setting run later): the
    runs of each backbone and CT side by side, every command, the matmul rates of all runs (each row keeps the
    fraction against the best rate of all runs), and the agreement recomputed against the first report's reference setting where
    a run of it exists for that backbone and CT (so a setting run later is compared with the earlier reference)."""
    reports = []
    for path in paths:
        with open(path) as f:
            reports.append(json.load(f))
    out = dict(reports[0])
    out["command"] = " ; ".join(r["command"] for r in reports)
    out["matmul_gflops_runs"] = [g for r in reports for g in r["matmul_gflops_runs"]]
    out["matmul_gflops"] = max(out["matmul_gflops_runs"])  # the best of all runs: the least disturbed by load
    out["results"], out["settings"] = {}, {}
    for r in reports:
        for backbone, b in r["results"].items():
            merged = out["results"].setdefault(backbone, {**b, "runs": {}})
            for ct, runs in b["runs"].items():
                merged["runs"].setdefault(ct, {}).update(runs)
        out["settings"].update(r["settings"])
    reference = out["reference"]
    for b in out["results"].values():
        for runs in b["runs"].values():
            for name, run in runs.items():
                run["fraction_of_matmul"] = round(run["gflops"] / out["matmul_gflops"], 3)
                run.pop("agreement", None)
                if reference in runs and name != reference:
                    run["agreement"] = agreement(run["label_map"], runs[reference]["label_map"])
    return out


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                    platform.processor())
    except OSError:
        return platform.processor() or platform.machine()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", nargs="+", default=["unet", "swin"], choices=["unet", "swin"])
    parser.add_argument("--unet-models", default="demo_run/whole_ct/unet/models")
    parser.add_argument("--swin-models", default="demo_run/whole_ct/swin/models")
    parser.add_argument("--cts", nargs="+", default=["example_ct"], choices=sorted(WHOLE_CTS))
    parser.add_argument("--image", default=None, help="a NIfTI CT instead of --cts")
    parser.add_argument("--setting", nargs="+", default=DEFAULT_SETTINGS,
                        help="name=LAYERS[:json overrides], LAYERS torch/onnx/fast; the first is the reference")
    parser.add_argument("--reference", default=None,
                        help="the setting the others are compared with (default: the first; it may run last)")
    parser.add_argument("--work-dir", default="demo_run/whole_ct/bench", help="label maps and extracted CTs")
    parser.add_argument("--output", default=None, help="JSON file (a .md with the table is written beside it)")
    parser.add_argument("--combine", nargs="+", default=None,
                        help="instead of measuring: merge these result JSONs (one backbone each, say) into --output")
    args = parser.parse_args(argv)
    if args.combine:
        write(combine(args.combine), args.output)
        return 0

    import onnxruntime

    settings = dict(parse_setting(s) for s in args.setting)
    args.reference = args.reference or next(iter(settings))
    if args.reference not in settings:
        raise SystemExit(f"--reference {args.reference!r} is none of the settings {sorted(settings)}")
    os.makedirs(args.work_dir, exist_ok=True)
    images = ({os.path.basename(args.image).split(".")[0]: args.image} if args.image
              else whole_cts(args.cts, args.work_dir))
    command = "python tools/benchmarks/benchmark_whole_ct.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rate_before = matmul_gflops()
    report = {
        "command": command.strip(),
        "machine": f"{os.cpu_count()} CPU cores ({cpu_name()}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), onnxruntime {onnxruntime.__version__}",
        "matmul_gflops_runs": [round(rate_before, 1)],
        "matmul_gflops": round(rate_before, 1),
        "settings": settings,
        "reference": args.reference,
        "results": {},
    }
    for backbone in args.backbones:
        from monai.bundle import ConfigParser

        models = getattr(args, f"{backbone}_models")
        cfg = os.path.join(BUNDLES_DIR, f"hybridmim_{backbone}_btcv", "configs")
        bparser = ConfigParser()
        bparser.read_config(os.path.join(cfg, "inference.json"))
        bparser.update({"check_trained_settings": False})
        net = bparser.get_parsed_content("network_def").eval()
        gflop = gflop_per_window(net, list(bparser["roi_size"]), int(bparser["network_def"]["in_channels"]))
        del net
        if any(s["layers"] != "torch" for s in settings.values()):
            ensure_onnx(backbone, models)
        result = report["results"][backbone] = {"models": models, "gflop_per_window": round(gflop, 1), "runs": {}}
        for ct, image in images.items():
            runs = result["runs"][ct] = {}
            for name, setting in settings.items():
                out_dir = os.path.join(args.work_dir, backbone, ct, name)
                r = run_setting(backbone, setting, models, image, out_dir)
                r["gflops"] = round(r["windows"] * gflop / r["sliding_window_s"], 1)
                r["fraction_of_matmul"] = round(r["gflops"] / report["matmul_gflops"], 3)
                runs[name] = r
                if args.reference in runs:  # every run so far against the reference (which may run last)
                    reference = runs[args.reference]["label_map"]
                    for other, o in runs.items():
                        if other != args.reference:
                            o["agreement"] = agreement(o["label_map"], reference)
                print(f"{backbone} {ct} {name}: {r['end_to_end_s']:.0f} s end to end, sliding window "
                      f"{r['sliding_window_s']:.0f} s ({r['windows']} windows)"
                      + (f", Dice min {r['agreement']['dice_min']:.4f}, {r['agreement']['voxels_differing']} voxels "
                         "differ" if "agreement" in r else ""), flush=True)
                write(report, args.output)
    report["matmul_gflops_runs"].append(round(matmul_gflops(), 1))
    report["matmul_gflops"] = max(report["matmul_gflops_runs"])
    for b in report["results"].values():  # fractions against the best rate of the run
        for runs in b["runs"].values():
            for r in runs.values():
                r["fraction_of_matmul"] = round(r["gflops"] / report["matmul_gflops"], 3)
    write(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
