"""Classification metrics, thin over torchmetrics, with the conventions stated.

- AUROC: binary -> the positive class's probability; multi-class and ordinal -> macro average of
  one-vs-rest AUROCs over the classes present in the split (MedMNIST's convention). A class absent
  from the split has no AUROC (reported as null, with a warning); a split with a single class has
  no AUROC at all (null and a warning naming the split), never a crash.
- accuracy: top-1 over all samples. balanced_accuracy: mean per-class recall over present classes.
- kappa_quadratic: Cohen's kappa with quadratic weights, reported for ordinal labels (diabetic
  retinopathy grades), where a grade-4 called grade-3 is a smaller error than grade-4 called grade-0.
- multi-label findings (CheXNet): a sigmoid probability per finding; AUROC and average precision per finding,
  their macro means over findings with both positives and negatives in the split, and label-wise accuracy at 0.5.
- auprc: average precision (area under the precision-recall curve); binary -> the positive class, multi-class ->
  macro mean of one-vs-rest values over the classes present.
- sens_at_spec: binary: the highest sensitivity among thresholds whose specificity is at least the target
  (`eval.specificity`, default 0.90), read off the ROC curve; the threshold is reported beside it.
- ece: expected calibration error over 15 equal-width probability bins, sum_b n_b/N |observed_b - predicted_b|.
  Binary and multi-label: the predicted probability of the positive class (finding) against the observed
  frequency; multi-class and ordinal: the top-label confidence against accuracy (Guo et al. 2017).
  `calibration()` gives the bins themselves (the reliability diagram).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import numpy as np
import torch
from torchmetrics.functional.classification import binary_auroc, multiclass_accuracy, multiclass_cohen_kappa

from medfound.evaluate.definitions import DEFINITIONS, HUB_METRIC_TYPES, hub_metric_type  # noqa: F401
from medfound.evaluate.bootstrap import bootstrap_intervals

AUPRC_SINGLE = ("binary: average precision of the positive class; multi-class/ordinal: macro mean of one-vs-rest "
                "average precision over classes present in the split")
CALIBRATION_BINS = 15


def positive_index(class_names: list[str], positive_class: Optional[str]) -> int:
    """The column of the positive class of a binary task: `head.positive_class` by name, else the second name
    (BreastMNIST's malignant is the first name: set head.positive_class=malignant)."""
    if positive_class is None:
        return 1
    if len(class_names) != 2:
        raise ValueError(f"head.positive_class={positive_class!r} applies to binary tasks; this one has "
                         f"{len(class_names)} classes {class_names}: remove it (or set head.binary_threshold)")
    if positive_class not in class_names:
        raise ValueError(f"head.positive_class={positive_class!r} is not a class name; the classes are "
                         f"{class_names}: set it to one of them")
    return class_names.index(positive_class)


def calibration(probs: np.ndarray, labels: np.ndarray, label_type: str, n_bins: int = CALIBRATION_BINS,
                positive: int = 1) -> dict[str, Any]:
    """Reliability-diagram bins and the ECE they give (definitions above).

    Returns {"ece", "kind", "bins": [{"lo", "hi", "n", "predicted", "observed"}]} (empty bins left out)."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels)
    if label_type == "multilabel":
        conf, hit, kind = p.ravel(), (y > 0.5).ravel().astype(float), "positive probability (every finding)"
    elif p.shape[1] == 2:
        conf, hit, kind = p[:, positive], (y == positive).astype(float), "positive probability"
    else:
        conf, hit, kind = p.max(1), (p.argmax(1) == y).astype(float), "top-label confidence"
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)  # bins (lo, hi], first [0, hi]
    bins, ece = [], 0.0
    for b in range(n_bins):
        sel = which == b
        if not sel.any():
            continue
        pred, obs = float(conf[sel].mean()), float(hit[sel].mean())
        ece += sel.sum() / len(conf) * abs(obs - pred)
        bins.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": int(sel.sum()), "predicted": pred,
                     "observed": obs})
    return {"ece": float(ece), "kind": kind, "bins": bins}


def sensitivity_at_specificity(scores: np.ndarray, y: np.ndarray, target: float) -> tuple[float, float]:
    """(highest sensitivity with specificity >= target, its threshold: predict positive when score >= it) of
    positive-class scores; the ROC curve's points at every distinct score (numpy: this runs in every bootstrap
    resample). No threshold reaches the target -> (0.0, 1.0)."""
    scores, y = np.asarray(scores, dtype=np.float64), np.asarray(y).astype(bool)
    order = np.argsort(-scores, kind="mergesort")
    s, t = scores[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last sample of each distinct score
    tps = np.cumsum(t)[last]
    fps = last + 1 - tps
    ok = np.flatnonzero(fps <= (1.0 - target) * (~y).sum() + 1e-9)
    if len(ok) == 0:
        return 0.0, 1.0
    i = ok[-1]  # TPR only grows with FPR: the last admissible point has the highest sensitivity
    return float(tps[i] / max(y.sum(), 1)), float(min(s[last[i]], 1.0))


def _nan_to_none(v: float) -> Optional[float]:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def classification_metrics(probs: np.ndarray, labels: np.ndarray, label_type: str, class_names: list[str],
                           split: str = "test", specificity: float = 0.9, positive: int = 1) -> dict[str, Any]:
    """Metrics for predicted class probabilities `probs` `[N, K]` against integer `labels` `[N]`; binary tasks
    score column `positive` as the positive class (`positive_index`).

    Returns {"metrics": {...}, "per_class": {name: {"n", "auroc", "auprc"}}, "warnings": [...]}, NaNs as None;
    binary splits with both classes also get "operating_point" (the sens_at_spec threshold).
    """
    from torchmetrics.functional.classification import binary_average_precision

    probs_t = torch.as_tensor(np.asarray(probs), dtype=torch.float32)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    n, k = probs_t.shape
    if len(y) != n:
        raise ValueError(f"{n} predictions but {len(y)} labels")
    if k != len(class_names):
        raise ValueError(f"{k} model outputs but {len(class_names)} classes {class_names}")
    notes: list[str] = []
    present = sorted(int(c) for c in torch.unique(y))
    per_class: dict[str, dict[str, Any]] = {}
    for c, name in enumerate(class_names):
        count = int((y == c).sum())
        auc = ap = float("nan")
        if 0 < count < n:
            auc = float(binary_auroc(probs_t[:, c], (y == c).long()))
            ap = float(binary_average_precision(probs_t[:, c], (y == c).long()))
        per_class[name] = {"n": count, "auroc": _nan_to_none(auc), "auprc": _nan_to_none(ap)}
    if len(present) < 2:
        only = ", ".join(class_names[c] for c in present) or "none"
        msg = f"split '{split}' holds a single class ({only}): AUROC is undefined and reported as null"
        warnings.warn(msg, stacklevel=2)
        notes.append(msg)
        auroc = auprc = float("nan")
    elif k == 2:
        auroc = float(binary_auroc(probs_t[:, positive], (y == positive).long()))
        auprc = per_class[class_names[positive]]["auprc"]
    else:
        missing = [class_names[c] for c in range(k) if c not in present]
        if missing:
            msg = f"split '{split}' has no samples of classes {missing}: macro AUROC averages the other classes"
            warnings.warn(msg, stacklevel=2)
            notes.append(msg)
        auroc = float(np.mean([per_class[class_names[c]]["auroc"] for c in present]))
        auprc = float(np.mean([per_class[class_names[c]]["auprc"] for c in present]))
    pred = probs_t.argmax(dim=1)
    metrics: dict[str, Any] = {
        "auroc": _nan_to_none(auroc),
        "accuracy": float(multiclass_accuracy(pred, y, num_classes=k, average="micro")) if k > 2 else
        float((pred == y).float().mean()),
        "balanced_accuracy": float(np.mean([float((pred[y == c] == c).float().mean()) for c in present])),
        "auprc": _nan_to_none(auprc),
    }
    out: dict[str, Any] = {}
    if k == 2 and len(present) == 2:
        pos = y == positive
        metrics["sensitivity"] = float((pred[pos] == positive).float().mean())
        metrics["specificity"] = float((pred[~pos] != positive).float().mean())
        sens, thr = sensitivity_at_specificity(probs_t[:, positive].numpy(), pos.long().numpy(), specificity)
        metrics["sens_at_spec"] = sens
        out["operating_point"] = {"specificity_target": specificity, "threshold": thr,
                                  "positive_class": class_names[positive]}
    if label_type == "ordinal":
        metrics["kappa_quadratic"] = _nan_to_none(float(multiclass_cohen_kappa(pred, y, num_classes=k,
                                                                                weights="quadratic")))
    metrics["ece"] = calibration(probs_t.numpy(), y.numpy(), label_type, positive=positive)["ece"]
    return {"metrics": metrics, "per_class": per_class, "warnings": notes, **out}


def multilabel_metrics(probs: np.ndarray, labels: np.ndarray, class_names: list[str], split: str = "test"
                       ) -> dict[str, Any]:
    """Metrics for sigmoid probabilities `probs` `[N, K]` against multi-hot `labels` `[N, K]` (one finding per
    column). A finding without both positives and negatives in the split has no AUROC (null, with a warning)."""
    from torchmetrics.functional.classification import binary_average_precision

    p = torch.as_tensor(np.asarray(probs), dtype=torch.float32)
    y = torch.as_tensor(np.asarray(labels)).float()
    if p.shape != y.shape:
        raise ValueError(f"predictions {tuple(p.shape)} and labels {tuple(y.shape)} differ in shape")
    if p.shape[1] != len(class_names):
        raise ValueError(f"{p.shape[1]} model outputs but {len(class_names)} findings {class_names}")
    notes, per_class, aucs, aps = [], {}, [], []
    for k, name in enumerate(class_names):
        pos = int(y[:, k].sum())
        auc = ap = float("nan")
        if 0 < pos < len(y):
            auc = float(binary_auroc(p[:, k], y[:, k].long()))
            ap = float(binary_average_precision(p[:, k], y[:, k].long()))
            aucs.append(auc)
            aps.append(ap)
        per_class[name] = {"n": pos, "auroc": _nan_to_none(auc), "auprc": _nan_to_none(ap)}
    missing = [n for n in class_names if per_class[n]["auroc"] is None]
    if missing:
        msg = (f"split '{split}': findings {missing} lack positives or negatives, so they have no AUROC and are left "
               "out of the macro means")
        warnings.warn(msg, stacklevel=2)
        notes.append(msg)
    metrics = {"auroc": _nan_to_none(float(np.mean(aucs)) if aucs else float("nan")),
               "auprc": _nan_to_none(float(np.mean(aps)) if aps else float("nan")),
               "label_accuracy": float(((p > 0.5) == (y > 0.5)).float().mean()),
               "ece": calibration(p.numpy(), y.numpy(), "multilabel")["ece"]}
    return {"metrics": metrics, "per_class": per_class, "warnings": notes}


def aggregate_units(probs: np.ndarray, labels: np.ndarray, units: list[tuple], reduce: str = "mean"
                    ) -> tuple[np.ndarray, np.ndarray, list[tuple]]:
    """Combine image predictions into unit predictions (a breast from its CC and MLO views, McKinney et al. 2020).

    probs `[N, K]`, labels `[N]` (or multi-hot `[N, K]`), units: one hashable id per image. A unit's probability is
    the mean or the max of its images' (max: per class, renormalised to sum 1 for single-label); its label is the
    highest of its images' labels (a breast with a cancer in either view is a positive breast).
    Returns (unit probs `[U, K]`, unit labels, unit ids in first-seen order).
    """
    if reduce not in ("mean", "max"):
        raise ValueError(f"reduce={reduce!r}: choose mean or max")
    order: dict[tuple, list[int]] = {}
    for i, u in enumerate(units):
        order.setdefault(u, []).append(i)
    multilabel = labels.ndim == 2
    p_out, y_out = [], []
    for idx in order.values():
        p = probs[idx]
        q = p.mean(0) if reduce == "mean" else p.max(0)
        if reduce == "max" and not multilabel:
            q = q / q.sum()
        p_out.append(q)
        y_out.append(labels[idx].max(0))
    return np.stack(p_out), np.stack(y_out), list(order)


def metric_definitions(metrics: dict[str, Any], label_type: str) -> dict[str, str]:
    """The definitions of the metrics present, for eval.json and the card."""
    out = {k: v for k, v in DEFINITIONS.items() if k in metrics}
    if "auprc" in out and label_type != "multilabel":
        out["auprc"] = AUPRC_SINGLE
    return out


def score_with_sites(probs: np.ndarray, labels: np.ndarray, sites: list, label_type: str, class_names: list[str],
                     split: str, resamples: int = 0, seed: int = 0, specificity: float = 0.9,
                     keep_values: bool = False, interval: str = "bca", min_per_class: int = 0, positive: int = 1
                     ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(metrics of the whole split, {site: {"n", metrics..., "intervals"}}) for single-label or multi-label
    predictions; sites holds one entry (or None) per sample. With `resamples` > 0 the split's result holds
    "bootstrap" (95% stratified bootstrap intervals of every metric, evaluate/bootstrap.py; `keep_values` keeps the
    resample values) and every site gets its own "intervals"."""
    def score(p, y, name):
        if label_type == "multilabel":
            return multilabel_metrics(p, y, class_names, split=name)
        return classification_metrics(p, y, label_type, class_names, split=name, specificity=specificity,
                                      positive=positive)

    by_site = {}
    for site in sorted({s for s in sites if s}):
        idx = np.array([s == site for s in sites])
        by_site[site] = {"n": int(idx.sum()), **score(probs[idx], labels[idx], f"{split}/{site}")["metrics"]}
        if resamples:
            boot = bootstrap_intervals(probs[idx], labels[idx],
                                       lambda p, y, n=f"{split}/{site}": score(p, y, n)["metrics"], resamples, seed,
                                       method=interval, min_per_class=min_per_class)
            by_site[site]["intervals"] = boot["intervals"]
            if "too_few" in boot:
                by_site[site]["too_few"] = boot["too_few"]
    result = score(probs, labels, split)
    if resamples:
        result["bootstrap"] = bootstrap_intervals(probs, labels, lambda p, y: score(p, y, split)["metrics"],
                                                  resamples, seed, keep_values=keep_values, method=interval,
                                                  min_per_class=min_per_class)
    result["calibration"] = calibration(probs, labels, label_type, positive=positive)
    if label_type != "multilabel" and len(class_names) == 2:
        result["positive_class"] = class_names[positive]
    return result, by_site
