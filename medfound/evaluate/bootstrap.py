"""Bootstrap confidence intervals for evaluation metrics (percentile method, stratified by class).

Each resample draws, within every class, as many samples as the class has (with replacement), so every resample
keeps the split's class balance and AUROC stays defined; multi-label sets are resampled as a whole. The metric
function is the same one that computes the point estimate (`evaluate.metrics`), so an interval can never describe
a different definition than its number. Seeded: the same predictions give the same intervals.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Optional

import numpy as np


def bootstrap_intervals(probs: np.ndarray, labels: np.ndarray, metric_fn: Callable[[np.ndarray, np.ndarray], dict],
                        resamples: int = 1000, seed: int = 0, level: float = 0.95, keep_values: bool = False
                        ) -> dict[str, Any]:
    """{"intervals": {metric: [low, high]}, "resamples", "seed", "level", "method"} for every numeric metric that
    `metric_fn(probs, labels)` returns. A metric undefined in a resample (e.g. no positives) is left out of that
    resample; one undefined in most resamples gets no interval (null). `keep_values` adds "values": {metric:
    array [resamples]} (NaN where undefined), e.g. to form the interval of a difference (`difference_interval`)."""
    if resamples <= 0:
        raise ValueError(f"resamples must be positive, got {resamples}")
    rng = np.random.default_rng(seed)
    multilabel = labels.ndim == 2
    strata = [np.arange(len(labels))] if multilabel else [np.flatnonzero(labels == c) for c in np.unique(labels)]
    values: dict[str, np.ndarray] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # single-class resamples warn by design; the point estimate already did
        for i in range(resamples):
            idx = np.concatenate([s[rng.integers(0, len(s), len(s))] for s in strata])
            for name, v in metric_fn(probs[idx], labels[idx]).items():
                if isinstance(v, (int, float)) and v is not None and not math.isnan(v):
                    values.setdefault(name, np.full(resamples, np.nan))[i] = float(v)
    intervals = {name: percentile_interval(v, level) for name, v in values.items()}
    out = {"intervals": intervals, "resamples": resamples, "seed": seed, "level": level,
           "method": "percentile bootstrap, stratified by class" + (" (multi-label: unstratified)" if multilabel else "")}
    if keep_values:
        out["values"] = values
    return out


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
