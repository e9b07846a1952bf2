"""The benchmark's numbers: a metric with its interval for one protocol setting, and the paired difference of two
backbones on the same test samples.

- One setting (kNN, linear, fine-tuning): the metric on the test split with medfound's BCa bootstrap interval
  (medfound.evaluate.bootstrap, stratified by class, seeded by the suite).
- Few-shot: the mean over the seeded draws, with the 2.5-97.5 percentiles of the draws' values (the spread of the
  support's choice, as THUNDER reports it).
- Paired difference A - B: the same bootstrap resamples of the test samples for both (resampling depends only on the
  labels and the seed), the percentile interval of the differences, and a two-sided bootstrap p-value,
  2 x min(P(d <= 0), P(d >= 0)) over the resamples; few-shot pairs draw by draw (the same supports for both).
The metric definitions are medfound's (binary AUROC of the positive class; multi-class and ordinal: the macro mean of
one-vs-rest AUROCs over the classes present; quadratic kappa; balanced accuracy over classes present).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from medfound.evaluate.bootstrap import bootstrap_intervals, percentile_interval
from medfound.evaluate.probes import metric_value


def _metric_fn(metric: str, label_type: str, positive: int):
    def fn(p: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        v = metric_value(metric, p, y, label_type, positive)
        return {metric: np.nan if v is None else v}
    return fn


def score(pred, labels: np.ndarray, metric: str, label_type: str, positive: int, resamples: int,
          seed: int) -> dict[str, Any]:
    """{"value", "low", "high", "values"} of one Prediction (medfound.bench.protocols): `values` are the per-resample
    (or per-draw) values the paired differences use."""

    if pred.probs.ndim == 3:  # few-shot: one value per draw
        per_draw = np.array([np.nan if (v := metric_value(metric, p, labels, label_type, positive)) is None else v
                             for p in pred.probs])
        finite = per_draw[~np.isnan(per_draw)]
        interval = percentile_interval(per_draw)
        return {"value": None if not len(finite) else round(float(finite.mean()), 4),
                "low": interval[0] if interval else None, "high": interval[1] if interval else None,
                "values": per_draw, "interval": "2.5-97.5 percentiles over draws"}
    value = metric_value(metric, pred.probs, labels, label_type, positive)
    if not resamples or value is None:
        return {"value": None if value is None else round(value, 4), "low": None, "high": None, "values": None,
                "interval": None}
    boot = bootstrap_intervals(pred.probs, labels, _metric_fn(metric, label_type, positive), resamples=resamples,
                               seed=seed, keep_values=True, method="bca")
    interval = boot["intervals"].get(metric)
    return {"value": round(value, 4), "low": interval[0] if interval else None,
            "high": interval[1] if interval else None, "values": boot["values"].get(metric),
            "interval": boot["method"]}


def paired(a: dict[str, Any], b: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The paired difference A - B of two `score` results of the same setting (the same resamples or draws)."""
    if a["value"] is None or b["value"] is None:
        return None
    out: dict[str, Any] = {"diff": round(a["value"] - b["value"], 4), "low": None, "high": None, "p": None}
    if a["values"] is None or b["values"] is None:
        return out
    d = np.asarray(a["values"], float) - np.asarray(b["values"], float)
    d = d[~np.isnan(d)]
    if len(d) < 2:
        return out
    lo, hi = np.percentile(d, [2.5, 97.5])
    p = min(1.0, 2 * min((d <= 0).mean(), (d >= 0).mean()))
    out.update(low=round(float(lo), 4), high=round(float(hi), 4), p=round(max(float(p), 1 / len(d)), 4))
    return out
