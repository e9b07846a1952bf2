"""Bootstrap intervals: nominal coverage on a problem with a known AUROC, determinism, and the eval.json record."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from medfound.evaluate.bootstrap import bootstrap_intervals
from medfound.evaluate.metrics import classification_metrics


def _auroc_only(p, y):
    """The AUROC alone, as the Mann-Whitney U statistic (ties share their mean rank, exactly sklearn's value): the
    test is about the resampling and runs it 24k times, where roc_auc_score's input checks cost 20x the maths."""
    from scipy.stats import rankdata

    pos = y == 1
    n1, n0 = int(pos.sum()), int((~pos).sum())
    return {"auroc": float((rankdata(p[:, 1])[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))}


def test_the_fast_auroc_is_sklearns():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.normal(size=300) + y, 1)  # rounded: many ties
    p = np.stack([1 - s, s], 1)
    assert _auroc_only(p, y)["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_intervals_cover_the_true_auroc_at_about_the_nominal_rate():
    """Scores N(d, 1) for positives and N(0, 1) for negatives have AUROC Phi(d / sqrt 2) = 0.80 exactly."""
    d = math.sqrt(2) * 0.8416212335729143
    rng = np.random.default_rng(0)
    hits, trials = 0, 80
    for t in range(trials):  # 200 per class: at 60 per class percentile intervals undercover (0.87 measured)
        y = np.repeat([0, 1], 200)
        score = rng.normal(size=400) + d * y
        p1 = 1 / (1 + np.exp(-score))
        probs = np.stack([1 - p1, p1], axis=1)
        lo, hi = bootstrap_intervals(probs, y, _auroc_only, resamples=300, seed=t)["intervals"]["auroc"]
        hits += lo <= 0.8 <= hi
    assert 0.88 <= hits / trials <= 0.99, hits / trials  # nominal 0.95 (measured 0.9625); 80 trials: about +-0.025


def test_intervals_are_seeded_stratified_and_contain_the_estimate():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 150)
    logits = rng.normal(size=(150, 3)) + 1.2 * np.eye(3)[y]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)

    def fn(pp, yy):
        return classification_metrics(pp, yy, "ordinal", ["a", "b", "c"])["metrics"]

    a = bootstrap_intervals(p, y, fn, resamples=200, seed=3)
    b = bootstrap_intervals(p, y, fn, resamples=200, seed=3)
    assert a == b and a["method"].startswith("percentile bootstrap, stratified")
    point = fn(p, y)
    for name in ("auroc", "accuracy", "balanced_accuracy", "kappa_quadratic"):
        lo, hi = a["intervals"][name]
        assert lo <= point[name] <= hi and hi - lo > 0


def test_finetune_eval_json_carries_intervals(finetuned):
    report = json.loads((finetuned / "eval.json").read_text())
    assert report["bootstrap"]["resamples"] == 1000 and report["bootstrap"]["level"] == 0.95
    for name, value in report["metrics"].items():
        if value is not None:
            lo, hi = report["intervals"][name]
            assert lo <= value <= hi, name
