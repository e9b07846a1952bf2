"""Tuning strategies: which parameters train, and LoRA through peft.

- `full`: every parameter trains.
- `linear_probe`: the backbone is frozen; only the classifier (or segmentation decoder) trains.
- `last_k`: only the backbone's last k blocks and final norm train, with the head.
- `lora`: peft LoRA adapters on the backbone's nn.Linear layers: by default (`target_modules: [auto]`) every
  attention and MLP layer of the transformer blocks, read from the model (timm ViT: `qkv`, `proj`, `fc1`, `fc2`;
  DINOv3 with SwiGLU: `qkv`, `proj`, `fc1_g`, `fc1_x`, `fc2`), or those whose last name component is listed (the
  patch-embedding conv is not a Linear and is never adapted); the classifier trains fully (peft
  `modules_to_save`). Nothing matched is an error. The adapter is saved on its own (peft format); merging happens
  only at export.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch.nn as nn

from medfound.config import LoraConfig
from medfound.registry import TUNINGS


BLOCK_LINEAR = r"(^|\.)blocks\.\d+\.(attn|mlp)\."  # a transformer block's attention and MLP layers, in timm's names


def lora_targets(model: nn.Module, suffixes: list[str]) -> list[str]:
    """Full names of the nn.Linear modules LoRA adapts. `["auto"]`: every nn.Linear inside the transformer blocks'
    attention and MLP (`blocks.N.attn.*`, `blocks.N.mlp.*`), whatever the class names them (timm ViT: qkv, proj,
    fc1, fc2; DINOv3 / EVA with SwiGLU: qkv, proj, fc1_g, fc1_x, fc2), read from the model. Otherwise those whose
    last name component is in `suffixes`; a block layer that a given list leaves out is named in a warning. Nothing
    matched is an error naming the layers there are."""
    import re
    import warnings

    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    in_blocks = [n for n in linear if re.search(BLOCK_LINEAR, n)]
    if list(suffixes) == ["auto"]:
        names = in_blocks
    else:
        names = [n for n in linear if n.split(".")[-1] in set(suffixes)]
        left = sorted({n.split(".")[-1] for n in in_blocks} - set(suffixes))
        if names and left:
            warnings.warn(f"lora.target_modules={list(suffixes)} leaves the transformer blocks' {', '.join(left)} "
                          "without adapters (a SwiGLU MLP names its layers fc1_g, fc1_x); lora.target_modules=[auto] "
                          "adapts every attention and MLP layer of the blocks", stacklevel=2)
    if not names:
        found = sorted({n.split(".")[-1] for n in linear})
        raise ValueError(f"lora.target_modules={list(suffixes)} matched no nn.Linear layer of {type(model).__name__}"
                         + (" inside transformer blocks (blocks.N.attn / blocks.N.mlp)" if suffixes == ["auto"] else "")
                         + f"; its Linear layers are named: {', '.join(found) or 'none'}")
    return names


def _last_k(model: nn.Module, k: int) -> None:
    """Freeze `model` except its last `k` blocks and the norms after them (timm ViT: `blocks`, `norm`, `fc_norm`)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"tuning=last_k needs a backbone with `blocks` (a timm ViT); {type(model).__name__} has none")
    if not 1 <= k <= len(blocks):
        raise ValueError(f"last_k={k} but the backbone has {len(blocks)} blocks: choose 1..{len(blocks)}")
    model.requires_grad_(False)
    for blk in list(blocks)[-k:]:
        blk.requires_grad_(True)
    for name in ("norm", "fc_norm"):
        norm = getattr(model, name, None)
        if isinstance(norm, nn.Module):
            norm.requires_grad_(True)


def _peft_lora(model: nn.Module, lora: LoraConfig | None, exclude: str | None, modules_to_save: list[str] | None):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    lora = lora or LoraConfig()
    targets = [n for n in lora_targets(model, lora.target_modules) if not (exclude and n.startswith(exclude))]
    cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                         modules_to_save=modules_to_save, bias="none")
    return get_peft_model(model, cfg)


def tune_full(model: nn.Module, keep: str | None, lora: LoraConfig | None, last_k: int) -> nn.Module:
    """tuning=full: every weight trains (layer-wise lr decay comes from optim.layer_decay)."""
    model.requires_grad_(True)
    return model


def tune_linear_probe(model: nn.Module, keep: str | None, lora: LoraConfig | None, last_k: int) -> nn.Module:
    """tuning=linear_probe: the backbone is frozen; only the module `keep` (the classifier) trains."""
    model.requires_grad_(False)
    if keep:
        model.get_submodule(keep).requires_grad_(True)
    return model


def tune_last_k(model: nn.Module, keep: str | None, lora: LoraConfig | None, last_k: int) -> nn.Module:
    """tuning=last_k: the backbone's last k blocks and its final norm train, with `keep`."""
    _last_k(model, last_k)
    if keep:
        model.get_submodule(keep).requires_grad_(True)
    return model


def tune_lora(model: nn.Module, keep: str | None, lora: LoraConfig | None, last_k: int) -> nn.Module:
    """tuning=lora: peft LoRA adapters on the recipe's targets; `keep` (the classifier) trains whole and is saved
    with the adapter. Returns the peft-wrapped model."""
    return _peft_lora(model, lora, exclude=keep, modules_to_save=[keep] if keep else None)


def apply_tuning(model: nn.Module, strategy: str, classifier: str | None, lora: LoraConfig | None = None,
                 last_k: int = 2) -> nn.Module:
    """The tuning registered for `strategy` (medfound.registry.TUNINGS): requires_grad set, for LoRA the
    peft-wrapped model returned (else `model` itself). `classifier`: the module that always trains (None: a
    segmentation network's ViT, whose decoder trains outside it)."""
    return TUNINGS.build(strategy, model, classifier, lora, last_k)


def tune_segmenter(segmenter: nn.Module, strategy: str, lora: LoraConfig | None = None, last_k: int = 2) -> nn.Module:
    """Tuning for a segmentation network: the strategy acts on its ViT (`net.encoder.vit`); the decoder (and
    any new embedding or CNN stem) always trains. LoRA replaces `net.encoder.vit` by its peft wrapper."""
    segmenter.requires_grad_(True)
    encoder = getattr(segmenter.net, "encoder", None)
    if encoder is None:
        if strategy != "full":
            raise ValueError(f"tuning={strategy} adapts a pretrained ViT backbone; this CNN trains with tuning=full")
        return segmenter
    encoder.vit = apply_tuning(encoder.vit, strategy, None, lora, last_k)
    vit = encoder.vit.get_base_model() if hasattr(encoder.vit, "get_base_model") else encoder.vit
    for unused in ("fc_norm", "head", "attn_pool"):  # the classifier's pooling path: dense heads never use it
        module = getattr(vit, unused, None)
        if isinstance(module, nn.Module):
            module.requires_grad_(False)
    if encoder.spatial_dims == 3:
        vit.patch_embed.requires_grad_(False)  # replaced by the inflated 3-D embeddings
        vit.pos_embed.requires_grad_(False)
    return segmenter


def merged_segmenter(segmenter: nn.Module) -> nn.Module:
    """A copy of a segmentation network with any LoRA merged into its ViT (plain modules, plain state_dict keys)."""
    out = copy.deepcopy(segmenter)
    encoder = getattr(out.net, "encoder", None)
    if encoder is not None:
        encoder.vit = merged_copy(encoder.vit)
    return out


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain timm module with any LoRA merged into its weights; the training model is left untouched."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return copy.deepcopy(model).merge_and_unload()
    return copy.deepcopy(model)


def parameter_table(model: nn.Module, classifier: str = "head", backbone: str | None = None
                    ) -> "OrderedDict[str, tuple[int, int]]":
    """(trainable, total) parameter counts per group: lora adapters, head, backbone. The head is the module
    named `classifier`, or, when `backbone` (a name prefix) is given, everything outside it."""
    groups: "OrderedDict[str, list[int]]" = OrderedDict((g, [0, 0]) for g in ("lora", "head", "backbone"))
    for name, p in model.named_parameters():
        if "lora_" in name:
            g = "lora"
        elif backbone is not None:
            g = "backbone" if name.startswith(backbone) else "head"
        elif f".{classifier}." in f".{name}":
            g = "head"
        else:
            g = "backbone"
        groups[g][1] += p.numel()
        if p.requires_grad:
            groups[g][0] += p.numel()
    return OrderedDict((k, (v[0], v[1])) for k, v in groups.items() if v[1])


def print_parameter_table(model: nn.Module, strategy: str, classifier: str = "head", backbone: str | None = None
                          ) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"parameters (tuning: {strategy})")
    for col in ("group", "trainable", "total"):
        table.add_column(col, justify="right" if col != "group" else "left")
    rows = parameter_table(model, classifier, backbone)
    for g, (t, n) in rows.items():
        table.add_row(g, f"{t:,}", f"{n:,}")
    t_all, n_all = sum(v[0] for v in rows.values()), sum(v[1] for v in rows.values())
    table.add_row("all", f"{t_all:,} ({100 * t_all / max(n_all, 1):.2f}%)", f"{n_all:,}")
    Console(stderr=True).print(table)
