"""Classification metrics, thin over torchmetrics, with the conventions stated.

- AUROC: binary -> the positive class's probability; multi-class and ordinal -> macro average of
  one-vs-rest AUROCs over the classes present in the split (MedMNIST's convention). A class absent
  from the split has no AUROC (reported as null, with a warning); a split with a single class has
  no AUROC at all (null and a warning naming the split), never a crash.
- accuracy: top-1 over all samples. balanced_accuracy: mean per-class recall over present classes.
- kappa_quadratic: Cohen's kappa with quadratic weights, reported for ordinal labels (diabetic
  retinopathy grades), where a grade-4 called grade-3 is a smaller error than grade-4 called grade-0.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import numpy as np
import torch
from torchmetrics.functional.classification import binary_auroc, multiclass_accuracy, multiclass_cohen_kappa

DEFINITIONS = {
    "auroc": "binary: AUROC of the positive class; multi-class/ordinal: macro mean of one-vs-rest AUROCs over "
             "classes present in the split (null when fewer than two classes are present)",
    "accuracy": "top-1 accuracy over all samples",
    "balanced_accuracy": "mean per-class recall over classes present in the split",
    "kappa_quadratic": "Cohen's kappa with quadratic weights (ordinal grades only)",
}


def _nan_to_none(v: float) -> Optional[float]:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def classification_metrics(probs: np.ndarray, labels: np.ndarray, label_type: str, class_names: list[str],
                           split: str = "test") -> dict[str, Any]:
    """Metrics for predicted class probabilities `probs` `[N, K]` against integer `labels` `[N]`.

    Returns {"metrics": {...}, "per_class": {name: {"auroc", "n"}}, "warnings": [...]}, NaNs as None.
    """
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
        auc = float("nan")
        if 0 < count < n:
            auc = float(binary_auroc(probs_t[:, c], (y == c).long()))
        per_class[name] = {"n": count, "auroc": _nan_to_none(auc)}
    if len(present) < 2:
        only = ", ".join(class_names[c] for c in present) or "none"
        msg = f"split '{split}' holds a single class ({only}): AUROC is undefined and reported as null"
        warnings.warn(msg, stacklevel=2)
        notes.append(msg)
        auroc = float("nan")
    elif k == 2:
        auroc = float(binary_auroc(probs_t[:, 1], y))
    else:
        missing = [class_names[c] for c in range(k) if c not in present]
        if missing:
            msg = f"split '{split}' has no samples of classes {missing}: macro AUROC averages the other classes"
            warnings.warn(msg, stacklevel=2)
            notes.append(msg)
        auroc = float(np.mean([per_class[class_names[c]]["auroc"] for c in present]))
    pred = probs_t.argmax(dim=1)
    metrics: dict[str, Any] = {
        "auroc": _nan_to_none(auroc),
        "accuracy": float(multiclass_accuracy(pred, y, num_classes=k, average="micro")) if k > 2 else
        float((pred == y).float().mean()),
        "balanced_accuracy": float(np.mean([float((pred[y == c] == c).float().mean()) for c in present])),
    }
    if label_type == "ordinal":
        metrics["kappa_quadratic"] = _nan_to_none(float(multiclass_cohen_kappa(pred, y, num_classes=k,
                                                                                weights="quadratic")))
    return {"metrics": metrics, "per_class": per_class, "warnings": notes}
