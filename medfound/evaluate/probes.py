"""Frozen-feature probes and the metrics they are scored by, shared by `medfound bench` (medfound/bench) and the
representation monitor of pretraining (medfound/run/monitor.py): weighted k-NN (DINO), SimpleShot prototypes, a
logistic-regression probe on standardised features, and fast metric functions with medfound's definitions (binary
AUROC of the positive class; multi-class and ordinal: the macro mean of one-vs-rest AUROCs over the classes present;
quadratic kappa; balanced accuracy over classes present)."""

from __future__ import annotations

import warnings
from typing import Optional

import numpy as np


def l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_probs(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, num_classes: int, k: int = 20,
              temperature: float = 0.07, chunk: int = 1024) -> np.ndarray:
    """Weighted k-NN (DINO's eval_knn): cosine similarity on L2-normalised features, each of the k nearest training
    samples votes for its class with weight exp(sim / T); probabilities are the normalised votes. `[N, K]`."""
    a, b = l2(train_x), l2(test_x)
    k = min(k, len(a))
    out = np.zeros((len(b), num_classes))
    for start in range(0, len(b), chunk):
        sims = b[start:start + chunk] @ a.T
        idx = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        near = np.take_along_axis(sims, idx, axis=1)
        weights = np.exp((near - near.max(axis=1, keepdims=True)) / temperature)  # stable: a shift per row
        votes = np.zeros((len(idx), num_classes))
        np.add.at(votes, (np.repeat(np.arange(len(idx)), k), train_y[idx].ravel()), weights.ravel())
        out[start:start + chunk] = votes / votes.sum(axis=1, keepdims=True)
    return out


def simpleshot_probs(support_x: np.ndarray, support_y: np.ndarray, test_x: np.ndarray, num_classes: int
                     ) -> np.ndarray:
    """SimpleShot's CL2N nearest prototype (Wang et al. 2019): centre on the support mean, L2-normalise, one
    prototype (mean) per class; probabilities are a softmax over negative squared distances. `[N, K]`."""
    mu = support_x.mean(axis=0, keepdims=True)
    s, t = l2(support_x - mu), l2(test_x - mu)
    protos = np.stack([s[support_y == c].mean(axis=0) for c in range(num_classes)])
    d2 = ((t[:, None, :] - protos[None]) ** 2).sum(-1)
    logits = -d2
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def logistic_probs(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, num_classes: int, c: float,
                   max_iter: int = 1000) -> np.ndarray:
    """Logistic regression (L-BFGS, L2 penalty 1/C) on features standardised with the training set's statistics;
    `[N, K]` with a column for every class, also those the training subset lacks (probability 0)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    clf = LogisticRegression(C=c, max_iter=max_iter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(scaler.transform(train_x), train_y)
    p = clf.predict_proba(scaler.transform(test_x))
    out = np.zeros((len(test_x), num_classes))
    out[:, clf.classes_] = p
    return out


def auroc(truth: np.ndarray, scores: np.ndarray) -> float:
    """AUROC as the Mann-Whitney statistic with average ranks for ties (equal to scikit-learn's roc_auc_score, at a
    fraction of its cost: the bootstrap calls it hundreds of thousands of times)."""
    from scipy.stats import rankdata

    truth = np.asarray(truth, bool)
    n_pos = int(truth.sum())
    n_neg = len(truth) - n_pos
    ranks = rankdata(scores)
    return float((ranks[truth].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def metric_value(metric: str, probs: np.ndarray, labels: np.ndarray, label_type: str, positive: int = 1
                 ) -> Optional[float]:
    """One metric of predicted probabilities `[N, K]` against integer labels `[N]`; None when undefined."""
    from sklearn.metrics import cohen_kappa_score

    labels = np.asarray(labels)
    present = np.unique(labels)
    k = probs.shape[1]
    if metric == "auroc":
        if len(present) < 2:
            return None
        if k == 2:
            return auroc(labels == positive, probs[:, positive])
        return float(np.mean([auroc(labels == c, probs[:, c]) for c in present]))
    pred = probs.argmax(axis=1)
    if metric == "accuracy":
        return float((pred == labels).mean())
    if metric == "balanced_accuracy":
        return float(np.mean([(pred[labels == c] == c).mean() for c in present]))
    if metric == "kappa_quadratic":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            v = cohen_kappa_score(labels, pred, weights="quadratic", labels=list(range(k)))
        return None if np.isnan(v) else float(v)
    raise ValueError(f"unknown bench metric {metric!r}")
