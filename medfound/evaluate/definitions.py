"""What each metric means, registered in `medfound.registry.METRICS` (torch-free: `medfound ls metrics` and the
card's model-index read it without importing torch; the computations are in metrics.py and segmentation.py)."""

from __future__ import annotations

from medfound.registry import METRICS

DEFINITIONS = {
    "auroc": "binary: AUROC of the positive class; multi-class/ordinal: macro mean of one-vs-rest AUROCs over "
             "classes present in the split (null when fewer than two classes are present)",
    "accuracy": "top-1 accuracy over all samples",
    "balanced_accuracy": "mean per-class recall over classes present in the split",
    "sensitivity": "binary: recall of the positive class (eval.json positive_class: head.positive_class, by default "
                   "the second class name) at the argmax decision (p > 0.5)",
    "specificity": "binary: recall of the negative class at the argmax decision (p > 0.5)",
    "kappa_quadratic": "Cohen's kappa with quadratic weights (ordinal grades only)",
    "auprc": "multi-label: macro mean over findings of the average precision (area under the precision-recall curve)",
    "label_accuracy": "multi-label: share of (sample, finding) pairs right at probability threshold 0.5",
    "sens_at_spec": "binary: highest sensitivity at a threshold whose specificity is >= the target (eval.specificity)",
    "ece": "expected calibration error, 15 equal-width bins (binary/multi-label: positive probability vs observed "
           "frequency; multi-class/ordinal: top-label confidence vs accuracy)",
}
HUB_METRIC_TYPES = {"auroc": "roc_auc", "accuracy": "accuracy", "balanced_accuracy": "balanced_accuracy",
                    "kappa_quadratic": "cohen_kappa", "auprc": "average_precision", "ece": "expected_calibration_error",
                    "sens_at_spec": "sensitivity_at_specificity"}
for _name, _text in DEFINITIONS.items():  # the registry `medfound ls` and the card's model-index read
    METRICS.register(_name, description=_text, hub_type=HUB_METRIC_TYPES.get(_name, _name))
METRICS.register("dice", description="segmentation: 2|P∩G|/(|P|+|G|) per image and class (nnU-Net's empty-mask "
                                     "convention, evaluate/segmentation.py)", hub_type="dice")
METRICS.register("hd95", description="segmentation: 95th percentile symmetric Hausdorff distance (MONAI)",
                 hub_type="hd95")
METRICS.register("dice_by_structure_mean", description="box prompts: mean over structures of their mean Dice",
                 hub_type="dice")


def hub_metric_type(name: str) -> str:
    """The Hugging Face model-index `metric_type` of a metric (its own name when it has no standard one)."""
    return METRICS.get(name).extra["hub_type"] if name in METRICS else name
