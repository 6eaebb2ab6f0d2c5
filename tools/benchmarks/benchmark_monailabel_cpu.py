"""The latency an annotator waits for per scan: MONAI Label's ``/infer`` on a whole CT, on this CPU, for one trained
finetuning bundle served three ways side by side by one server.

* ``pytorch``: the bundle as trained (``inference.json``, PyTorch float32, ``amp`` off);
* ``onnx``: a copy made by ``tools/bundles/serve_on_cpu.py`` (the same pipeline, onnxruntime float32);
* ``onnx_fast``: a copy made by ``serve_on_cpu.py --fast`` (``inference_cpu_fast.json``'s settings).

One MONAI Label 0.8.5 server (its ``monaibundle`` sample app, ``tools/monailabel/start_server.py``) serves the three
copies from a folder holding the CT; each ``POST /infer/<model>?output=image`` is timed by the client (wall clock:
what the annotator waits for, reading, preprocessing, inference, inversion and writing included) and MONAI Label's
own latencies are read from its log. The copies run interleaved (``--repeats`` rounds of all three) so that load from
other jobs hits all alike; the first request of each copy also loads its network. Agreement: Dice per label and the
voxels differing of each label map against the ``pytorch`` copy's (first round).

    python tools/benchmarks/benchmark_monailabel_cpu.py --bundle bundles/hybridmim_unet_btcv \\
        --models demo_run/whole_ct/unet/models --image demo_data/ct/images/abdomen_whole.nii.gz \\
        --output tools/benchmarks/results/monailabel_cpu_unet.json

``--models`` is the ``models`` folder of a trained run of ``--bundle`` (``model.pt`` and ``model.provenance.json``;
its settings, e.g. the width, are written into the served configs from the record with ``--override``). Writes the
JSON and a Markdown table next to it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from hybridmim_components.utils.atomic_files import atomic_open  # noqa: E402
from tools.bundles.serve_on_cpu import serve_on_cpu  # noqa: E402
from tools.monailabel.server import START_SERVER, running_monailabel  # noqa: E402

VARIANTS = ("pytorch", "onnx", "onnx_fast")


def _copy_bundle(bundle: str, models: str, dest: str, overrides: dict) -> None:
    shutil.copytree(os.path.join(bundle, "configs"), os.path.join(dest, "configs"))
    shutil.copytree(models, os.path.join(dest, "models"))
    path = os.path.join(dest, "configs", "inference.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update({"amp": False, **overrides})  # a CPU: no mixed precision
    with atomic_open(path, "w") as f:
        json.dump(cfg, f, indent=4)


def _dice(a: np.ndarray, b: np.ndarray) -> dict[int, float]:
    labels = sorted((set(np.unique(a).tolist()) | set(np.unique(b).tolist())) - {0})
    return {int(k): float(2 * np.sum((a == k) & (b == k)) / (np.sum(a == k) + np.sum(b == k))) for k in labels}


def run(bundle: str, models: str, image: str, repeats: int, overrides: dict, work: str) -> dict:
    import nibabel as nib

    name = os.path.basename(os.path.normpath(bundle))
    apps = os.path.join(work, "apps")
    subprocess.run([sys.executable, START_SERVER, "apps", "--download", "--name", "monaibundle", "--output", apps],
                   check=True, capture_output=True)
    model_dir = os.path.join(apps, "monaibundle", "model")
    served = {v: f"{name}_{v}" for v in VARIANTS}
    for variant, folder in served.items():
        dest = os.path.join(model_dir, folder)
        _copy_bundle(bundle, models, dest, overrides)
        if variant != "pytorch":
            serve_on_cpu(dest, fast=variant == "onnx_fast")
    studies = os.path.join(work, "studies")
    os.makedirs(studies)
    shutil.copy(image, os.path.join(studies, "ct.nii.gz"))
    log_path = os.path.join(work, "server.log")
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    times = {v: [] for v in VARIANTS}
    labels = {}
    with running_monailabel(os.path.join(apps, "monaibundle"), studies, list(served.values()), log_path, cwd=work,
                            env=env) as (url, _):
        for round_ in range(repeats):
            for variant in VARIANTS:
                out = os.path.join(work, f"{variant}_{round_}.nii.gz")
                request = urllib.request.Request(f"{url}/infer/{served[variant]}?image=ct&output=image", data=b"",
                                                 method="POST")
                start = time.perf_counter()
                with urllib.request.urlopen(request, timeout=3600) as r, open(out, "wb") as f:
                    f.write(r.read())
                times[variant].append(time.perf_counter() - start)
                if round_ == 0:
                    labels[variant] = np.asarray(nib.load(out).dataobj)
                print(f"{variant} round {round_}: {times[variant][-1]:.1f} s", flush=True)
    with open(log_path) as f:
        reported = re.findall(r"Latencies => Total: ([0-9.]+); Pre: ([0-9.]+); Inferer: ([0-9.]+)", f.read())
    reference = labels["pytorch"]
    rows = []
    for variant in VARIANTS:
        dice = _dice(labels[variant], reference)
        rows.append({"variant": variant, "model": served[variant], "seconds": times[variant],
                     "median_s": statistics.median(times[variant]),
                     "dice_min": min(dice.values()) if dice else 1.0, "dice": dice,
                     "voxels_differing": int(np.sum(labels[variant] != reference)), "voxels": int(reference.size)})
    return {"rows": rows, "server_latencies": [list(map(float, r)) for r in reported],
            "shape": list(reference.shape)}


def write_markdown(result: dict, path: str) -> None:
    lines = [
        "# MONAI Label on a CPU: latency per whole CT", "",
        f"Measured with `{result['command']}` on {result['machine']}. One MONAI Label {result['monailabel']} server, "
        "the three copies interleaved; wall clock of `POST /infer` as the client sees it (median of the rounds; the "
        "first request of a copy also loads its network). Agreement against the `pytorch` copy's label map.", "",
        f"CT: `{result['image']}`, label map {'x'.join(map(str, result['shape']))} voxels.", "",
        "| served as | seconds per scan | all rounds (s) | min Dice per label vs PyTorch | voxels differing |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        rounds = ", ".join(f"{s:.1f}" for s in r["seconds"])
        lines.append(f"| {r['variant']} | {r['median_s']:.1f} | {rounds} | {r['dice_min']:.4f} | "
                     f"{r['voxels_differing']} of {r['voxels']} |")
    with atomic_open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", required=True, help="the finetuning bundle (its configs are served)")
    parser.add_argument("--models", required=True, help="models folder of a trained run (model.pt + record)")
    parser.add_argument("--image", required=True, help="a whole CT (NIfTI)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--override", default="{}", help="JSON of inference.json keys, e.g. the trained width")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    import monailabel
    import torch

    with tempfile.TemporaryDirectory() as work:
        result = run(args.bundle, args.models, args.image, args.repeats, json.loads(args.override), work)
    result.update({
        "command": "python tools/benchmarks/benchmark_monailabel_cpu.py " + " ".join(argv or sys.argv[1:]),
        "machine": f"{os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__} "
                   f"({torch.get_num_threads()} threads)",
        "monailabel": monailabel.__version__, "image": args.image,
    })
    with atomic_open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    write_markdown(result, os.path.splitext(args.output)[0] + ".md")
    for r in result["rows"]:
        print(f"{r['variant']}: {r['median_s']:.1f} s per scan, min Dice {r['dice_min']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
