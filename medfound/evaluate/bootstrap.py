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
                        resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """{"intervals": {metric: [low, high]}, "resamples", "seed", "level", "method"} for every numeric metric that
    `metric_fn(probs, labels)` returns. A metric undefined in a resample (e.g. no positives) is left out of that
    resample; one undefined in most resamples gets no interval (null)."""
    if resamples <= 0:
        raise ValueError(f"resamples must be positive, got {resamples}")
    rng = np.random.default_rng(seed)
    multilabel = labels.ndim == 2
    strata = [np.arange(len(labels))] if multilabel else [np.flatnonzero(labels == c) for c in np.unique(labels)]
    values: dict[str, list[float]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # single-class resamples warn by design; the point estimate already did
        for _ in range(resamples):
            idx = np.concatenate([s[rng.integers(0, len(s), len(s))] for s in strata])
            for name, v in metric_fn(probs[idx], labels[idx]).items():
                if isinstance(v, (int, float)) and v is not None and not math.isnan(v):
                    values.setdefault(name, []).append(float(v))
    tail = (1 - level) / 2 * 100
    intervals: dict[str, Optional[list[float]]] = {}
    for name, v in values.items():
        intervals[name] = None if len(v) < resamples / 2 else \
            [round(float(np.percentile(v, tail)), 4), round(float(np.percentile(v, 100 - tail)), 4)]
    return {"intervals": intervals, "resamples": resamples, "seed": seed, "level": level,
            "method": "percentile bootstrap, stratified by class" + (" (multi-label: unstratified)" if multilabel else "")}
