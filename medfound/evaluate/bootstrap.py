"""Bootstrap confidence intervals for evaluation metrics (BCa or percentile, stratified by class).

Each resample draws, within every class, as many samples as the class has (with replacement), so every resample
keeps the split's class balance and AUROC stays defined; multi-label sets are resampled as a whole. The metric
function is the same one that computes the point estimate (`evaluate.metrics`), so an interval can never describe
a different definition than its number. Seeded: the same predictions give the same intervals.

Method (`eval.interval`): "bca" (default), Efron's bias-corrected and accelerated interval (Efron 1987; DiCiccio &
Efron 1996): the percentiles of the resample values are moved by the bias z0 (how far the point estimate sits from
the resamples' median) and the acceleration a (the skew of the jackknife values), which corrects the
undercoverage of the plain percentile interval at small n for skewed, bounded metrics such as AUROC. The jackknife
leaves out one sample at a time (up to JACKKNIFE_MAX = 200 samples; beyond, one of 200 random groups at a time:
the grouped jackknife estimates the same acceleration at a fixed cost of 200 metric evaluations). "percentile" is the plain 2.5/97.5 percentiles. Tested against scipy.stats.bootstrap(method="BCa").

Too few samples: when the smallest class of the split (multi-label: the fewest positives or negatives of a finding)
has fewer than `eval.min_per_class` samples, no interval is formed (a split with one sample per class would give a
zero-width one); the block says "too few samples for an interval" instead, and so do report.md and the card.
"""

from __future__ import annotations

import math
import warnings
from statistics import NormalDist
from typing import Any, Callable, Optional

import numpy as np

JACKKNIFE_MAX = 200
TOO_FEW = "too few samples for an interval"


def smallest_class(labels: np.ndarray) -> int:
    """The count that decides whether an interval is meaningful: the smallest class (single-label), or the
    fewest positives or negatives of any finding (multi-label)."""
    labels = np.asarray(labels)
    if labels.ndim == 2:
        pos = labels.sum(0)
        return int(min(pos.min(), (len(labels) - pos).min())) if len(labels) else 0
    return int(np.unique(labels, return_counts=True)[1].min()) if len(labels) else 0


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and v is not None and not math.isnan(v)}


def bootstrap_intervals(probs: np.ndarray, labels: np.ndarray, metric_fn: Callable[[np.ndarray, np.ndarray], dict],
                        resamples: int = 1000, seed: int = 0, level: float = 0.95, keep_values: bool = False,
                        method: str = "bca", min_per_class: int = 0) -> dict[str, Any]:
    """{"intervals": {metric: [low, high]}, "resamples", "seed", "level", "method"} for every numeric metric that
    `metric_fn(probs, labels)` returns. A metric undefined in a resample (e.g. no positives) is left out of that
    resample; one undefined in most resamples gets no interval (null). `keep_values` adds "values": {metric:
    array [resamples]} (NaN where undefined), e.g. to form the interval of a difference (`difference_interval`).
    With fewer than `min_per_class` samples in the smallest class every interval is null and "too_few" says why."""
    if resamples <= 0:
        raise ValueError(f"resamples must be positive, got {resamples}")
    if method not in ("bca", "percentile"):
        raise ValueError(f"interval method {method!r}: choose bca or percentile")
    rng = np.random.default_rng(seed)
    multilabel = labels.ndim == 2
    strata = [np.arange(len(labels))] if multilabel else [np.flatnonzero(labels == c) for c in np.unique(labels)]
    values: dict[str, np.ndarray] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # single-class resamples warn by design; the point estimate already did
        for i in range(resamples):
            idx = np.concatenate([s[rng.integers(0, len(s), len(s))] for s in strata])
            for name, v in _numeric(metric_fn(probs[idx], labels[idx])).items():
                values.setdefault(name, np.full(resamples, np.nan))[i] = v
        smallest = smallest_class(labels)
        too_few = smallest < min_per_class
        if method == "bca" and not too_few:
            theta = _numeric(metric_fn(probs, labels))
            jack = _jackknife(probs, labels, metric_fn, seed)
            intervals = {name: bca_interval(v, theta.get(name), jack.get(name), level) for name, v in values.items()}
        else:
            intervals = {name: None if too_few else percentile_interval(v, level) for name, v in values.items()}
    where = " (multi-label: unstratified)" if multilabel else ""
    out = {"intervals": intervals, "resamples": resamples, "seed": seed, "level": level,
           "method": ("BCa bootstrap (bias-corrected and accelerated), stratified by class" if method == "bca" else
                      "percentile bootstrap, stratified by class") + where}
    if too_few:
        what = "finding's positives or negatives" if multilabel else "class"
        out["too_few"] = f"{TOO_FEW}: the smallest {what} has {smallest} sample(s), fewer than eval.min_per_class=" \
                         f"{min_per_class}"
    if keep_values:
        out["values"] = values
    return out


def _jackknife(probs: np.ndarray, labels: np.ndarray, metric_fn: Callable, seed: int) -> dict[str, np.ndarray]:
    """Leave-one-out (or leave-one-group-out, above JACKKNIFE_MAX samples) values of every metric."""
    n = len(labels)
    groups = np.arange(n) if n <= JACKKNIFE_MAX else \
        np.random.default_rng(seed + 1).permutation(n) % JACKKNIFE_MAX
    g = int(groups.max()) + 1 if n else 0
    out: dict[str, np.ndarray] = {}
    for j in range(g):
        keep = groups != j
        for name, v in _numeric(metric_fn(probs[keep], labels[keep])).items():
            out.setdefault(name, np.full(g, np.nan))[j] = v
    return out


def bca_interval(values: np.ndarray, theta: Optional[float], jackknife: Optional[np.ndarray],
                 level: float = 0.95) -> Optional[list[float]]:
    """The BCa interval from resample values, the point estimate and its jackknife values; the percentile interval
    where the correction is undefined (every resample on one side of the estimate, or no jackknife spread)."""
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    if len(v) == 0 or len(v) < len(values) / 2:
        return None
    if theta is None or jackknife is None:
        return percentile_interval(values, level)
    below = (np.sum(v < theta) + 0.5 * np.sum(v == theta)) / len(v)
    if not 0 < below < 1:
        return percentile_interval(values, level)
    nd = NormalDist()
    z0 = nd.inv_cdf(below)
    jk = np.asarray(jackknife, dtype=float)
    jk = jk[~np.isnan(jk)]
    d = jk.mean() - jk if len(jk) else np.zeros(1)
    denom = 6.0 * float(np.sum(d ** 2)) ** 1.5
    a = float(np.sum(d ** 3)) / denom if denom > 0 else 0.0
    bounds = []
    for z in (nd.inv_cdf((1 - level) / 2), nd.inv_cdf((1 + level) / 2)):
        shifted = z0 + (z0 + z) / (1 - a * (z0 + z))
        bounds.append(nd.cdf(shifted) * 100 if math.isfinite(shifted) else math.nan)
    if not all(math.isfinite(b) for b in bounds):
        return percentile_interval(values, level)
    return [round(float(np.percentile(v, bounds[0])), 4), round(float(np.percentile(v, bounds[1])), 4)]


def percentile_interval(values: np.ndarray, level: float = 0.95) -> Optional[list[float]]:
    """[low, high] percentiles of the defined (non-NaN) resample values; None when most resamples are undefined."""
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    if len(v) == 0 or len(v) < len(values) / 2:
        return None
    tail = (1 - level) / 2 * 100
    return [round(float(np.percentile(v, tail)), 4), round(float(np.percentile(v, 100 - tail)), 4)]


def resample_means(per_item: np.ndarray, resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """Bootstrap the mean of per-item scores `[N, M]` (NaN = undefined for that item, skipped in the mean): returns
    `[resamples, M]`, resampling items with replacement (segmentation: per-image Dice/HD95 per class). With fewer
    than two items there is nothing to resample: all NaN (no interval)."""
    x = np.asarray(per_item, dtype=float)
    if len(x) < 2:
        return np.full((resamples, x.shape[1] if x.ndim == 2 else 1), np.nan)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), (resamples, len(x)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a class undefined in every drawn item: NaN, no interval
        return np.nanmean(x[idx], axis=1)


def difference_interval(a: np.ndarray, b: np.ndarray, level: float = 0.95) -> Optional[list[float]]:
    """Interval of `a - b` from two independent bootstraps of the same length (e.g. an external site's metric minus
    the internal test's): resample i of each set is paired, so the spread of both sets adds up."""
    return percentile_interval(np.asarray(a) - np.asarray(b), level)
