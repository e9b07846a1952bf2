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
    assert a == b and a["method"].startswith("BCa bootstrap (bias-corrected and accelerated), stratified")
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


def test_bca_matches_scipy_on_a_skewed_statistic():
    """Our BCa (bias from the resamples, acceleration from the jackknife) against scipy.stats.bootstrap's BCa on the
    mean of 40 exponential values (skewed, where BCa and percentile differ): equal up to resampling noise."""
    from scipy.stats import bootstrap

    x = np.random.default_rng(5).exponential(size=40)
    probs, labels = x[:, None], np.zeros((40, 1))  # one stratum (2-D labels are resampled as a whole)
    ours = bootstrap_intervals(probs, labels, lambda p, y: {"mean": float(p.mean())}, resamples=20000, seed=0)
    pct = bootstrap_intervals(probs, labels, lambda p, y: {"mean": float(p.mean())}, resamples=20000, seed=0,
                              method="percentile")
    ref = bootstrap((x,), np.mean, method="BCa", n_resamples=20000, random_state=0).confidence_interval
    lo, hi = ours["intervals"]["mean"]
    assert lo == pytest.approx(ref.low, abs=0.01) and hi == pytest.approx(ref.high, abs=0.015), (lo, hi, ref)
    assert pct["intervals"]["mean"][1] < hi - 0.005  # the skew moves BCa's upper end up: a real correction


def test_too_few_samples_give_no_interval_and_say_so():
    """One sample per class would give a zero-width interval: below eval.min_per_class none is formed, and the
    report's Markdown (the card's too) says so instead of printing one."""
    from medfound.evaluate.markdown import evaluation_sections

    y = np.array([0, 1, 1, 1])
    p = np.stack([1 - np.array([0.2, 0.7, 0.8, 0.4]), np.array([0.2, 0.7, 0.8, 0.4])], 1)

    def fn(pp, yy):
        return classification_metrics(pp, yy, "binary", ["a", "b"])["metrics"]

    boot = bootstrap_intervals(p, y, fn, resamples=50, seed=0, min_per_class=10)
    assert set(boot["intervals"].values()) == {None}
    assert boot["too_few"].startswith("too few samples for an interval: the smallest class has 1 sample(s)")
    report = {"task": "classification", "metrics": fn(p, y), "intervals": boot["intervals"],
              "bootstrap": {k: v for k, v in boot.items() if k != "intervals"}}
    text = "\n".join(evaluation_sections(report))
    assert "| auroc | 1.0000 | too few samples for an interval |" in text
    assert "No interval is shown: too few samples for an interval" in text
    assert bootstrap_intervals(p, y, fn, resamples=50, seed=0, min_per_class=1)["intervals"]["accuracy"] is not None


def test_an_eval_recipe_sets_the_interval_method_and_minimum():
    from medfound.config import EvalConfig

    assert EvalConfig().interval == "bca" and EvalConfig().min_per_class == 10
    assert EvalConfig(interval="percentile").interval == "percentile"
    with pytest.raises(ValueError):
        EvalConfig(interval="basic")
