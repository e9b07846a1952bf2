"""Tasks: backbone + head + loss as one nn.Module, `forward(batch) -> {"loss", ...}`.

The training loop knows nothing about classification or segmentation; it calls the task and backpropagates
`out["loss"]`. Evaluation reads `out["logits"]`. `param_groups` gives full fine-tuning layer-wise lr decay.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from medfound.adapt.heads import attach_classifier
from medfound.adapt.tuning import apply_tuning, tune_segmenter
from medfound.backbones import create_backbone
from medfound.config import FinetuneRecipe, OptimConfig, SegmentConfig
from medfound.data.manifest import LabelSchema


def _groups(module: nn.Module, vit: nn.Module | None, cfg: OptimConfig, full: bool) -> list[dict]:
    """AdamW groups: with full fine-tuning and `optim.layer_decay`, the ViT's blocks get layer-wise lr decay
    (BEiT; timm's param_groups_layer_decay) and the head the full lr; otherwise plain weight-decay groups."""
    from timm.optim import param_groups_weight_decay

    from medfound.train.optim import no_weight_decay_names, vit_param_groups

    if vit is None or not full or (cfg.layer_decay is None and cfg.patch_embed_lr_mult == 1.0):
        return param_groups_weight_decay(module, cfg.weight_decay, no_weight_decay_list=no_weight_decay_names(module))
    groups = vit_param_groups(vit, cfg)
    inside = {id(p) for p in vit.parameters()}
    rest = nn.ParameterList([p for p in module.parameters() if id(p) not in inside and p.requires_grad])
    return groups + [{**g, "lr_scale": 1.0} for g in param_groups_weight_decay(rest, cfg.weight_decay)]


class ClassificationTask(nn.Module):
    """Single-label classification (binary, multi-class, ordinal grades) with cross-entropy.

    Args:
        model: a timm model whose classifier outputs `[B, K]` logits (possibly wrapped by peft).
        classifier: the classifier's module name (for tuning and export).
        label_schema: class names and type, carried into the export and the card.
        label_smoothing: cross-entropy label smoothing (RETFound fine-tunes with 0.1).
    """

    def __init__(self, model: nn.Module, classifier: str, label_schema: LabelSchema, label_smoothing: float = 0.0,
                 full: bool = False):
        super().__init__()
        self.model = model
        self.classifier = classifier
        self.label_schema = label_schema
        self.label_smoothing = label_smoothing
        self.full = full

    def param_groups(self, cfg: OptimConfig) -> list[dict]:
        """Layer-wise lr decay over the backbone under full fine-tuning (timm puts the classifier last)."""
        from medfound.train.optim import vit_param_groups

        if self.full and (cfg.layer_decay is not None or cfg.patch_embed_lr_mult != 1.0):
            return vit_param_groups(self.model, cfg)
        return _groups(self, None, cfg, False)

    def forward(self, batch: dict) -> dict:
        """batch["image"] `[B, 3, H, W]`, optional batch["label"] `[B]` -> {"logits": `[B, K]`, "loss"?}."""
        logits = self.model(batch["image"])
        out = {"logits": logits}
        if "label" in batch:
            out["loss"] = F.cross_entropy(logits.float(), batch["label"], label_smoothing=self.label_smoothing)
            with torch.no_grad():
                out["accuracy"] = (logits.argmax(-1) == batch["label"]).float().mean()
        return out


class SegmentationTask(nn.Module):
    """Semantic segmentation with Dice + cross-entropy (MONAI `DiceCELoss`, softmax over K classes).

    Args:
        segmenter: `[B, C, *S]` -> logits `[B, K, *S]` (medfound.adapt.heads.segment.Segmenter).
        segment: the recipe's segment section (classes, loss weights).
        full: full fine-tuning (enables layer-wise lr decay over the ViT backbone).
    """

    def __init__(self, segmenter: nn.Module, segment: SegmentConfig, full: bool = False):
        super().__init__()
        from monai.losses import DiceCELoss

        self.model = segmenter
        self.segment = segment
        self.full = full
        # batch=True: Dice over the whole batch, so a crop without foreground does not give a 0/0 term
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True,
                               lambda_dice=segment.dice_weight, lambda_ce=segment.ce_weight)

    @property
    def vit(self) -> nn.Module | None:
        encoder = self.model.encoder
        return None if encoder is None else encoder.vit

    def param_groups(self, cfg: OptimConfig) -> list[dict]:
        return _groups(self, self.vit, cfg, self.full)

    def forward(self, batch: dict) -> dict:
        """batch["image"] `[B, C, *S]`, optional batch["mask"] long `[B, 1, *S]` -> {"logits", "loss"?, "dice"?}."""
        logits = self.model(batch["image"])
        out = {"logits": logits}
        if "mask" in batch:
            out["loss"] = self.loss(logits.float(), batch["mask"])
            with torch.no_grad():
                pred, y = logits.argmax(1), batch["mask"][:, 0]
                fg_p, fg_y = pred > 0, y > 0
                inter = (fg_p & fg_y & (pred == y)).sum()
                out["dice"] = 2 * inter / (fg_p.sum() + fg_y.sum()).clamp_min(1)
        return out


def build_task(recipe: FinetuneRecipe, label_schema: LabelSchema | None = None) -> nn.Module:
    """The task module a finetune recipe describes: backbone (+ weights) -> head -> tuning."""
    if recipe.task == "segmentation":
        from medfound.adapt.heads.segment import build_segmenter

        seg = tune_segmenter(build_segmenter(recipe), recipe.tuning, recipe.lora, recipe.last_k)
        return SegmentationTask(seg, recipe.segment, full=recipe.tuning == "full")
    if label_schema is None or label_schema.type == "none":
        raise ValueError(f"shard set {recipe.data.shards[0]} is unlabelled; fine-tuning needs labels")
    model = create_backbone(recipe.backbone, num_classes=0)
    classifier = attach_classifier(model, label_schema.num_classes, pool=recipe.head.pool, dropout=recipe.head.dropout)
    model = apply_tuning(model, recipe.tuning, classifier, recipe.lora, recipe.last_k)
    return ClassificationTask(model, classifier, label_schema, recipe.head.label_smoothing, full=recipe.tuning == "full")
