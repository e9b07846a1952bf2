"""Which backbones a benchmark compares (`medfound bench BACKBONE ...`), each as a timm model without a classifier.

A BACKBONE is `[LABEL=]SPEC`, SPEC one of:
- a folder timm loads with `local-dir:` (a run's `export/`, `medfound import` output, a `medfound publish`ed backbone
  or classifier), or a run directory (its `export/` is used);
- `timm:NAME`: timm's architecture NAME with random weights (the from-scratch baseline), seeded;
- `timm:same-as:FOLDER`: the exact architecture of an export (its `architecture` and `model_args`) with random
  weights: the baseline that differs from FOLDER in its weights only.
LABEL names it in the results (default: the folder's name, `timm:NAME`, `random:FOLDERNAME`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from medfound.io import sha256_file

RANDOM_SEED = 0  # the random-init baselines' weights: the same on every run


@dataclass(frozen=True)
class Backbone:
    label: str
    spec: str
    folder: Optional[Path] = None          # a timm local-dir folder
    architecture: Optional[str] = None     # random init: timm name
    model_args: dict[str, Any] = field(default_factory=dict)

    @property
    def random(self) -> bool:
        return self.folder is None

    def identity(self) -> str:
        """What the features depend on: the weights' sha256 (a folder), or the architecture and init seed."""
        import timm

        if self.folder is not None:
            weights = self.folder / "model.safetensors"
            cfg = (self.folder / "config.json").read_bytes()
            return hashlib.sha256(sha256_file(weights).encode() + cfg).hexdigest()
        body = json.dumps({"architecture": self.architecture, "model_args": self.model_args, "seed": RANDOM_SEED,
                           "timm": timm.__version__}, sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()

    def build(self):
        """The backbone as a timm module without classifier (`num_classes=0`), eval mode."""
        import timm
        import torch

        if self.folder is not None:
            return timm.create_model(f"local-dir:{self.folder}", pretrained=True, num_classes=0).eval()
        state = torch.random.get_rng_state()
        torch.manual_seed(RANDOM_SEED)
        try:
            return timm.create_model(self.architecture, pretrained=False, num_classes=0, **self.model_args).eval()
        finally:
            torch.random.set_rng_state(state)

    def input_config(self) -> dict[str, Any]:
        """input_size, mean and std the backbone expects (its pretrained_cfg; timm's defaults for random ones)."""
        if self.folder is not None:
            cfg = json.loads((self.folder / "config.json").read_text()).get("pretrained_cfg", {})
        else:
            import timm

            cfg = dict(timm.create_model(self.architecture, pretrained=False, num_classes=0,
                                         **self.model_args).pretrained_cfg)
            if "img_size" in self.model_args:
                size = self.model_args["img_size"]
                cfg["input_size"] = [3, *(size if isinstance(size, (list, tuple)) else (size, size))]
        return {"img_size": int(cfg.get("input_size", [3, 224, 224])[-1]),
                "mean": [float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406))],
                "std": [float(v) for v in cfg.get("std", (0.229, 0.224, 0.225))]}

    def recipe_overrides(self) -> list[str]:
        """The backbone section of a fine-tuning recipe that starts from this backbone."""
        if self.folder is not None:
            return [f"backbone.weights={self.folder}"]
        args = json.dumps(self.model_args) if self.model_args else "{}"
        return ["backbone.weights=null", f"backbone.name={self.architecture}", f"backbone.model_args={args}"]


def _timm_folder(path: Path) -> Optional[Path]:
    for candidate in (path, path / "export"):
        if (candidate / "config.json").is_file() and (candidate / "model.safetensors").is_file():
            return candidate
    return None


def resolve(spec: str) -> Backbone:
    """`[LABEL=]SPEC` -> a Backbone; ValueError naming the spec and what it should be."""
    label, sep, rest = spec.partition("=")
    if not sep or "/" in label or label.startswith(("timm:", ".")):
        label, rest = "", spec
    if rest.startswith("timm:same-as:"):
        ref = Path(rest[len("timm:same-as:"):])
        folder = _timm_folder(ref)
        if folder is None:
            raise ValueError(f"backbone {spec!r}: {ref} holds no timm export (config.json + model.safetensors)")
        cfg = json.loads((folder / "config.json").read_text())
        args = {k: v for k, v in cfg.get("model_args", {}).items() if k not in ("num_classes", "global_pool")}
        return Backbone(label or f"random:{ref.name if ref.name != 'export' else ref.parent.name}", rest,
                        architecture=cfg["architecture"], model_args=args)
    if rest.startswith("timm:"):
        import timm

        name = rest[len("timm:"):]
        if not name or not timm.is_model(name):
            raise ValueError(f"backbone {spec!r}: {name!r} is not a timm architecture (`timm.list_models()` lists "
                             "them); for an export's own architecture use timm:same-as:FOLDER")
        return Backbone(label or rest, rest, architecture=name)
    path = Path(rest)
    folder = _timm_folder(path)
    if folder is None:
        what = "does not exist" if not path.exists() else "holds no timm model (config.json + model.safetensors)"
        raise ValueError(f"backbone {spec!r}: {path} {what}. Give a run's export/, an imported or published timm "
                         "folder, timm:NAME (random init) or timm:same-as:FOLDER")
    if not json.loads((folder / "config.json").read_text()).get("architecture"):
        raise ValueError(f"backbone {spec!r}: {folder}/config.json names no timm architecture")
    name = folder.parent.name if folder.name == "export" else folder.name
    return Backbone(label or name, rest, folder=folder)
