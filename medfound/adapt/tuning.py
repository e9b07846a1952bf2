"""Tuning strategies: which parameters train, and LoRA through peft.

- `full`: every parameter trains.
- `linear_probe`: the backbone is frozen; only the classifier trains.
- `lora`: peft LoRA adapters on the backbone's nn.Linear layers whose last name component is in
  `target_modules` (timm ViT: `qkv`, `proj`, `fc1`, `fc2`; the patch-embedding conv is not a Linear
  and is never adapted); the classifier trains fully (peft `modules_to_save`). Nothing matched is
  an error. The adapter is saved on its own (peft format); merging happens only at export.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch.nn as nn

from medfound.config import LoraConfig


def lora_targets(model: nn.Module, suffixes: list[str]) -> list[str]:
    """Full names of the nn.Linear modules whose last name component is one of `suffixes`."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in set(suffixes)]
    if not names:
        linear = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"lora.target_modules={suffixes} matched no nn.Linear layer of {type(model).__name__}; "
                         f"its Linear layers are named: {', '.join(linear) or 'none'}")
    return names


def apply_tuning(model: nn.Module, strategy: str, classifier: str, lora: LoraConfig | None = None) -> nn.Module:
    """Set requires_grad per strategy; for LoRA return the peft-wrapped model (else `model` itself)."""
    if strategy == "full":
        model.requires_grad_(True)
        return model
    if strategy == "linear_probe":
        model.requires_grad_(False)
        model.get_submodule(classifier).requires_grad_(True)
        return model
    if strategy == "lora":
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        lora = lora or LoraConfig()
        targets = [n for n in lora_targets(model, lora.target_modules) if not n.startswith(classifier)]
        cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                             modules_to_save=[classifier], bias="none")
        return get_peft_model(model, cfg)
    raise ValueError(f"unknown tuning strategy {strategy!r}: choose lora, full or linear_probe")


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain timm module with any LoRA merged into its weights; the training model is left untouched."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return copy.deepcopy(model).merge_and_unload()
    return copy.deepcopy(model)


def parameter_table(model: nn.Module, classifier: str = "head") -> "OrderedDict[str, tuple[int, int]]":
    """(trainable, total) parameter counts per group: lora adapters, classifier, backbone."""
    groups: "OrderedDict[str, list[int]]" = OrderedDict((g, [0, 0]) for g in ("lora", "classifier", "backbone"))
    for name, p in model.named_parameters():
        if "lora_" in name:
            g = "lora"
        elif f".{classifier}." in f".{name}":
            g = "classifier"
        else:
            g = "backbone"
        groups[g][1] += p.numel()
        if p.requires_grad:
            groups[g][0] += p.numel()
    return OrderedDict((k, (v[0], v[1])) for k, v in groups.items() if v[1])


def print_parameter_table(model: nn.Module, strategy: str, classifier: str = "head") -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"parameters (tuning: {strategy})")
    for col in ("group", "trainable", "total"):
        table.add_column(col, justify="right" if col != "group" else "left")
    rows = parameter_table(model, classifier)
    for g, (t, n) in rows.items():
        table.add_row(g, f"{t:,}", f"{n:,}")
    t_all, n_all = sum(v[0] for v in rows.values()), sum(v[1] for v in rows.values())
    table.add_row("all", f"{t_all:,} ({100 * t_all / max(n_all, 1):.2f}%)", f"{n_all:,}")
    Console(stderr=True).print(table)
