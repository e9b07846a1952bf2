"""Task kind `segmentation`: a registered segmentation network (ViT heads UNETR / TransUNet over a backbone, or
MONAI's U-Net / Attention U-Net / V-Net) with Dice + cross-entropy; the export is `segmenter.safetensors` +
`segmenter.json` (and, for ViT heads in 2-D, the adapted backbone as a timm folder in export/backbone)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medfound.io import atomic_write_bytes, atomic_write_json
from medfound.publish.licences import for_export
from medfound.run import backbone_structure, lineage, parent_lineage
from medfound.tasks.base import NETWORK_SNIPPET, TrainData, load_strict, register_task
from medfound.tasks.images import ImageNetwork

TUNING_TEXT = {"lora": "LoRA (r={r}, alpha={alpha})", "full": "full fine-tuning", "linear_probe": "frozen backbone",
               "last_k": "last {k} blocks"}


@register_task
class SegmentationTask(ImageNetwork):
    name = "segmentation"
    weights_file = "segmenter.safetensors"
    meta_file = "segmenter.json"
    pipeline_tag = "image-segmentation"

    def build(self, recipe, data: TrainData):
        from medfound.adapt.tasks import build_segmentation_task

        return build_segmentation_task(recipe)

    def train_loader(self, recipe, data: TrainData, ctx):
        from medfound.data.loaders import image_train_loader
        from medfound.data.seg_transforms import build_seg_transform

        transform = build_seg_transform(recipe.segment, train=True, window=recipe.data.window)
        return image_train_loader(recipe.data, recipe.trainer.seed, data.sets, data.manifests, transform,
                                  labelled=False, keys=data.keys)

    def normalizer(self, recipe):
        """ImageNet statistics on the device for 2-D `imagenet` intensity; None where the transform already
        normalised (z-score, CT)."""
        from medfound.data.loaders import normalizer

        seg = recipe.segment
        return normalizer(recipe.data) if seg.intensity == "imagenet" and seg.spatial_dims == 2 else None

    def describe(self, recipe, data: TrainData) -> str:
        tuning = TUNING_TEXT[recipe.tuning].format(r=recipe.lora.r, alpha=recipe.lora.alpha, k=recipe.last_k)
        return f"{recipe.head.type} segmentation, {tuning}, Dice + cross-entropy"

    def lineage(self, recipe, state, data: TrainData) -> dict[str, Any]:
        record = lineage(recipe, state, data.manifests, self.stage, self.describe(recipe, data),
                         parent_lineage(recipe.backbone))
        from medfound.data.scale import scale_stats

        record.update(tuning=recipe.tuning, head=recipe.head.model_dump(),
                      segment=recipe.segment.model_dump(mode="json"),
                      scale=scale_stats(recipe.data.shards[0], recipe.data.train_split))  # the scale it expects
        return record

    def export(self, recipe, module, lineage: dict[str, Any], data: TrainData, export: Path) -> dict[str, Any]:
        from types import SimpleNamespace

        from safetensors.torch import save

        from medfound.adapt.tuning import merged_copy, merged_segmenter
        from medfound.publish.export import export_model

        seg = recipe.segment
        merged = merged_segmenter(module.model).eval()
        if module.vit is not None and seg.spatial_dims == 2:  # the adapted backbone, reusable as a timm model
            prep = SimpleNamespace(mean=recipe.data.mean, std=recipe.data.std, img_size=seg.patch_size[-1])
            export_model(merged_copy(merged.net.encoder.vit), export / "backbone", data=prep, lineage=lineage,
                         license=for_export(recipe.card.license, lineage), adapter=module.vit if recipe.tuning == "lora" else None,
                         adapter_base_model=recipe.backbone.weights)
        state_dict = {k: v.detach().contiguous() for k, v in merged.state_dict().items()}
        atomic_write_bytes(export / self.weights_file, save(state_dict))
        atomic_write_json(export / self.meta_file, {"medfound": lineage, "class_names": seg.names,
                                                    "head": recipe.head.model_dump(),
                                                    "segment": seg.model_dump(mode="json")})
        return {}

    def load(self, folder: Path, recipe) -> Any:
        """The trained network rebuilt from the recipe (the ViT's structure from export/backbone/config.json) and
        loaded strictly from export/segmenter.safetensors; eval mode. `[B, C, *S]` -> logits `[B, K, *S]`."""
        from medfound.adapt.tasks import build_segmentation_task

        export = Path(folder) / "export"
        update: dict[str, Any] = {"tuning": "full"}
        if recipe.backbone is not None and (export / "backbone" / "config.json").is_file():
            update["backbone"] = backbone_structure(recipe, export / "backbone")
        task = build_segmentation_task(recipe.model_copy(update=update))
        load_strict(task.model, export / self.weights_file, "network")
        return task.model.eval()

    def evaluate(self, run, recipe, split: str, out: Path) -> dict[str, Any]:
        from medfound.evaluate.report import evaluate_segmentation

        return evaluate_segmentation(self.load(run.path, recipe), self.normalizer(recipe),
                                     run.export / self.weights_file, recipe, split, out)

    def publish_details(self, recipe, meta: dict[str, Any], export: Path) -> tuple[list, dict[str, Any]]:
        seg = recipe.segment
        details = [("classes", ", ".join(seg.names))]
        input_cfg = {"spatial_dims": seg.spatial_dims, "patch_size": seg.patch_size, "overlap": seg.overlap,
                     "intensity": seg.intensity, "clip": seg.clip, "stats": seg.stats, "spacing": seg.spacing}
        if seg.intensity == "imagenet":
            input_cfg.update(mean=list(recipe.data.mean), std=list(recipe.data.std))
        return details, input_cfg

    def load_snippet(self) -> str:
        return NETWORK_SNIPPET.format(folder="PATH_TO_THIS_FOLDER", what="the segmentation network, eval mode") + """
# probs = medfound.evaluate.segmentation.predict_probs(model, image[None], patch_size, overlap)  # [1, K, *S]"""
