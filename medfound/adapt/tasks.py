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
from medfound.adapt.heads.segment import build_segmenter
from medfound.adapt.pictures import overlay_rows
from medfound.registry import HEADS
from medfound.train.optim import no_weight_decay_names, vit_param_groups


def task_param_groups(module: nn.Module, vit: nn.Module | None, cfg: OptimConfig, full: bool) -> list[dict]:
    """AdamW groups: with full fine-tuning and `optim.layer_decay`, the ViT's blocks get layer-wise lr decay
    (BEiT; timm's param_groups_layer_decay) and the head the full lr; otherwise plain weight-decay groups."""
    from timm.optim import param_groups_weight_decay

    if vit is None or not full or (cfg.layer_decay is None and cfg.patch_embed_lr_mult == 1.0):
        return param_groups_weight_decay(module, cfg.weight_decay, no_weight_decay_list=no_weight_decay_names(module))
    groups = vit_param_groups(vit, cfg)
    inside = {id(p) for p in vit.parameters()}
    rest = nn.ParameterList([p for p in module.parameters() if id(p) not in inside and p.requires_grad])
    return groups + [{**g, "lr_scale": 1.0} for g in param_groups_weight_decay(rest, cfg.weight_decay)]


def class_weights(spec, counts: list[int] | None, multilabel: bool, total: int | None = None) -> torch.Tensor | None:
    """Loss weights for `head.class_weights`: None; a list (one per class); or "balanced": n / (K * n_c) per class
    (sklearn's convention), or for multi-label findings BCE's pos_weight = negatives / positives."""
    if spec is None:
        return None
    if spec != "balanced":
        return torch.tensor(spec, dtype=torch.float32)
    if not counts or sum(counts) == 0:
        raise ValueError("head.class_weights=balanced needs the training split's class counts (manifest by_label)")
    c = torch.tensor(counts, dtype=torch.float32)
    if multilabel:
        if total is None:
            raise ValueError("multi-label balanced weights need the number of training samples")
        return (total - c).clamp_min(0) / c.clamp_min(1)
    return c.sum() / (len(c) * c.clamp_min(1))


def endpoint(schema: LabelSchema, threshold: int | None) -> LabelSchema:
    """The label schema a recipe trains: the data's own, or with `head.binary_threshold=k` the binary endpoint
    grade >= k of graded (ordinal or multi-class) labels, named "below <k>" / "<k> or worse"."""
    if threshold is None:
        return schema
    if schema.type not in ("ordinal", "multiclass"):
        raise ValueError(f"head.binary_threshold turns graded labels into a binary endpoint; these labels are "
                         f"{schema.type} {schema.names}")
    if not 0 < threshold < schema.num_classes:
        raise ValueError(f"head.binary_threshold={threshold} must be a class index in 1..{schema.num_classes - 1} "
                         f"of {schema.names}")
    name = schema.names[threshold]
    return LabelSchema(type="binary", names=[f"below {name}", f"{name} or worse"])


def endpoint_counts(counts: list[int] | None, threshold: int | None) -> list[int] | None:
    """Per-class counts of the graded labels -> counts of the binary endpoint (see `endpoint`)."""
    if counts is None or threshold is None:
        return counts
    return [sum(counts[:threshold]), sum(counts[threshold:])]


def label_loss(logits: torch.Tensor, y: torch.Tensor, multilabel: bool, weights: torch.Tensor | None,
               label_smoothing: float) -> dict[str, torch.Tensor]:
    """{"loss", "accuracy"} for logits `[B, K]`: multi-label -> sigmoid BCE with `weights` as pos_weight and
    label-wise accuracy at 0.5; single-label -> cross-entropy with class `weights` and label smoothing, top-1."""
    w = None if weights is None else weights.to(logits.device)
    if multilabel:
        loss = F.binary_cross_entropy_with_logits(logits.float(), y.float(), pos_weight=w)
        with torch.no_grad():
            accuracy = ((logits > 0) == (y > 0.5)).float().mean()
    else:
        loss = F.cross_entropy(logits.float(), y, weight=w, label_smoothing=label_smoothing)
        with torch.no_grad():
            accuracy = (logits.argmax(-1) == y).float().mean()
    return {"loss": loss, "accuracy": accuracy}


class HeadWarmup:
    """Linear probing, then fine-tuning (LP-FT; Kumar et al., "Fine-Tuning can Distort Pretrained Features",
    ICLR 2022): for the first `head_warmup_steps` optimizer steps the backbone's trainable parameters (its weights,
    LoRA adapters or last blocks) get no update, their gradients dropped before the step (AdamW then skips them, weight
    decay included), so only the head learns; then the tuning trains as usual. A task gives `warmup_frozen()`, the
    parameters held. It depends on the step alone, so a resumed run holds exactly the same steps."""

    head_warmup_steps: int = 0

    def warmup_frozen(self) -> list[nn.Parameter]:
        raise NotImplementedError

    @property
    def touches_gradients(self) -> bool:
        """True when `before_optimizer_step` drops gradients (the strategies that cannot do that refuse)."""
        return self.head_warmup_steps > 0

    def before_optimizer_step(self, step: int, max_steps: int) -> None:
        if step < self.head_warmup_steps:
            for p in self.warmup_frozen():
                p.grad = None


def vit_trainables(vit: nn.Module | None) -> list[nn.Parameter]:
    """The trainable parameters of a segmentation network's ViT (a dense head's backbone)."""
    return [] if vit is None else [p for p in vit.parameters() if p.requires_grad]


class ClassificationTask(HeadWarmup, nn.Module):
    """Image classification: single-label (binary, multi-class, ordinal grades) with cross-entropy, or multi-label
    findings (CheXNet, Rajpurkar et al. 2017) with a sigmoid per finding and binary cross-entropy.

    Args:
        model: a timm model whose classifier outputs `[B, K]` logits (possibly wrapped by peft).
        classifier: the classifier's module name (for tuning and export).
        label_schema: class names and type, carried into the export and the card.
        label_smoothing: cross-entropy label smoothing (RETFound fine-tunes with 0.1); single-label only.
        weights: `[K]` class weights (cross-entropy `weight`; multi-label: BCE `pos_weight`), see `class_weights`.
    """

    def __init__(self, model: nn.Module, classifier: str, label_schema: LabelSchema, label_smoothing: float = 0.0,
                 full: bool = False, weights: torch.Tensor | None = None, threshold: int | None = None,
                 head_warmup_steps: int = 0):
        super().__init__()
        self.model = model
        self.head_warmup_steps = head_warmup_steps
        self.threshold = threshold  # graded labels -> (label >= threshold), see `endpoint`
        self.classifier = classifier
        self.label_schema = label_schema
        self.multilabel = label_schema.type == "multilabel"
        self.label_smoothing = label_smoothing
        self.full = full
        if weights is not None and len(weights) != label_schema.num_classes:
            raise ValueError(f"head.class_weights has {len(weights)} entries for {label_schema.num_classes} classes "
                             f"{label_schema.names}")
        self.weights = weights  # not a buffer: checkpoints and exports stay independent of the loss weighting

    def warmup_frozen(self) -> list[nn.Parameter]:
        """Every trainable parameter outside the classifier (peft's copy of it included)."""
        return [p for n, p in self.model.named_parameters()
                if p.requires_grad and f".{self.classifier}." not in f".{n}"]

    def param_groups(self, cfg: OptimConfig) -> list[dict]:
        """Layer-wise lr decay over the backbone under full fine-tuning (timm puts the classifier last)."""
        if self.full and (cfg.layer_decay is not None or cfg.patch_embed_lr_mult != 1.0):
            return vit_param_groups(self.model, cfg)
        return task_param_groups(self, None, cfg, False)

    def forward(self, batch: dict) -> dict:
        """batch["image"] `[B, 3, H, W]`, optional batch["label"] (long `[B]`, or multi-hot float `[B, K]`)
        -> {"logits": `[B, K]`, "loss"?, "accuracy"?}."""
        logits = self.model(batch["image"])
        out = {"logits": logits}
        if "label" in batch:
            y = batch["label"]
            if self.threshold is not None:
                y = (y >= self.threshold).long()
            out.update(label_loss(logits, y, self.multilabel, self.weights, self.label_smoothing))
        return out


class SegmentationTask(HeadWarmup, nn.Module):
    """Semantic segmentation with Dice + cross-entropy (MONAI `DiceCELoss`, softmax over K classes).

    Args:
        segmenter: `[B, C, *S]` -> logits `[B, K, *S]` (medfound.adapt.heads.segment.Segmenter).
        segment: the recipe's segment section (classes, loss weights).
        full: full fine-tuning (enables layer-wise lr decay over the ViT backbone).
    """

    def __init__(self, segmenter: nn.Module, segment: SegmentConfig, full: bool = False, head_warmup_steps: int = 0):
        super().__init__()
        self.head_warmup_steps = head_warmup_steps
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
        return task_param_groups(self, self.vit, cfg, self.full)

    def warmup_frozen(self) -> list[nn.Parameter]:
        """The ViT's trainable parameters; the decoder (and any new embedding or CNN stem) warms up."""
        return vit_trainables(self.vit)

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

    @torch.no_grad()
    def visualize(self, batch: dict, out: dict):
        """trainer.visualize_every: rows of image | ground truth | prediction (medfound.adapt.pictures)."""
        return overlay_rows(batch["image"], batch["mask"], out["logits"].argmax(1),
                            titles=["image", "truth", "prediction"])


class MILTask(nn.Module):
    """Slide-level classification from padded bags of tile features with gated-attention MIL.

    Args:
        head: GatedAttentionMIL.
        label_schema: slide classes (single-label, or multi-label findings with a sigmoid each).
        label_smoothing, weights: as ClassificationTask.
    """

    def __init__(self, head: nn.Module, label_schema: LabelSchema, label_smoothing: float = 0.0,
                 weights: torch.Tensor | None = None):
        super().__init__()
        self.model = head
        self.label_schema = label_schema
        self.multilabel = label_schema.type == "multilabel"
        self.label_smoothing = label_smoothing
        self.weights = weights

    def forward(self, batch: dict) -> dict:
        """batch["features"] `[B, N, D]`, batch["mask"] bool `[B, N]`, optional batch["label"]
        -> {"logits" `[B, K]`, "attention" `[B, N]`, "loss"?, "accuracy"?}."""
        logits, attention = self.model(batch["features"], batch.get("mask"))
        out = {"logits": logits, "attention": attention}
        if "label" in batch:
            out.update(label_loss(logits, batch["label"], self.multilabel, self.weights, self.label_smoothing))
        return out


def build_mil_task(recipe: FinetuneRecipe, feature_dim: int, label_schema: LabelSchema,
                   class_counts: list[int] | None = None, num_train: int | None = None) -> MILTask:
    """The MIL task of a recipe over `feature_dim`-d tile features: the head registered for head.type (abmil)."""
    if label_schema.type == "none":
        raise ValueError("the bags are unlabelled: slide-level training needs slide labels (a --table for "
                         "`medfound shard wsi`)")
    h = recipe.head
    multilabel = label_schema.type == "multilabel"
    if multilabel and h.label_smoothing:
        raise ValueError("head.label_smoothing applies to single-label cross-entropy; set it to 0 for multi-label data")
    head = HEADS.build(recipe.head.type, recipe, feature_dim, label_schema.num_classes)  # a bag head (abmil)
    weights = class_weights(h.class_weights, class_counts, multilabel, num_train)
    if weights is not None and len(weights) != label_schema.num_classes:
        raise ValueError(f"head.class_weights has {len(weights)} entries for {label_schema.num_classes} classes")
    return MILTask(head, label_schema, h.label_smoothing, weights)


def build_segmentation_task(recipe: FinetuneRecipe) -> SegmentationTask:
    """The segmentation task of a recipe: the registered network for head.type, tuned, with Dice + CE."""
    seg = tune_segmenter(build_segmenter(recipe), recipe.tuning, recipe.lora, recipe.last_k)
    return SegmentationTask(seg, recipe.segment, full=recipe.tuning == "full",
                            head_warmup_steps=recipe.head_warmup_steps)


def build_classification_task(recipe: FinetuneRecipe, label_schema: LabelSchema | None,
                              class_counts: list[int] | None = None, num_train: int | None = None
                              ) -> ClassificationTask:
    """The classification task a recipe describes: backbone (+ weights) -> timm classifier -> tuning.
    `class_counts` and `num_train` (the training split's) resolve `head.class_weights=balanced`."""
    if label_schema is None or label_schema.type == "none":
        raise ValueError(f"shard set {recipe.data.shards[0]} is unlabelled; fine-tuning needs labels")
    threshold = recipe.head.binary_threshold
    label_schema = endpoint(label_schema, threshold)
    class_counts = endpoint_counts(class_counts, threshold)
    model = create_backbone(recipe.backbone, num_classes=0)
    classifier = attach_classifier(model, label_schema.num_classes, pool=recipe.head.pool, dropout=recipe.head.dropout)
    model = apply_tuning(model, recipe.tuning, classifier, recipe.lora, recipe.last_k)
    multilabel = label_schema.type == "multilabel"
    if multilabel and recipe.head.label_smoothing:
        raise ValueError("head.label_smoothing applies to single-label cross-entropy; set it to 0 for multi-label data")
    weights = class_weights(recipe.head.class_weights, class_counts, multilabel, num_train)
    return ClassificationTask(model, classifier, label_schema, recipe.head.label_smoothing,
                              full=recipe.tuning == "full", weights=weights, threshold=threshold,
                              head_warmup_steps=recipe.head_warmup_steps)
