"""A run's record: the lineage block every export carries (stage, objective, data, compute, parent), the recipe of
a run or published folder, and a backbone's structure read from an export without loading weights."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import medfound
from medfound.config import BackboneConfig, FinetuneRecipe, PretrainRecipe, load_recipe
from medfound.data.manifest import Manifest

# Loaded by torch-free commands (`medfound ls`, `validate`, `--help`): medfound modules that bring in torch or
# numpy are imported inside the functions that need them (tests/test_layering.py keeps it so).


def dataset_record(m: Manifest) -> dict[str, Any]:
    """What the lineage keeps of a training shard set (name, modality, site, digest, counts, licence, mpp, de-id)."""
    return {"name": m.name, "modality": m.modality, "site": m.site, "digest": m.digest, "counts": m.counts,
            "source": {k: v for k, v in m.source.items() if k in ("files", "license", "attribution")},
            **({"mpp": m.ingest["mpp"]} if m.ingest.get("mpp") else {}),
            **({"deidentification": m.deidentification} if m.deidentification else {})}


def lineage(recipe, state, manifests: list[Manifest], stage: str, objective: str, parent: dict) -> dict[str, Any]:
    """The `medfound` block of an export's config: how these weights were made, for the card."""
    from medfound.publish.export import hardware

    return {"stage": stage, "objective": objective, "steps": state.step, "images_seen": state.images_seen,
            "train_seconds": round(state.train_seconds, 1), "hardware": hardware(),
            "precision": recipe.trainer.precision, "global_batch": recipe.derived.global_batch_size,
            "lr": recipe.derived.lr, "split": recipe.data.train_split,
            "datasets": [dataset_record(m) for m in manifests],
            "medfound_version": medfound.__version__, **({"parent": parent} if parent else {})}


def parent_lineage(backbone: Optional[BackboneConfig]) -> dict[str, Any]:
    """The lineage of the export a run starts from ({} for a backbone built from scratch)."""
    from medfound.publish.export import read_lineage

    return read_lineage(backbone.weights) if backbone is not None and backbone.weights else {}


def backbone_structure(recipe: PretrainRecipe | FinetuneRecipe, export: Path) -> BackboneConfig:
    """The backbone's architecture as recorded in an export's config.json, without loading any weights."""
    cfg = json.loads((Path(export) / "config.json").read_text())
    args = {k: v for k, v in cfg.get("model_args", {}).items() if k not in ("num_classes", "global_pool")}
    return BackboneConfig(name=cfg["architecture"], model_args={**args, **recipe.backbone.model_args})


def load_run_recipe(run_dir: Path) -> Any:
    """The resolved recipe of a run directory (RUN_DIR/config.yaml)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a medfound run directory (no config.yaml)")
    return load_recipe(path)


@dataclass(frozen=True)
class RunFolder:
    """A run directory or a published folder: its recipe and where its exported weights are."""

    path: Path
    recipe: Any
    export: Path
    published: bool
    recipe_file: Optional[Path] = None

    def with_overrides(self, overrides: list[str]) -> Any:
        """The recipe with `key=value` overrides applied (validated as any recipe is)."""
        return load_recipe(self.recipe_file, overrides) if overrides else self.recipe


def read_run(folder: str | Path) -> RunFolder:
    """A run directory (config.yaml + export/) or a `medfound publish` folder (timm: training_config.yaml +
    model.safetensors at the top; networks: config.yaml + export/)."""
    folder = Path(folder)
    published = (folder / "README.md").is_file() and not (folder / "checkpoints").exists()
    if published and (folder / "training_config.yaml").is_file():
        return RunFolder(folder, load_recipe(folder / "training_config.yaml"), folder, True,
                         folder / "training_config.yaml")
    return RunFolder(folder, load_run_recipe(folder), folder / "export", published, folder / "config.yaml")
