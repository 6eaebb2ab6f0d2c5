"""Measured figures quoted in the READMEs, read from the benchmark results committed under ``tools/benchmarks/results``.

Every number printed here comes from a JSON file written by a command in ``tools/benchmarks/`` (quoted next to the figure), so
anyone can rerun it. A bundle with no measurement says so instead of quoting one.
"""
from __future__ import annotations

import json
import os

#: tools/benchmarks/results (this file is tools/bundles/bundlegen/figures.py)
RESULTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks",
                           "results")

NO_DICE = (
    "No Dice or HD95 has been measured with this bundle: that needs the real dataset and a GPU at the default "
    "(paper) settings, and the sessions that built this collection had neither. The bundle itself is tested end to "
    "end on small synthetic data on CPU (`tests/test_finetune_bundles.py`).\n"
)


def load_result(name: str) -> dict | None:
    """A benchmark result JSON from ``tools/benchmarks/results``, or ``None`` when it has not been measured."""
    path = os.path.join(RESULTS_DIR, name)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def step_time_table(result: dict) -> str:
    """Markdown table and ratios of one ``tools/benchmarks/benchmark_pretrain_step.py`` result."""
    rows = [
        "| backbone | contrastive views | region | s/step | volumes/s | peak GPU memory |",
        "|---|---|---|---|---|---|",
    ]
    for s in result["settings"]:
        memory = f"{s['peak_memory_gib']:.1f} GiB" if s.get("peak_memory_gib") is not None else "n/a (CPU)"
        region = f"{s['region']}³" + (" (full)" if s["region"] == result["crop"] else "")
        rows.append(
            f"| {s['backbone']} | {s['views']} | {region} | {s['seconds_per_step']:.2f} | "
            f"{s['volumes_per_second']:.3f} | {memory} |"
        )
    ratios = [
        f"- {r['backbone']}, {r['views']} views: partial-region step = **{r['partial_over_full']:.2f}×** the "
        "full-reconstruction step" for r in result["ratios"]
    ]
    width = f"feature size {result['feature_size']}" if any(s["backbone"] == "swin" for s in result["settings"]) else (
        f"features {tuple(result['features'])}")  # fmt: skip
    header = (
        f"{result['device']}, {result['cpu_threads']} CPU threads, torch {result['torch']}; crop {result['crop']}³, "
        f"batch {result['batch']}, {result['channels']} channel(s), {width}, AMP {'on' if result['amp'] else 'off'}. "
        f"Median of the timed steps, settings interleaved. Command: `{result['command']}`"
    )
    return "\n".join([header, "", *rows, "", *ratios]) + "\n"


def pretrain_results(backbone: str) -> list[dict]:
    return [r for r in (load_result(f"pretrain_step_cpu_{backbone}.json"),) if r is not None]


def performance_section(bundle_name: str) -> str:
    """Markdown body (no heading) of a bundle README's performance section."""
    if "pretrain" not in bundle_name:
        return NO_DICE
    backbone = "swin" if "_swin_" in bundle_name else "unet"
    results = pretrain_results(backbone)
    if not results:
        return "No figures have been measured for this bundle yet.\n"
    text = [
        "Time of one pretraining step (forward, loss, backward, AdamW update; no data loading), measured by this "
        "collection with `tools/benchmarks/benchmark_pretrain_step.py` on the CPU of its development machine (no GPU was "
        "available). Ratios are what transfers between machines; absolute CPU times do not. The paper reports 0.68 s "
        "vs 1.03 s per step (0.66×) for its UNet on a GPU.\n"
    ]
    if "brats" in bundle_name:
        text.append("Measured at the CT settings (96³ crop, 64³ region, 1 channel); this bundle's 128³/96³ is not.\n")
    text += [step_time_table(r) for r in results]
    return "\n".join(text)
