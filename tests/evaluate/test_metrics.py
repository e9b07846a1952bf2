"""Metrics against scikit-learn as the reference, and the degenerate cases stated in the docs."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, cohen_kappa_score, roc_auc_score

from medfound.evaluate.metrics import classification_metrics


def _probs(n: int, k: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y]  # informative but imperfect
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return p.astype(np.float32), y


def test_binary_matches_sklearn():
    p, y = _probs(300, 2)
    m = classification_metrics(p, y, "binary", ["neg", "pos"])["metrics"]
    assert m["auroc"] == pytest.approx(roc_auc_score(y, p[:, 1]), abs=1e-6)
    assert m["accuracy"] == pytest.approx(float((p.argmax(1) == y).mean()))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p.argmax(1)))
    assert "kappa_quadratic" not in m


def test_ordinal_matches_sklearn_macro_ovr_and_quadratic_kappa():
    p, y = _probs(500, 5, seed=1)
    out = classification_metrics(p, y, "ordinal", [str(i) for i in range(5)])
    m = out["metrics"]
    assert m["auroc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"), abs=1e-6)
    assert m["kappa_quadratic"] == pytest.approx(cohen_kappa_score(y, p.argmax(1), weights="quadratic"), abs=1e-6)
    for c in range(5):
        assert out["per_class"][str(c)]["auroc"] == pytest.approx(roc_auc_score(y == c, p[:, c]), abs=1e-6)
        assert out["per_class"][str(c)]["n"] == int((y == c).sum())


def test_quadratic_kappa_golden_value():
    # confusion [[2,1],[0,2]] on two ordered grades: po=4/5, pe=(3*2+2*3)/25=12/25, kappa=(0.8-0.48)/0.52
    y = np.array([0, 0, 0, 1, 1])
    pred = np.array([0, 0, 1, 1, 1])
    p = np.eye(2, dtype=np.float32)[pred]
    m = classification_metrics(p, y, "ordinal", ["g0", "g1"])["metrics"]
    assert m["kappa_quadratic"] == pytest.approx((0.8 - 0.48) / 0.52, abs=1e-6)


def test_single_class_split_gives_null_auroc_and_a_warning():
    p, _ = _probs(20, 2)
    y = np.zeros(20, dtype=int)
    with pytest.warns(UserWarning, match="split 'external' holds a single class \\(neg\\)"):
        out = classification_metrics(p, y, "binary", ["neg", "pos"], split="external")
    assert out["metrics"]["auroc"] is None
    assert out["metrics"]["accuracy"] == pytest.approx(float((p.argmax(1) == 0).mean()))
    assert out["warnings"] and "external" in out["warnings"][0]


def test_absent_class_is_skipped_in_the_macro_average():
    p, y = _probs(400, 4, seed=2)
    keep = y != 3
    p, y = p[keep], y[keep]
    with pytest.warns(UserWarning, match=r"no samples of classes \['d'\]"):
        out = classification_metrics(p, y, "multiclass", ["a", "b", "c", "d"])
    expected = np.mean([roc_auc_score(y == c, p[:, c]) for c in range(3)])
    assert out["metrics"]["auroc"] == pytest.approx(expected, abs=1e-6)
    assert out["per_class"]["d"] == {"n": 0, "auroc": None, "auprc": None}


def test_shape_mismatch_is_explained():
    with pytest.raises(ValueError, match="3 model outputs but 2 classes"):
        classification_metrics(np.ones((4, 3)) / 3, np.zeros(4, int), "binary", ["a", "b"])


def test_binary_sensitivity_and_specificity_match_sklearn_recall():
    from sklearn.metrics import recall_score

    p, y = _probs(300, 2, seed=3)
    m = classification_metrics(p, y, "binary", ["neg", "pos"])["metrics"]
    assert m["sensitivity"] == pytest.approx(recall_score(y, p.argmax(1), pos_label=1))
    assert m["specificity"] == pytest.approx(recall_score(y, p.argmax(1), pos_label=0))


def test_multilabel_matches_sklearn_per_finding_and_macro():
    from sklearn.metrics import average_precision_score

    from medfound.evaluate.metrics import multilabel_metrics

    rng = np.random.default_rng(4)
    y = (rng.random((200, 3)) < [0.1, 0.4, 0.7]).astype(int)
    p = 1 / (1 + np.exp(-(rng.normal(size=(200, 3)) + 1.5 * (2 * y - 1))))
    out = multilabel_metrics(p, y, ["a", "b", "c"])
    for k, name in enumerate("abc"):
        assert out["per_class"][name]["auroc"] == pytest.approx(roc_auc_score(y[:, k], p[:, k]), abs=1e-6)
        assert out["per_class"][name]["auprc"] == pytest.approx(average_precision_score(y[:, k], p[:, k]), abs=1e-5)
        assert out["per_class"][name]["n"] == int(y[:, k].sum())
    assert out["metrics"]["auroc"] == pytest.approx(roc_auc_score(y, p, average="macro"), abs=1e-6)
    assert out["metrics"]["label_accuracy"] == pytest.approx(float(((p > 0.5) == y).mean()))


def test_multilabel_finding_without_positives_is_null_and_named():
    from medfound.evaluate.metrics import multilabel_metrics

    y = np.array([[1, 0], [0, 0], [1, 0]])
    p = np.array([[0.9, 0.2], [0.1, 0.3], [0.8, 0.1]])
    with pytest.warns(UserWarning, match=r"\['hernia'\]"):
        out = multilabel_metrics(p, y, ["effusion", "hernia"])
    assert out["per_class"]["hernia"]["auroc"] is None and out["metrics"]["auroc"] == 1.0


def test_units_combine_views_by_mean_or_max_and_take_the_highest_label():
    from medfound.evaluate.metrics import aggregate_units

    probs = np.array([[0.8, 0.2], [0.4, 0.6], [0.9, 0.1], [0.7, 0.3]])
    labels = np.array([0, 1, 0, 0])
    units = [("p1", "L"), ("p1", "L"), ("p1", "R"), ("p1", "R")]
    p, y, ids = aggregate_units(probs, labels, units, "mean")
    np.testing.assert_allclose(p, [[0.6, 0.4], [0.8, 0.2]])
    assert y.tolist() == [1, 0] and ids == [("p1", "L"), ("p1", "R")]
    p, _, _ = aggregate_units(probs, labels, units, "max")
    np.testing.assert_allclose(p, [[0.8 / 1.4, 0.6 / 1.4], [0.9 / 1.2, 0.3 / 1.2]])
    hot = np.array([[1, 0], [0, 0], [0, 1], [0, 0]])
    _, y, _ = aggregate_units(probs, hot, units, "max")
    assert y.tolist() == [[1, 0], [0, 1]]


def test_auprc_matches_sklearn_binary_and_macro_one_vs_rest():
    from sklearn.metrics import average_precision_score

    p, y = _probs(300, 2, seed=4)
    m = classification_metrics(p, y, "binary", ["neg", "pos"])["metrics"]
    assert m["auprc"] == pytest.approx(average_precision_score(y, p[:, 1]), abs=1e-6)
    p, y = _probs(400, 4, seed=5)
    out = classification_metrics(p, y, "multiclass", list("abcd"))
    per = [average_precision_score(y == c, p[:, c]) for c in range(4)]
    assert out["metrics"]["auprc"] == pytest.approx(np.mean(per), abs=1e-6)
    assert out["per_class"]["c"]["auprc"] == pytest.approx(per[2], abs=1e-6)


def test_sensitivity_at_fixed_specificity_golden():
    # 10 negatives (one of them scored 0.90) and 5 positives, worked by hand
    neg = np.array([0.05, 0.10, 0.15, 0.20, 0.25, 0.30, 0.35, 0.40, 0.45, 0.90])
    pos = np.array([0.50, 0.60, 0.70, 0.80, 0.95])
    s = np.concatenate([neg, pos])
    y = np.array([0] * 10 + [1] * 5)
    p = np.stack([1 - s, s], 1).astype(np.float32)
    out = classification_metrics(p, y, "binary", ["neg", "pos"], specificity=0.9)
    # threshold 0.5 keeps 9/10 negatives below (spec 0.9) and all 5 positives above -> sensitivity 1.0
    assert out["metrics"]["sens_at_spec"] == pytest.approx(1.0)
    assert out["operating_point"] == {"specificity_target": 0.9, "threshold": pytest.approx(0.5), "positive_class": "pos"}
    out = classification_metrics(p, y, "binary", ["neg", "pos"], specificity=0.95)
    # specificity 1.0 needs a threshold above 0.90: only 0.95 is caught -> 1/5
    assert out["metrics"]["sens_at_spec"] == pytest.approx(0.2)


def test_ece_matches_torchmetrics_and_the_bins_add_up():
    import torch
    from torchmetrics.functional.classification import binary_calibration_error, multiclass_calibration_error

    from medfound.evaluate.metrics import calibration

    p, y = _probs(500, 2, seed=6)
    m = classification_metrics(p, y, "binary", ["neg", "pos"])["metrics"]
    ref = binary_calibration_error(torch.tensor(p[:, 1]), torch.tensor(y), n_bins=15)
    assert m["ece"] == pytest.approx(float(ref), abs=1e-5)
    p, y = _probs(500, 5, seed=7)
    m = classification_metrics(p, y, "ordinal", list("abcde"))["metrics"]
    ref = multiclass_calibration_error(torch.tensor(p), torch.tensor(y), num_classes=5, n_bins=15)
    assert m["ece"] == pytest.approx(float(ref), abs=1e-5)
    cal = calibration(p, y, "ordinal")
    assert sum(b["n"] for b in cal["bins"]) == 500 and cal["kind"] == "top-label confidence"
    assert all(b["lo"] <= b["predicted"] <= b["hi"] for b in cal["bins"])
    # perfectly calibrated by construction: outcomes drawn at the predicted probability -> small ECE
    rng = np.random.default_rng(0)
    q = rng.uniform(size=20000)
    yy = (rng.uniform(size=20000) < q).astype(int)
    assert calibration(np.stack([1 - q, q], 1), yy, "binary")["ece"] < 0.02


def test_per_site_results_carry_their_own_intervals():
    from medfound.evaluate.markdown import site_table
    from medfound.evaluate.metrics import score_with_sites

    p, y = _probs(300, 2, seed=8)
    sites = ["A"] * 150 + ["B"] * 100 + [None] * 50
    result, by_site = score_with_sites(p, y, sites, "binary", ["neg", "pos"], "test", resamples=200, seed=1)
    assert set(by_site) == {"A", "B"} and by_site["A"]["n"] == 150 and by_site["B"]["n"] == 100
    assert by_site["A"]["auroc"] == pytest.approx(roc_auc_score(y[:150], p[:150, 1]), abs=1e-6)
    for site in ("A", "B"):
        lo, hi = by_site[site]["intervals"]["auroc"]
        assert lo <= by_site[site]["auroc"] <= hi
    # the smaller site has the wider interval
    width = {s: np.diff(by_site[s]["intervals"]["auroc"])[0] for s in by_site}
    assert width["B"] > width["A"] * 0.9
    rows = site_table(by_site, ["auroc"])
    assert rows[2].startswith(f"| A | 150 | {by_site['A']['auroc']:.4f} (")
    assert result["calibration"]["bins"]


def test_sensitivity_at_specificity_matches_the_full_sklearn_roc_curve_with_ties():
    from sklearn.metrics import roc_curve

    from medfound.evaluate.metrics import sensitivity_at_specificity

    rng = np.random.default_rng(9)
    for _ in range(100):
        n = int(rng.integers(6, 150))
        y = np.r_[0, 1, rng.integers(0, 2, n - 2)]
        s = np.round(rng.uniform(size=n), 2)  # many tied scores
        fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
        for target in (0.5, 0.9, 0.95):
            sens, thr = sensitivity_at_specificity(s, y, target)
            assert sens == pytest.approx(tpr[fpr <= 1 - target + 1e-12].max())
            if sens > 0:  # the threshold reproduces the operating point
                assert (s[y == 1] >= thr).mean() == pytest.approx(sens)
                assert (s[y == 0] < thr).mean() >= target - 1e-12
