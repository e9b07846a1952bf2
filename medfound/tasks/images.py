"""What the image task kinds share: reading the training shard sets, the input-size check, and the behaviour of
the kinds whose export is a timm folder (pretraining, classification): the checkpoint a rebuild starts from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medfound.adapt.tuning import print_parameter_table
from medfound.data.fractions import training_subset
from medfound.data.loaders import normalizer
from medfound.data.pipeline import shard_sets
from medfound.tasks.base import TaskBase, TrainData
from medfound.train.checkpoint import latest_checkpoint


def image_training_data(recipe) -> TrainData:
    """The training split's shard paths per set, the sets' manifests, and the labelled subset the recipe asks for
    (`data.train_fraction` / `data.train_shots`, medfound.data.fractions)."""

    d = recipe.data
    sets, manifests = shard_sets(d.shards, d.train_split)
    subset = training_subset(d, d.shards[0], d.train_split, manifests[0].label_schema.names)
    return TrainData(sets, manifests, subset=subset)


def check_img_size(model, img_size: int) -> None:
    """A timm ViT with a fixed input size must be trained at that size."""
    pe = getattr(model, "patch_embed", None)
    if pe is not None and getattr(pe, "strict_img_size", False) and tuple(pe.img_size) != (img_size, img_size):
        raise ValueError(f"data.img_size={img_size} but the backbone takes {tuple(pe.img_size)} images; set "
                         f"data.img_size={pe.img_size[0]} or backbone.model_args.img_size={img_size}")


class TimmExport(TaskBase):
    """Task kinds whose export (RUN_DIR/export) is a timm `local-dir:` folder (the `timm_folder` format)."""

    export_format = "timm_folder"

    def normalizer(self, recipe):
        return normalizer(recipe.data)

    @staticmethod
    def checkpoint(run_dir: Path) -> Path:
        ckpt = latest_checkpoint(Path(run_dir) / "checkpoints")
        if ckpt is None:
            raise FileNotFoundError(f"{run_dir} has no checkpoint (checkpoints/last)")
        return ckpt

    def selection(self, recipe, data: TrainData, run_dir: Path) -> Any:
        return None  # pretraining has no labels to select on (classification overrides this)


class ImageNetwork(TaskBase):
    """Image task kinds whose network is a medfound module with its ViT (if any) at `model.net.encoder.vit`
    (segmentation, box prompts): the `network` export format, shard-set training data and the parameter table
    over that ViT."""

    export_format = "network"
    capabilities = frozenset({"evaluate", "external", "out"})
    stage = "fine-tuning"

    def training_data(self, recipe) -> TrainData:
        return image_training_data(recipe)

    def parameter_table(self, module, recipe) -> None:
        print_parameter_table(module, recipe.tuning, backbone="model.net.encoder.vit.")  # a CNN: all head


def tuning_words(recipe, texts: dict[str, str]) -> str:
    """How a fine-tuning recipe adapts its backbone, in the words of the card's training stage: the tuning's text
    from `texts` (per kind), then the head warm-up when the recipe has one (LP-FT)."""
    return texts[recipe.tuning].format(r=recipe.lora.r, alpha=recipe.lora.alpha, k=recipe.last_k) + warmup_words(recipe)


def warmup_words(recipe) -> str:
    """The head warm-up of a fine-tuning recipe (head_warmup_steps, LP-FT) as the card's stage says it; "" without."""
    return f" after {recipe.head_warmup_steps} steps of the head alone (LP-FT)" if recipe.head_warmup_steps else ""
