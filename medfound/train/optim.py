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
    """AdamW over the trainable parameters.

    The module's own `param_groups(cfg)` when it has one (layer-wise lr decay, multipliers); otherwise
    biases, norms and `no_weight_decay()` names skip weight decay. Each group carries `lr_scale` and
    `wd_scale`, which the loop multiplies with the scheduled lr and weight decay every step.
    """
    if hasattr(module, "param_groups"):
        groups = module.param_groups(cfg)
    else:
        groups = param_groups_weight_decay(module, cfg.weight_decay,
                                           no_weight_decay_list=no_weight_decay_names(module))
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("no trainable parameters: check the tuning strategy")
    for g in groups:
        g.setdefault("lr_scale", 1.0)
        g["wd_scale"] = 1.0 if g.get("weight_decay", 0.0) > 0 else 0.0
        g.pop("param_names", None)
    params = [p for g in groups for p in g["params"]]
    # the fused kernel does the whole update in one pass (7x faster than foreach on a ViT-B on CPU, same result
    # to 1e-8); it needs floating-point parameters on one CPU or CUDA device
    fused = all(p.is_floating_point() for p in params) and len({p.device.type for p in params}) == 1 and \
        params[0].device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=fused)


def vit_param_groups(backbone: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Groups for a timm backbone: layer-wise lr decay (BEiT; `optim.layer_decay`) via timm's
    `param_groups_layer_decay`, and `optim.patch_embed_lr_mult` on the patch embedding (DINOv2 uses 0.2)."""
    from timm.optim import param_groups_layer_decay

    nwd = list(getattr(backbone, "no_weight_decay", lambda: set())())
    if cfg.layer_decay is None:
        groups = param_groups_weight_decay(backbone, cfg.weight_decay, no_weight_decay_list=nwd)
    else:
        groups = param_groups_layer_decay(backbone, cfg.weight_decay, no_weight_decay_list=nwd,
                                          layer_decay=cfg.layer_decay)
    patch_embed = getattr(backbone, "patch_embed", None)
    if cfg.patch_embed_lr_mult == 1.0 or patch_embed is None:
        return groups
    pe_ids = {id(p) for p in patch_embed.parameters()}
    out = []
    for g in groups:
        rest = {k: v for k, v in g.items() if k != "params"}
        pe = [p for p in g["params"] if id(p) in pe_ids]
        if pe:
            out.append({**rest, "params": pe, "lr_scale": g.get("lr_scale", 1.0) * cfg.patch_embed_lr_mult})
        out.append({**rest, "params": [p for p in g["params"] if id(p) not in pe_ids]})
    return out


def wd_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Weight decay for step `step`: constant, or cosine from `weight_decay` to `weight_decay_end` (DINOv2)."""
    if cfg.weight_decay_end is None:
        return cfg.weight_decay
    progress = min(1.0, step / max(1, max_steps))
    return cfg.weight_decay_end + (cfg.weight_decay - cfg.weight_decay_end) * 0.5 * (1.0 + math.cos(math.pi * progress))


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
