"""Per-patient segmentation metrics and the paired bootstrap interval of the patient study.

* :func:`segmentation_metrics`: Dice and HD95 (mm) of a binary prediction against the ground truth, in the scan's own
  geometry (MONAI's ``compute_hausdorff_distance`` with the voxel spacing).
* :func:`paired_bootstrap_ci`: the mean per-patient difference between two arms and its percentile bootstrap
  interval, resampling patients. With few patients (≤ :data:`EXACT_MAX_N`) every resample is enumerated with its
  multinomial probability, so the interval is exact and needs no random numbers; above, ``n_resamples`` seeded draws.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

#: up to this many patients the bootstrap distribution is enumerated exactly (C(2n-1, n) resamples: 92378 at 10)
EXACT_MAX_N = 10


def segmentation_metrics(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> dict:
    """Dice and 95th-percentile Hausdorff distance (mm) of ``pred`` against ``truth`` (same shape, nonzero =
    foreground, ``spacing`` in mm per axis).

    An empty prediction (or truth) has no surface: its HD95 is the diagonal of the volume in mm, the largest distance
    the scan can hold, and ``empty`` is set, so a missed tumour counts as the worst case instead of vanishing from
    the mean. Two empty masks have Dice 1 and HD95 0.
    """
    pred, truth = np.asarray(pred) > 0, np.asarray(truth) > 0
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from the ground truth's {truth.shape}")
    p, t = int(pred.sum()), int(truth.sum())
    out = {"pred_voxels": p, "truth_voxels": t, "empty": p == 0 or t == 0}
    if p == 0 and t == 0:
        return {**out, "dice": 1.0, "hd95_mm": 0.0}
    out["dice"] = 2.0 * float(np.logical_and(pred, truth).sum()) / (p + t)
    if out["empty"]:
        out["hd95_mm"] = float(np.sqrt(sum((n * s) ** 2 for n, s in zip(pred.shape, spacing))))
        return out
    import torch
    from monai.metrics import compute_hausdorff_distance

    hd = compute_hausdorff_distance(torch.from_numpy(pred)[None, None], torch.from_numpy(truth)[None, None],
                                    include_background=True, percentile=95, spacing=[float(s) for s in spacing])
    out["hd95_mm"] = float(hd.reshape(-1)[0])
    return out


def _quantile_from_distribution(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    """The smallest value whose cumulative probability reaches ``q`` (the inverse CDF; numpy's 'inverted_cdf')."""
    order = np.argsort(values, kind="stable")
    cdf = np.cumsum(weights[order])
    index = int(np.searchsorted(cdf, q - 1e-12, side="left"))
    return float(values[order][min(index, len(values) - 1)])


def paired_bootstrap_ci(differences: Sequence[float], level: float = 0.95, n_resamples: int = 10000,
                        seed: int = 0) -> dict:
    """Mean of the per-patient ``differences`` and its percentile bootstrap ``level`` interval.

    A resample draws ``n`` patients with replacement and takes the mean of their differences; the interval is the
    ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles (inverse CDF) of that mean's bootstrap distribution.

    Returns ``{"mean", "low", "high", "n", "method"}``; ``method`` is ``"exact"`` (all resamples weighted by their
    multinomial probability, n ≤ :data:`EXACT_MAX_N`) or ``"monte carlo (<n_resamples>, seed <seed>)"``.
    """
    d = np.asarray([float(x) for x in differences], dtype=np.float64)
    n = len(d)
    if n == 0:
        raise ValueError("no paired differences: the bootstrap needs at least one patient")
    if not np.all(np.isfinite(d)):
        raise ValueError(f"paired differences must be finite, got {d.tolist()}")
    alpha = (1.0 - level) / 2.0
    if n <= EXACT_MAX_N:
        means, weights = [], []
        log_total = n * math.log(n)
        for combo in itertools.combinations_with_replacement(range(n), n):
            counts = np.bincount(combo, minlength=n)
            log_ways = math.lgamma(n + 1) - sum(math.lgamma(c + 1) for c in counts)
            weights.append(math.exp(log_ways - log_total))
            means.append(float(counts @ d) / n)
        values, probs = np.asarray(means), np.asarray(weights)
        method = "exact"
    else:
        rng = np.random.default_rng(seed)
        values = d[rng.integers(0, n, size=(n_resamples, n))].mean(axis=1)
        probs = np.full(n_resamples, 1.0 / n_resamples)
        method = f"monte carlo ({n_resamples}, seed {seed})"
    return {"mean": float(d.mean()), "low": _quantile_from_distribution(values, probs, alpha),
            "high": _quantile_from_distribution(values, probs, 1.0 - alpha), "n": n, "method": method}


def verdict(ci: dict, metric: str, higher_is_better: bool) -> str:
    """The sign of the difference (pretrained − scratch) in plain words, from its interval."""
    low, high = ci["low"], ci["high"]
    better, worse = ("higher", "lower") if higher_is_better else ("lower", "higher")
    if low > 0 or high < 0:
        helped = (low > 0) == higher_is_better
        word = "helped" if helped else "hurt"
        side = better if helped else worse
        return (f"pretraining {word}: {metric} was {side} with the HybridMIM weights, and the 95 % interval "
                f"[{low:+.3f}, {high:+.3f}] excludes 0")
    sign = "higher" if ci["mean"] > 0 else "lower" if ci["mean"] < 0 else "equal"
    return (f"no clear difference: {metric} was {sign} on average with the HybridMIM weights "
            f"({ci['mean']:+.3f}), but the 95 % interval [{low:+.3f}, {high:+.3f}] contains 0")
