"""Classification head: timm's own classifier on the backbone's pooled features.

Using the backbone's built-in classifier (`reset_classifier`) instead of a separate module means
the exported model is a plain timm classifier: `timm.create_model("local-dir:DIR", pretrained=True)`
gives the fine-tuned model with its head, and `num_classes=0` gives the feature extractor.
"""

from __future__ import annotations

import torch.nn as nn


def attach_classifier(backbone: nn.Module, num_classes: int, pool: str = "token", dropout: float = 0.0) -> str:
    """Give `backbone` a fresh `num_classes` classifier over `pool` features; return the classifier's module name.

    `pool`: "token" (class token, as ViT/RETFound fine-tuning) or "avg" (mean of patch tokens, as
    MAE's linear probing recommends). Width comes from `backbone.num_features`.
    """
    if num_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
    if not hasattr(backbone, "reset_classifier"):
        raise TypeError(f"{type(backbone).__name__} has no reset_classifier(): use a timm backbone")
    try:
        backbone.reset_classifier(num_classes, global_pool=pool)
    except (AssertionError, ValueError, TypeError) as e:
        raise ValueError(f"{type(backbone).__name__} does not support head.pool={pool!r}: {e}") from e
    if dropout and hasattr(backbone, "head_drop"):
        backbone.head_drop = nn.Dropout(dropout)
    name = backbone.pretrained_cfg.get("classifier", "head") if hasattr(backbone, "pretrained_cfg") else "head"
    if isinstance(name, (list, tuple)):
        name = name[0]
    if backbone.get_submodule(name) is not backbone.get_classifier():
        raise TypeError(f"cannot locate the classifier of {type(backbone).__name__} (pretrained_cfg says {name!r})")
    return name
