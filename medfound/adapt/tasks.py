"""Tasks: backbone + head + loss as one nn.Module, `forward(batch) -> {"loss", ...}`.

The training loop knows nothing about classification; it calls the task and backpropagates
`out["loss"]`. Evaluation reads `out["logits"]`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from medfound.adapt.heads import attach_classifier
from medfound.adapt.tuning import apply_tuning
from medfound.backbones import create_backbone
from medfound.config import FinetuneRecipe
from medfound.data.manifest import LabelSchema


class ClassificationTask(nn.Module):
    """Single-label classification (binary, multi-class, ordinal grades) with cross-entropy.

    Args:
        model: a timm model whose classifier outputs `[B, K]` logits (possibly wrapped by peft).
        classifier: the classifier's module name (for tuning and export).
        label_schema: class names and type, carried into the export and the card.
        label_smoothing: cross-entropy label smoothing (RETFound fine-tunes with 0.1).
    """

    def __init__(self, model: nn.Module, classifier: str, label_schema: LabelSchema, label_smoothing: float = 0.0):
        super().__init__()
        self.model = model
        self.classifier = classifier
        self.label_schema = label_schema
        self.label_smoothing = label_smoothing

    def forward(self, batch: dict) -> dict:
        """batch["image"] `[B, 3, H, W]`, optional batch["label"] `[B]` -> {"logits": `[B, K]`, "loss"?}."""
        logits = self.model(batch["image"])
        out = {"logits": logits}
        if "label" in batch:
            out["loss"] = F.cross_entropy(logits.float(), batch["label"], label_smoothing=self.label_smoothing)
            with torch.no_grad():
                out["accuracy"] = (logits.argmax(-1) == batch["label"]).float().mean()
        return out


def build_task(recipe: FinetuneRecipe, label_schema: LabelSchema) -> ClassificationTask:
    """The task module a finetune recipe describes: backbone (+ weights) -> classifier -> tuning."""
    if label_schema.type == "none":
        raise ValueError(f"shard set {recipe.data.shards[0]} is unlabelled; fine-tuning needs labels")
    model = create_backbone(recipe.backbone, num_classes=0)
    classifier = attach_classifier(model, label_schema.num_classes, pool=recipe.head.pool, dropout=recipe.head.dropout)
    model = apply_tuning(model, recipe.tuning, classifier, recipe.lora)
    return ClassificationTask(model, classifier, label_schema, recipe.head.label_smoothing)
