"""Per-patient segmentation metrics and the paired bootstrap interval of the patient study.

* :func:`segmentation_metrics`: Dice and HD95 (mm) of a binary prediction against the ground truth, in the scan's own
  geometry (MONAI's ``compute_hausdorff_distance`` with the voxel spacing).
* :func:`paired_bootstrap_ci`: the mean per-patient difference between two arms and its percentile bootstrap
  interval, resampling patients. With few patients (≤ :data:`EXACT_MAX_N`) every resample is enumerated with its
  multinomial probability, so the interval is exact and needs no random numbers; above, ``n_resamples`` seeded draws.
* :func:`sign_flip_test`: the two-sided paired sign-flip (permutation) p-value of the mean difference, exact up to
  :data:`SIGN_FLIP_EXACT_MAX_N` patients; its smallest possible value is 2 / 2^n (0.125 with 4 patients).
* :func:`verdict`: "helped" or "hurt" only when the interval excludes 0 and p < 0.05.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

#: up to this many patients the bootstrap distribution is enumerated exactly (C(2n-1, n) resamples: 92378 at 10)
EXACT_MAX_N = 10
#: up to this many patients the sign-flip test enumerates all 2^n sign patterns
SIGN_FLIP_EXACT_MAX_N = 16
#: the significance level of :func:`verdict`
ALPHA = 0.05


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


def _differences(differences: Sequence[float], what: str) -> np.ndarray:
    """The per-patient differences as float64, refusing an empty or non-finite list (``what`` needs them)."""
    d = np.asarray([float(x) for x in differences], dtype=np.float64)
    if len(d) == 0:
        raise ValueError(f"no paired differences: {what} needs at least one patient")
    if not np.all(np.isfinite(d)):
        raise ValueError(f"paired differences must be finite, got {d.tolist()}")
    return d


def paired_bootstrap_ci(differences: Sequence[float], level: float = 0.95, n_resamples: int = 10000,
                        seed: int = 0) -> dict:
    """Mean of the per-patient ``differences`` and its percentile bootstrap ``level`` interval.

    A resample draws ``n`` patients with replacement and takes the mean of their differences; the interval is the
    ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles (inverse CDF) of that mean's bootstrap distribution.

    Returns ``{"mean", "low", "high", "n", "method"}``; ``method`` is ``"exact"`` (all resamples weighted by their
    multinomial probability, n ≤ :data:`EXACT_MAX_N`) or ``"monte carlo (<n_resamples>, seed <seed>)"``.
    """
    d = _differences(differences, "the bootstrap")
    n = len(d)
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


def sign_flip_test(differences: Sequence[float], n_resamples: int = 100000, seed: int = 0) -> dict:
    """Two-sided paired sign-flip test of ``mean(differences) = 0``.

    p = the share of sign patterns (each difference kept or negated) whose |sum| reaches the observed |sum|; all
    2^n patterns up to :data:`SIGN_FLIP_EXACT_MAX_N` patients, else ``n_resamples`` seeded draws
    ((1 + hits) / (1 + draws)). Returns ``{"p", "min_p", "n", "method"}``; ``min_p`` = 2 / 2^n, the smallest p
    that ``n`` patients allow.
    """
    d = _differences(differences, "the sign-flip test")
    n = len(d)
    observed = abs(d.sum())
    tol = 1e-9 * max(1.0, float(np.abs(d).sum()))  # the observed pattern itself must count, despite rounding
    if n <= SIGN_FLIP_EXACT_MAX_N:
        bits = (np.arange(2 ** n)[:, None] >> np.arange(n)) & 1
        sums = np.abs((1 - 2 * bits) @ d)
        p, method = float(np.mean(sums >= observed - tol)), "exact"
    else:
        signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(n_resamples, n))
        hits = int(np.sum(np.abs(signs @ d) >= observed - tol))
        p, method = (1 + hits) / (1 + n_resamples), f"monte carlo ({n_resamples}, seed {seed})"
    return {"p": min(1.0, p), "min_p": min(1.0, 2.0 / 2.0 ** n), "n": n, "method": method}


def verdict(ci: dict, test: dict, metric: str, higher_is_better: bool) -> str:
    """The sign of the difference (pretrained − scratch) in plain words: "helped"/"hurt" only when the interval
    ``ci`` excludes 0 and the sign-flip ``test`` gives p < :data:`ALPHA`."""
    low, high, p, min_p = ci["low"], ci["high"], test["p"], test["min_p"]
    interval = f"the 95 % interval [{low:+.3f}, {high:+.3f}]"
    excludes = low > 0 or high < 0
    p_text = f"sign-flip p = {p:.3f} (the smallest possible with {test['n']} patients: {min_p:.3f})"
    if excludes and p < ALPHA:
        helped = (low > 0) == higher_is_better
        better, worse = ("higher", "lower") if higher_is_better else ("lower", "higher")
        return (f"pretraining {'helped' if helped else 'hurt'}: {metric} was {better if helped else worse} with the "
                f"HybridMIM weights; {interval} excludes 0 and {p_text}")
    sign = "higher" if ci["mean"] > 0 else "lower" if ci["mean"] < 0 else "equal"
    why = (f"{interval} {'excludes' if excludes else 'contains'} 0 and {p_text} "
           f"{'is not below' if p >= ALPHA else 'is below'} {ALPHA:g}")
    return f"no clear difference: {metric} was {sign} on average with the HybridMIM weights ({ci['mean']:+.3f}); {why}"
