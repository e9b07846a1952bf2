"""Backbones come from timm: `create_backbone()` is `timm.create_model` plus loud errors.

A backbone is built from scratch (`backbone.name` + `backbone.model_args`) or from an export
folder (`backbone.weights`: `config.json` + `model.safetensors`, as written by medfound's export
or timm's `save_for_hf`), which timm loads itself through `local-dir:` with strict key matching.
Heads and objectives read the geometry (`embed_dim`, patch size, prefix tokens) from the model via
`vit_geometry()`, never from constants.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch.nn as nn

from medfound.config import BackboneConfig, ConfigError


def create_backbone(cfg: BackboneConfig, num_classes: int = 0, **kwargs: Any) -> nn.Module:
    """`timm.create_model` from a recipe's `backbone` section.

    Args:
        cfg: the recipe section (name and/or weights, model_args).
        num_classes: 0 for a feature extractor (pooled features `[B, D]`), K for timm's own classifier.
        kwargs: extra timm arguments from the head (e.g. `global_pool`).
    """
    args = {**cfg.model_args, **kwargs}
    if cfg.weights is not None:
        weights = Path(cfg.weights)
        if not (weights / "config.json").is_file():
            raise FileNotFoundError(f"backbone.weights={weights} has no config.json: point it at an export folder "
                                    "(RUN_DIR/export from `medfound pretrain`, or a timm save_for_hf folder)")
        arch = json.loads((weights / "config.json").read_text()).get("architecture")
        if cfg.name is not None and cfg.name != arch:
            raise ConfigError(f"backbone.name={cfg.name} but {weights} holds a {arch}; drop backbone.name or fix it")
        name, pretrained = f"local-dir:{weights}", True
    else:
        name, pretrained = str(cfg.name), False
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **args)
    except TypeError as e:
        raise ConfigError(f"timm rejected the backbone arguments {sorted(args)} for {cfg.name or cfg.weights}: {e}. "
                          "Fix backbone.model_args.") from e
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ConfigError(f"backbone.name={cfg.name!r} is not a timm model; list them with "
                              "`python -c \"import timm; print(timm.list_models('vit_*'))\"`") from e
        raise
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


@dataclass(frozen=True)
class ViTGeometry:
    embed_dim: int
    patch_size: tuple[int, int]
    grid_size: tuple[int, int]
    num_prefix_tokens: int
    in_chans: int

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]


def vit_geometry(model: nn.Module) -> ViTGeometry:
    """Read a timm ViT's token geometry; a clear error for models that are not patch-token ViTs."""
    pe = getattr(model, "patch_embed", None)
    if pe is None or not hasattr(model, "blocks") or not hasattr(model, "_pos_embed"):
        raise TypeError(f"{type(model).__name__} is not a timm VisionTransformer (no patch_embed/blocks/_pos_embed); "
                        "this objective or head needs a ViT backbone such as vit_base_patch16_224")
    ps = tuple(pe.patch_size) if isinstance(pe.patch_size, (tuple, list)) else (pe.patch_size, pe.patch_size)
    return ViTGeometry(embed_dim=model.embed_dim, patch_size=ps, grid_size=tuple(pe.grid_size),
                       num_prefix_tokens=model.num_prefix_tokens, in_chans=pe.proj.in_channels)


def vit_tokens(model: nn.Module, images: Any, *, mask: Any = None, mask_token: Any = None, keep: Any = None) -> Any:
    """The normed tokens `[B, P + N, D]` of a timm ViT: a `VisionTransformer` (absolute position embeddings) or an
    `Eva` (DINOv3, EVA-02: rotary position embeddings the blocks apply, register tokens, SwiGLU). The objectives'
    one forward, in place of copies of timm's `forward_features`:
    - `mask` `[B, N]` (True = masked) with `mask_token` `[1, 1, D]`: masked patch embeddings are replaced before the
      position embedding is added (iBOT);
    - `keep` `[B, K]`: only these patches are encoded (MAE's visible tokens, `[B, P + K, D]`); a rotary embedding is
      gathered at the same positions, so each kept token keeps its place in the image (timm's own patch dropout
      does the same).
    """
    import torch
    from timm.layers import apply_keep_indices_nlc
    from timm.models import checkpoint_seq

    x = model.patch_embed(images)  # [B, N, D], or [B, H, W, D] with dynamic_img_size
    if mask is not None:
        flat = x.reshape(x.shape[0], -1, x.shape[-1])
        flat = torch.where(mask.unsqueeze(-1), mask_token.to(flat.dtype), flat)
        x = flat.reshape(x.shape)
    x = model._pos_embed(x)  # adds position embeddings, prepends class/register tokens
    x, rope = x if isinstance(x, tuple) else (x, None)  # Eva: (tokens, rotary embedding for the blocks)
    mixed = bool(getattr(model, "rope_mixed", False))
    if keep is not None:
        p = model.num_prefix_tokens
        patches = x[:, p:]
        visible = torch.gather(patches, 1, keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        x = torch.cat([x[:, :p], visible], dim=1)
        if rope is not None:  # [N, d] (or per depth and head when mixed) -> [B, 1, K, d] as timm's patch dropout
            rope = apply_keep_indices_nlc(visible, rope, keep)
            rope = rope.transpose(0, 1) if mixed else rope.unsqueeze(1)
    x = model.norm_pre(x)
    checkpointing = getattr(model, "grad_checkpointing", False) and not torch.jit.is_scripting()
    if rope is None:
        x = checkpoint_seq(model.blocks, x) if checkpointing else model.blocks(x)
    else:
        from torch.utils.checkpoint import checkpoint

        for i, block in enumerate(model.blocks):
            r = rope[i] if mixed else rope
            x = checkpoint(block, x, rope=r, use_reentrant=False) if checkpointing else block(x, rope=r)
    return model.norm(x)
