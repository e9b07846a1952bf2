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
from medfound.evaluate.records import network_lineage
from medfound.io import sha256_file


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


def hub_compatible_config(folder: Path) -> None:
    """Make timm's config.json loadable by transformers too. timm records every factory argument in `model_args`,
    `num_classes` included, and transformers' TimmWrapper passes `num_classes` itself (a TypeError: "got multiple
    values"); timm reads the head size from the root `num_classes`, so dropping the copy changes nothing for timm."""
    path = Path(folder) / "config.json"
    cfg = json.loads(path.read_text())
    if "num_classes" in cfg.get("model_args", {}):
        cfg["model_args"] = {k: v for k, v in cfg["model_args"].items() if k != "num_classes"}
        path.write_text(json.dumps(cfg, indent=2) + "\n")


def adapter_base(classifier_config: dict[str, Any], base: Optional[str | Path]) -> dict[str, Any]:
    """How to rebuild the base a LoRA adapter applies to: `timm.create_model(timm_name, pretrained=True, **kwargs)`.

    The base is the backbone folder the run started from with the run's classifier attached, which is not what
    `create_model(base, num_classes=K)` builds: timm's defaults for another pooling differ (`global_pool="avg"`
    turns on `fc_norm`, a different network). The kwargs are the classifier's factory arguments that differ from
    the base folder's, so the documented call builds exactly the network the adapter was trained on."""
    args = {k: v for k, v in classifier_config.get("model_args", {}).items() if k != "num_classes"}
    record: dict[str, Any] = {"base_model": None if base is None else str(base), "timm_name": None,
                              "timm_kwargs": {"num_classes": classifier_config["num_classes"]},
                              "base_weights_sha256": None}
    if base is None:
        return record
    folder = Path(base)
    base_args: dict[str, Any] = {}
    if (folder / "config.json").is_file():
        base_args = json.loads((folder / "config.json").read_text()).get("model_args", {})
        if (folder / "model.safetensors").is_file():
            record["base_weights_sha256"] = sha256_file(folder / "model.safetensors")
        record["timm_name"] = f"local-dir:{base}"
    else:  # a Hub id
        record["timm_name"] = f"hf-hub:{base}"
    record["timm_kwargs"].update({k: v for k, v in args.items() if base_args.get(k, _MISSING) != v})
    return record


_MISSING = object()


def write_adapter_card(adapter_dir: Path, base: dict[str, Any], label_names: Optional[list[str]]) -> None:
    """Record the base in peft's adapter_config.json (`base_model_name_or_path`) and in base_model.json (the timm
    call that rebuilds it, the base weights' sha256), and replace peft's empty template README with a card that
    says how to load the adapter."""
    cfg_path = adapter_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = base["base_model"]
    for key in ("target_modules", "modules_to_save"):  # peft writes its sets in hash order: a byte-stable folder
        if isinstance(cfg.get(key), list):
            cfg[key] = sorted(cfg[key])
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (adapter_dir / "base_model.json").write_text(json.dumps(base, indent=2) + "\n")
    kwargs = "".join(f", {k}={v!r}" for k, v in base["timm_kwargs"].items())
    sha = f" (its `model.safetensors` has sha256 `{base['base_weights_sha256']}`)" if base["base_weights_sha256"] \
        else ""
    if base["timm_name"] is None:
        where = ("The backbone was built from scratch by the run, so no published weights are its base: use the "
                 "merged model in the folder above instead.")
        load = ""
    else:
        where = f"Base model: `{base['base_model']}`{sha}, rebuilt with the classifier the adapter was trained on."
        load = (f"\n```python\nimport timm\nfrom peft import PeftModel\n\n"
                f"base = timm.create_model({base['timm_name']!r}, pretrained=True{kwargs})\n"
                f"model = PeftModel.from_pretrained(base, \"PATH_TO_THIS_FOLDER/adapter\").eval()\n"
                f"# model(x) equals the merged classifier in the folder above: "
                f"timm.create_model(\"local-dir:PATH_TO_THIS_FOLDER\", pretrained=True)\n```\n")
    classes = f"\nOutput: {len(label_names)} logits, classes {', '.join(label_names)}.\n" if label_names else ""
    hub_id = base["base_model"] if (base["timm_name"] or "").startswith("hf-hub:") else None
    (adapter_dir / "README.md").write_text(
        "---\nlibrary_name: peft\n" + (f"base_model: {hub_id}\n" if hub_id else "") + "---\n\n"
        f"# LoRA adapter\n\nThe peft LoRA adapter of the classifier in the folder above (written by medfound). "
        f"{where}\n{load}{classes}\nThe factory arguments are also in `base_model.json`: `timm_name` and "
        f"`timm_kwargs`.\n")


def export_model(model: nn.Module, out: Path, *, data: DataConfig | Any, lineage: dict[str, Any], license: str,
                 label_names: Optional[list[str]] = None, adapter: Optional[nn.Module] = None,
                 adapter_base_model: Optional[str | Path] = None,
                 extra_files: Optional[dict[str, bytes]] = None) -> dict[str, float]:
    """Write `model` (a plain timm module) to `out` atomically and verify the reload; return the differences.

    `data` gives the preprocessing recorded in config.json (`img_size`, `mean`, `std`); `extra_files` are
    written into the folder too (e.g. an MAE decoder), inside the same atomic rename. `adapter` (a peft model) is
    saved under adapter/ with `adapter_base_model` (the backbone folder or Hub id the run started from) as its base.
    """
    model_config: dict[str, Any] = {"pretrained_cfg": {"tag": "medfound", "license": license}, "medfound": lineage}
    if label_names:
        model_config["label_names"] = list(label_names)
    data_config = {"mean": tuple(data.mean), "std": tuple(data.std), "crop_pct": 1.0, "interpolation": "bicubic",
                   "input_size": (3, data.img_size, data.img_size)}
    with atomic_dir(out, overwrite=True) as tmp:
        save_for_hf(model, str(tmp), model_config=model_config, safe_serialization=True, data_config=data_config)
        hub_compatible_config(tmp)
        if adapter is not None:
            adapter.save_pretrained(str(tmp / "adapter"))
            write_adapter_card(tmp / "adapter", adapter_base(json.loads((tmp / "config.json").read_text()),
                                                             adapter_base_model), label_names)
        for name, payload in (extra_files or {}).items():
            (tmp / name).write_bytes(payload)
        diff = check_reload(tmp, model)
    return diff


def read_lineage(export_dir: Path) -> dict[str, Any]:
    """The `medfound` block of an export: its config.json's (a timm folder; {} for a plain one), else its network
    json's (the `network` export format)."""
    path = Path(export_dir) / "config.json"
    if not path.is_file():
        return network_lineage(export_dir)
    return json.loads(path.read_text()).get("medfound", {})
