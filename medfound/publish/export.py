"""Export a trained backbone as a timm `local-dir:` folder and prove it reloads.

The folder holds `model.safetensors` and `config.json` written by timm's own `save_for_hf`, so
`timm.create_model("local-dir:DIR", pretrained=True)` rebuilds the model (its classifier included,
or `num_classes=0` for features) and `timm.data.resolve_data_config(model=...)` returns the
preprocessing used in training. `config.json` also carries a `medfound` block: the run's lineage
(datasets with manifest digests, steps, compute, the parent backbone's own block), from which the
model card is written. LoRA runs also keep their adapter in peft's format under `adapter/`.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any, Optional

import timm
import torch
import torch.nn as nn
from timm.models import save_for_hf

from medfound.config import DataConfig
from medfound.io import atomic_dir


def hardware() -> str:
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        return f"{n} x {torch.cuda.get_device_name(0)}"
    import os
    return f"CPU ({os.cpu_count()} cores, {platform.machine()})"


@torch.no_grad()
def max_output_diff(a: nn.Module, b: nn.Module, input_size: tuple[int, int, int], seed: int = 0) -> dict[str, float]:
    """Largest absolute difference of `forward_features` and of the full output of two models, in eval mode."""
    x = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(seed))
    a_was, b_was = a.training, b.training
    a.eval()
    b.eval()
    try:
        return {"features": float((a.forward_features(x) - b.forward_features(x)).abs().max()),
                "output": float((a(x) - b(x)).abs().max())}
    finally:
        a.train(a_was)
        b.train(b_was)


def check_reload(export_dir: Path, reference: nn.Module, tol: float = 1e-5) -> dict[str, float]:
    """Reload `export_dir` through timm and compare it with `reference`: same keys, same weights and the
    same features and outputs on a fixed input, within `tol` (float rounding); raise if it does not."""
    reloaded = timm.create_model(f"local-dir:{export_dir}", pretrained=True)
    ref, got = reference.state_dict(), reloaded.state_dict()
    if set(ref) != set(got):
        raise RuntimeError(f"the export in {export_dir} has other weights than the trained model: missing "
                           f"{sorted(set(ref) - set(got))[:5]}, unexpected {sorted(set(got) - set(ref))[:5]}")
    diff = {"weights": max((float((ref[k].float() - got[k].float()).abs().max()) for k in ref if ref[k].numel()),
                           default=0.0)}
    diff.update(max_output_diff(reference, reloaded, tuple(reloaded.pretrained_cfg["input_size"])))
    if not all(v <= tol for v in diff.values()):
        raise RuntimeError(f"the export in {export_dir} does not reproduce the trained model through timm "
                           f"(max abs difference {diff}, tolerance {tol}); do not publish it")
    return diff


def export_model(model: nn.Module, out: Path, *, data: DataConfig | Any, lineage: dict[str, Any], license: str,
                 label_names: Optional[list[str]] = None, adapter: Optional[nn.Module] = None,
                 extra_files: Optional[dict[str, bytes]] = None) -> dict[str, float]:
    """Write `model` (a plain timm module) to `out` atomically and verify the reload; return the differences.

    `data` gives the preprocessing recorded in config.json (`img_size`, `mean`, `std`); `extra_files` are
    written into the folder too (e.g. an MAE decoder), inside the same atomic rename.
    """
    model_config: dict[str, Any] = {"pretrained_cfg": {"tag": "medfound", "license": license}, "medfound": lineage}
    if label_names:
        model_config["label_names"] = list(label_names)
    data_config = {"mean": tuple(data.mean), "std": tuple(data.std), "crop_pct": 1.0, "interpolation": "bicubic",
                   "input_size": (3, data.img_size, data.img_size)}
    with atomic_dir(out, overwrite=True) as tmp:
        save_for_hf(model, str(tmp), model_config=model_config, safe_serialization=True, data_config=data_config)
        if adapter is not None:
            adapter.save_pretrained(str(tmp / "adapter"))
        for name, payload in (extra_files or {}).items():
            (tmp / name).write_bytes(payload)
        diff = check_reload(tmp, model)
    return diff


def read_lineage(export_dir: Path) -> dict[str, Any]:
    """The `medfound` block of an export's config.json ({} for a plain timm folder)."""
    path = Path(export_dir) / "config.json"
    if not path.is_file():
        return {}
    return json.loads(path.read_text()).get("medfound", {})
