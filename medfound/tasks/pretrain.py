"""Task kind `pretrain`: a self-supervised objective (the one registered for objective.name) over a timm backbone;
the export is the encoder as a timm folder (+ the MAE decoder, to continue pretraining)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from medfound.backbones import create_backbone
from medfound.config import BackboneConfig, PretrainRecipe
from medfound.data.loaders import image_train_loader, train_image_transform
from medfound.registry import OBJECTIVES
from medfound.run import backbone_structure, lineage, parent_lineage
from medfound.run.monitor import apply_monitor_best, build_monitor
from medfound.tasks.base import TrainData, register_task
from medfound.tasks.images import TimmExport, check_img_size, image_training_data
from medfound.train.checkpoint import load_checkpoint


def build_objective(recipe: PretrainRecipe, backbone: Optional[BackboneConfig] = None):
    """The recipe's objective (registered for objective.name) around a backbone built from `backbone` (default: the
    recipe's, whose export's MAE decoder, if any, is loaded too)."""

    encoder = create_backbone(backbone or recipe.backbone, num_classes=0)
    weights = recipe.backbone.weights if backbone is None else None
    return OBJECTIVES.build(recipe.objective.name, recipe, encoder, weights)


@register_task
class PretrainSpec(TimmExport):
    name = "pretrain"
    stage = "pretraining"
    weights_file = "model.safetensors"
    pipeline_tag = "image-feature-extraction"
    capabilities = frozenset()

    def training_data(self, recipe) -> TrainData:
        return image_training_data(recipe)

    def build(self, recipe, data: TrainData):
        objective = build_objective(recipe)
        check_img_size(objective.export_backbone(), recipe.data.img_size)
        return objective

    def parameter_table(self, module, recipe) -> None:
        return None

    def train_loader(self, recipe, data: TrainData, ctx):
        return image_train_loader(recipe.data, recipe.trainer.seed, data.sets, data.manifests,
                                  train_image_transform(recipe.data), labelled=False)

    def describe(self, recipe, data: TrainData) -> str:
        return recipe.objective.describe()

    def selection(self, recipe, data: TrainData, run_dir: Path) -> Any:
        """The representation monitor (`monitor:`, medfound.run.monitor): k-NN and collapse signals while training."""

        return build_monitor(recipe, run_dir)

    def lineage(self, recipe, state, data: TrainData) -> dict[str, Any]:
        return lineage(recipe, state, data.manifests, self.stage, self.describe(recipe, data),
                       parent_lineage(recipe.backbone))

    def export(self, recipe, module, lineage: dict[str, Any], data: TrainData, export: Path) -> dict[str, Any]:
        files = getattr(module, "export_files", None)  # the objective's heads or decoder, to continue pretraining
        return self.format(recipe).write(self, recipe, module.export_backbone(), export, lineage=lineage,
                                         meta={"extra_files": files() if files is not None else None})

    def rebuild(self, run_dir: Path, recipe) -> Any:
        """The trained encoder rebuilt from the recipe and the newest checkpoint, or the monitor's best look
        (`monitor.export: best`): the reference an export must reproduce."""

        objective = build_objective(recipe, backbone_structure(recipe, run_dir / "export"))
        load_checkpoint(self.checkpoint(run_dir), objective)
        if recipe.monitor is not None and recipe.monitor.export == "best":
            apply_monitor_best(run_dir, objective)  # the export holds the monitor's best look
        return objective.export_backbone()

    def scorer(self, run, recipe, out: Path) -> Any:
        raise ValueError(f"{run.path} is a pretrain run: evaluate a finetune run (pretraining has no labels; "
                         "fine-tune its export with `medfound finetune` first)")
