"""Measured figures quoted in the bundle READMEs, read from the benchmark results committed under ``tools/results``.

Every number printed here comes from a JSON file written by a command in ``tools/`` (named next to the figure), so
anyone can rerun it. A bundle with no measurement says so instead of quoting one.
"""
from __future__ import annotations

import json
import os

RESULTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")


def _load(name: str):
    path = os.path.join(RESULTS_DIR, name)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def performance_section(bundle_name: str) -> str:
    """Markdown body (no heading) of a bundle README's performance section."""
    return "No figures have been measured for this bundle yet.\n"
