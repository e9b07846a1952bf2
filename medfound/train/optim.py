"""AdamW parameter groups and the learning-rate schedule as a pure function of the step."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from timm.optim import param_groups_weight_decay

from medfound.config import OptimConfig


def no_weight_decay_names(module: nn.Module) -> set[str]:
    """Full parameter names that must not be decayed, from every submodule's `no_weight_decay()` (timm convention)."""
    names: set[str] = set()
    for prefix, m in module.named_modules():
        fn = getattr(m, "no_weight_decay", None)
        if callable(fn):
            names |= {f"{prefix}.{n}" if prefix else n for n in fn()}
    return names


def build_optimizer(module: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; biases, norms and `no_weight_decay()` names skip weight decay."""
    groups = param_groups_weight_decay(module, cfg.weight_decay, no_weight_decay_list=no_weight_decay_names(module))
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("no trainable parameters: check the tuning strategy")
    return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas)


def lr_at(step: int, *, base_lr: float, max_steps: int, warmup_steps: int = 0, min_lr: float = 0.0,
          schedule: str = "cosine") -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine to `min_lr` (or constant)."""
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
