"""Aggregation and outputs of the experiments: mean ± std per group, atomic CSV, Markdown tables, PNG figures."""
from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Sequence

from hybridmim_components.utils.atomic_files import atomic_open, atomic_path


def aggregate(rows: Sequence[dict], by: Sequence[str], value: str) -> list[dict]:
    """Mean and sample standard deviation (n - 1) of ``value`` per group of equal ``by`` values.

    Groups keep the order in which they first appear. Each output row: the ``by`` values, ``n``, ``<value>_mean``
    and ``<value>_std`` (NaN for a group of one: a spread of one run is unknown, not 0).
    """
    groups: dict[tuple, list[float]] = {}
    for row in rows:
        groups.setdefault(tuple(_hashable(row[k]) for k in by), []).append(float(row[value]))
    out = []
    for key, values in groups.items():
        std = statistics.stdev(values) if len(values) > 1 else float("nan")
        out.append({**{k: _unhashable(v) for k, v in zip(by, key)}, "n": len(values),
                    f"{value}_mean": statistics.fmean(values), f"{value}_std": std})
    return out


def _hashable(value):
    return tuple(value) if isinstance(value, list) else value


def _unhashable(value):
    return list(value) if isinstance(value, tuple) else value


def mean_std(mean: float, std: float, digits: int = 3) -> str:
    """``0.812 ± 0.034``; a group of one run shows ``0.812 (n=1)``."""
    if math.isnan(std):
        return f"{mean:.{digits}f} (n=1)"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _atomic_write(path: str, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)


def write_csv(path: str, rows: Sequence[dict], columns: Sequence[str]) -> str:
    """Write ``rows`` (only ``columns``, in that order; lists as ``64x64x32``) atomically; returns ``path``."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "x".join(map(str, v)) if isinstance(v, (list, tuple)) else v for k, v in row.items()})
    _atomic_write(path, buffer.getvalue())
    return path


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_markdown(path: str, title: str, provenance: str, sections: Sequence[str]) -> str:
    _atomic_write(path, "\n\n".join([f"# {title}", f"**{provenance}**", *sections]) + "\n")
    return path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str) -> str:
    with atomic_path(path) as tmp:  # keeps the extension: matplotlib picks the format by it
        fig.savefig(tmp, dpi=110)
    pyplot().close(fig)
    return path
