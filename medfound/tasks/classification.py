"""Task kind `classification`: timm's classifier on a backbone (head.type=classify), single-label, graded or
multi-label, by LoRA / full / last-k / linear probe; the export is the merged classifier as a timm folder
(+ the peft adapter), evaluated with per-site, external-site and unit-level results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medfound.registry import HEADS
from medfound.run import backbone_structure, lineage, parent_lineage
from medfound.tasks.base import TrainData, register_task
from medfound.tasks.images import TimmExport, check_img_size, image_training_data

TUNING_TEXT = {"lora": "LoRA (r={r}, alpha={alpha}) + classifier", "full": "full fine-tuning",
               "linear_probe": "linear probe (frozen backbone)", "last_k": "last {k} blocks + classifier"}


def tuning_text(recipe, texts: dict[str, str]) -> str:
    return texts[recipe.tuning].format(r=recipe.lora.r, alpha=recipe.lora.alpha, k=recipe.last_k)


@register_task
class ClassificationTask(TimmExport):
    name = "classification"
    stage = "fine-tuning"
    weights_file = "model.safetensors"
    meta_file = None
    pipeline_tag = "image-classification"
    capabilities = frozenset({"timm_export", "evaluate", "external", "out"})

    def training_data(self, recipe) -> TrainData:
        return image_training_data(recipe)

    def build(self, recipe, data: TrainData):
        from medfound.adapt.tasks import endpoint
        from medfound.evaluate.metrics import positive_index

        m = data.manifests[0]
        split = recipe.data.train_split
        schema = endpoint(m.label_schema, recipe.head.binary_threshold)
        if schema.type != "multilabel":  # a head.positive_class that names no class fails before training
            positive_index(schema.names, recipe.head.positive_class)
        task = HEADS.build(recipe.head.type, recipe, m.label_schema, m.class_counts(split),
                           m.counts["by_split"].get(split))
        check_img_size(task.model, recipe.data.img_size)
        return task

    def parameter_table(self, module, recipe) -> None:
        from medfound.adapt.tuning import print_parameter_table

        print_parameter_table(module.model, recipe.tuning, module.classifier)

    def train_loader(self, recipe, data: TrainData, ctx):
        from medfound.data.loaders import class_keep_rates, image_train_loader, train_image_transform

        keep = class_keep_rates(recipe.data, data.manifests[0], recipe.head.binary_threshold)
        return image_train_loader(recipe.data, recipe.trainer.seed, data.sets, data.manifests,
                                  train_image_transform(recipe.data), labelled=True, class_keep=keep)

    def describe(self, recipe, data: TrainData) -> str:
        from medfound.adapt.tasks import endpoint

        schema = endpoint(data.manifests[0].label_schema, recipe.head.binary_threshold)
        loss = "sigmoid binary cross-entropy per finding" if schema.type == "multilabel" else "cross-entropy"
        return f"{tuning_text(recipe, TUNING_TEXT)}, {loss}"

    def lineage(self, recipe, state, data: TrainData) -> dict[str, Any]:
        record = lineage(recipe, state, data.manifests, self.stage, self.describe(recipe, data),
                         parent_lineage(recipe.backbone))
        record["label_schema"] = state.module.label_schema.model_dump()  # the endpoint trained
        record["tuning"] = recipe.tuning
        return record

    def export(self, recipe, module, lineage: dict[str, Any], data: TrainData, export: Path) -> dict[str, Any]:
        from medfound.adapt.tuning import merged_copy
        from medfound.publish.export import export_model

        adapter = module.model if recipe.tuning == "lora" else None
        diff = export_model(merged_copy(module.model), export, data=recipe.data, lineage=lineage,
                            license=recipe.card.license, label_names=module.label_schema.names, adapter=adapter,
                            adapter_base_model=recipe.backbone.weights)
        return {"reload_max_abs_diff": diff}

    def rebuild(self, run_dir: Path, recipe) -> Any:
        """The trained classifier rebuilt from the recipe and the newest checkpoint, LoRA merged."""
        from medfound.adapt.tasks import build_classification_task
        from medfound.adapt.tuning import merged_copy
        from medfound.data.manifest import LabelSchema
        from medfound.publish.export import read_lineage
        from medfound.train.checkpoint import load_checkpoint

        export = Path(run_dir) / "export"
        schema = LabelSchema(**read_lineage(export)["label_schema"])
        # loss weights do not change the network; the lineage's schema is already the trained endpoint
        head = recipe.head.model_copy(update={"class_weights": None, "binary_threshold": None})
        task = build_classification_task(recipe.model_copy(update={"backbone": backbone_structure(recipe, export),
                                                                   "head": head}), schema)
        load_checkpoint(self.checkpoint(run_dir), task)
        return merged_copy(task.model)

    def evaluate(self, run, recipe, split: str, out: Path) -> dict[str, Any]:
        from medfound.evaluate.report import evaluate_classification

        return evaluate_classification(self.load(run.export, recipe), run.export / self.weights_file, recipe, split,
                                       out)
