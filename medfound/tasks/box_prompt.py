"""Task kind `box_prompt`: MedSAM-style box-prompt segmentation (head.type=box_prompt). Each training sample is one
image and one structure's mask; the box comes from the mask (jittered). The export is
`prompt_segmenter.safetensors` + `prompt_segmenter.json` and the adapted backbone as a timm folder in
export/backbone. Evaluation predicts every sample from its mask's tight box on the original image (Dice per sample,
per structure and overall, with bootstrap intervals), on the internal split and on every external set."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np

from medfound.adapt.prompt import (BoxPredictor, box_from_mask, build_prompt_task, build_prompt_transform,
                                   read_box_table, segment_boxes)
from medfound.adapt.tuning import merged_copy, merged_segmenter
from medfound.data.loaders import image_train_loader, normalizer
from medfound.data.manifest import read_manifest
from medfound.data.pipeline import Decoding, Reading, make_loader, shard_urls
from medfound.evaluate.bootstrap import percentile_interval, resample_means
from medfound.evaluate.markdown import overlay_picture
from medfound.evaluate.procedure import ScoredSet, Scorer
from medfound.evaluate.records import dataset_block, split_urls, trained_modalities
from medfound.publish.export import export_model
from medfound.publish.licences import for_export
from medfound.run import backbone_structure, lineage, parent_lineage
from medfound.run.selection import build_selection
from medfound.tasks.base import NETWORK_SNIPPET, TrainData, load_strict, register_task
from medfound.tasks.images import ImageNetwork, warmup_words



@register_task
class BoxPromptSpec(ImageNetwork):
    name = "box_prompt"
    weights_file = "prompt_segmenter.safetensors"
    meta_file = "prompt_segmenter.json"
    pipeline_tag = "mask-generation"

    def build(self, recipe, data: TrainData):
        return build_prompt_task(recipe)

    def train_loader(self, recipe, data: TrainData, ctx):
        d, h = recipe.data, recipe.head
        transform = build_prompt_transform(d.img_size, h.mask, h.box_jitter, train=True, augment=h.augment,
                                           crop_to_box=h.crop_to_box, window=d.window)
        return image_train_loader(d, recipe.trainer.seed, data.sets, data.manifests, transform, labelled=False,
                                  keys=data.keys)

    def normalizer(self, recipe):
        return normalizer(recipe.data)

    def describe(self, recipe, data: TrainData) -> str:
        return (f"box-prompt segmentation (MedSAM-style), {recipe.tuning}{warmup_words(recipe)}, Dice + BCE, boxes "
                f"from masks jittered by up to {recipe.head.box_jitter} px")

    def lineage(self, recipe, state, data: TrainData) -> dict[str, Any]:
        record = lineage(recipe, state, data.manifests, self.stage, self.describe(recipe, data),
                         parent_lineage(recipe.backbone))
        record.update(tuning=recipe.tuning, head=recipe.head.model_dump())
        return record

    def export(self, recipe, module, lineage: dict[str, Any], data: TrainData, export: Path) -> dict[str, Any]:
        from types import SimpleNamespace

        d, h = recipe.data, recipe.head
        merged = merged_segmenter(module.model).eval()
        prep = SimpleNamespace(mean=d.mean, std=d.std, img_size=d.img_size)
        export_model(merged_copy(merged.net.encoder.vit), export / "backbone", data=prep, lineage=lineage,
                     license=for_export(recipe.card.license, lineage), adapter=module.vit if recipe.tuning == "lora" else None,
                     adapter_base_model=recipe.backbone.weights)
        return self.format(recipe).write(self, recipe, merged, export, lineage=lineage, meta={
            "medfound": lineage, "head": h.model_dump(), "img_size": d.img_size, "mean": list(d.mean),
            "std": list(d.std)})

    def network(self, export: Path, recipe):
        """The trained network, rebuilt from the recipe (the ViT's structure from export/backbone) and loaded
        strictly; eval mode."""

        export = Path(export)

        structure = backbone_structure(recipe, export / "backbone")
        task = build_prompt_task(recipe.model_copy(update={"tuning": "full", "backbone": structure}))
        load_strict(task.model, export / self.weights_file, "network")
        return task.model.eval()

    def load_network(self, export: Path, recipe, device=None):
        """A BoxPredictor: `predict(image, boxes)` -> one boolean mask per box at the image's resolution."""
        import torch

        meta = json.loads((Path(export) / self.meta_file).read_text())
        return BoxPredictor(self.network(export, recipe), meta["img_size"], meta["mean"], meta["std"],
                            device or ("cuda" if torch.cuda.is_available() else "cpu"), meta["head"].get("crop_to_box"))

    def selection(self, recipe, data: TrainData, run_dir: Path) -> Any:
        """eval.every: every structure of eval.select_split predicted from its mask's tight box by the evaluation's
        own code, mean Dice by default (or dice_by_structure_mean), the best step exported (medfound.run.selection)."""

        m = data.manifests[0]
        return build_selection(recipe, m.counts["by_split"], m.label_schema.names, run_dir, "dice",
                               lambda module, keys: self.validate(recipe, module, keys))

    def validate(self, recipe, module, keys: Any = None) -> dict[str, Any]:
        """Mean Dice (and the mean over structures) of the training network on eval.select_split (only `keys`),
        every sample predicted from its mask's tight box as evaluation does; no intervals."""

        d, ev = recipe.data, recipe.eval
        device = str(next(module.model.parameters()).device)
        predictor = BoxPredictor(module.model, d.img_size, d.mean, d.std, device, recipe.head.crop_to_box)
        urls = shard_urls([d.shards[0]], ev.select_split)[0]
        rows, _ = score_boxes(predictor, urls, read_manifest(d.shards[0]), recipe.head.mask,
                              f"eval.select_split={ev.select_split!r} of {d.shards[0]}", keys=keys, overlays=0)
        return box_metrics(rows)

    predict_options = frozenset({"boxes", "box_table", "box_format", "threshold", "modality"})  # what predict reads

    def predict(self, run, recipe, staged, out: Path, rt, *, boxes: Any = None, box_table: Any = None, box_format: str = "xyxy", threshold: float = 0.5,
                modality: Any = None) -> list[dict[str, Any]]:
        """`medfound predict RUN IMAGE... --box x0,y0,x1,y1 [--box ...]` (the same boxes on every image) or
        `--boxes TABLE.csv` (columns `input,x0,y0,x1,y1`, one row per structure; `input` as given on the command
        line or the file's name): per input `masks/KEY/mask_<i>.png` (0/255, one per box) and `overlay.png`, written
        by `medfound prompt`'s own code; predictions.csv has a row per box (input, box, mask, pixels) and the
        warnings (empty or full masks, an image unlike the training modalities) reach summary.json and the console."""
        from tqdm.auto import tqdm

        if staged.kind != "images":
            raise ValueError(f"a box-prompt model reads image files (PNG, JPEG, TIFF), not {staged.kind}: export the "
                             "slices as images first")
        if (boxes is None) == (box_table is None):
            raise ValueError("a box-prompt model needs the boxes to segment: --box x0,y0,x1,y1 (repeat for several; "
                             "the same on every image) or --boxes TABLE.csv (input,x0,y0,x1,y1 per structure)")
        per_input = read_box_table(box_table, staged.names) if box_table is not None else None
        predictor = self.load_network(run.export, recipe, device=str(rt.torch_device()))
        modalities = trained_modalities(run.export)
        skipped = {ref for ref, _ in staged.skipped}
        rows: list[dict[str, Any]] = []
        warned = rt.warnings
        for key in tqdm(sorted(staged.names), desc="predict", unit="img", disable=not rt.progress):
            if f"input #{int(key)}" in skipped:
                continue
            these = per_input.get(key, []) if per_input is not None else boxes
            if not these:
                warned.append(f"input #{int(key)}: no box in {box_table}; not predicted")
                continue
            _, said = segment_boxes(predictor, staged.names[key], these, out / "masks" / key, threshold=threshold,
                                    box_format=box_format, modalities=modalities, modality=modality)
            warned += [f"input #{int(key)}: {w}" for w in said]
            from PIL import Image

            for i, b in enumerate(these):
                with Image.open(out / "masks" / key / f"mask_{i}.png") as m:
                    pixels = int((np.asarray(m) > 0).sum())
                rows.append({"input": staged.name(key), "key": key, "box": i, "box_xyxy": ",".join(
                    f"{v:g}" for v in (b if box_format == "xyxy" else [b[0], b[1], b[0] + b[2], b[1] + b[3]])),
                    "mask": f"masks/{key}/mask_{i}.png", "overlay": f"masks/{key}/overlay.png", "pixels": pixels})
        return rows

    def scorer(self, run, recipe, out: Path) -> Any:
        return BoxScorer(self.load(run.export, recipe), recipe, run.export, run.export / self.weights_file)

    def publish_details(self, recipe, meta: dict[str, Any], export: Path) -> tuple[list, dict[str, Any]]:
        input_cfg = {"input_size": meta.get("img_size"), "mean": list(recipe.data.mean), "std": list(recipe.data.std),
                     "prompt": "one box per structure, x0,y0,x1,y1 in pixels", "crop_to_box": recipe.head.crop_to_box}
        return [], input_cfg

    def load_snippet(self) -> str:
        return NETWORK_SNIPPET.format(folder="PATH_TO_THIS_FOLDER", what="a BoxPredictor") + \
            "\n# masks = model.predict(image, [[x0, y0, x1, y1]])  # one boolean mask per box"


def score_boxes(predictor, urls: list[str], manifest, mask_name: str, what: str, keys: Any = None,
                overlays: int = 4) -> tuple[list[dict], list[dict]]:
    """Every sample of `urls` (only `keys` when given) predicted from its mask's tight box -> per-sample rows and up
    to `overlays` overlays."""

    names = manifest.label_schema.names

    def raw(sample):
        return {"image": np.asarray(sample["image"]), "mask": np.asarray(sample["masks"][mask_name])}

    loader = make_loader(urls, Decoding(raw, labelled=manifest.label_schema.type != "none"), batch_size=1,
                         reading=Reading(verify="sha256", split_by_node=keys is None, keys=keys),
                         collate_fn=lambda s: s[0])
    n_overlays, rows, overlays = overlays, [], []
    for sample in loader:
        m = sample["mask"]
        m = (m.max(axis=-1) if m.ndim == 3 else m) > 0
        box = box_from_mask(m)
        pred = predictor.predict(sample["image"], [box])[0]
        dice = 2 * float((pred & m).sum()) / max(1, int(pred.sum() + m.sum()))
        label = sample.get("label")
        rows.append({"key": sample["key"], "structure": names[label] if label is not None and names else None,
                     "box": [round(v, 1) for v in box], "dice": round(dice, 4), "pixels": int(m.sum())})
        if len(overlays) < n_overlays:
            img = np.asarray(sample["image"], dtype=np.float32)
            overlays.append(overlay_picture(sample["key"], img[None] if img.ndim == 2 else np.moveaxis(img, -1, 0),
                                            m.astype(np.uint8), pred.astype(np.uint8), {"dice/box": dice}))
    if not rows:
        raise ValueError(f"{what} yielded no samples")
    return rows, overlays


def structures(rows: list[dict]) -> dict[str, list[float]]:
    """The per-sample Dice values of each structure (the shard label; "all" without one)."""
    per_structure: dict[str, list[float]] = {}
    for r in rows:
        per_structure.setdefault(r["structure"] or "all", []).append(r["dice"])
    return per_structure


def box_metrics(rows: list[dict]) -> dict[str, float]:
    """Mean Dice over samples and the mean over structures of their mean Dice."""
    per_structure = structures(rows)
    return {"dice": round(float(np.mean([r["dice"] for r in rows])), 4),
            "dice_by_structure_mean": round(float(np.mean([np.mean(v) for v in per_structure.values()])), 4)}


def dice_summary(rows: list[dict], ev, keep_values: bool = False) -> dict[str, Any]:
    """Mean Dice, mean of the per-structure means, per-structure values and (eval.bootstrap > 0) the 95% percentile
    bootstrap interval of the mean Dice over samples (`values`: the resampled means, for drop intervals)."""
    per_structure = structures(rows)
    metrics = box_metrics(rows)
    boot = None
    if ev.bootstrap:
        means = resample_means(np.array([[r["dice"]] for r in rows]), ev.bootstrap, ev.seed)[:, 0]
        boot = {"intervals": {"dice": percentile_interval(means)}, "resamples": ev.bootstrap, "seed": ev.seed,
                "level": 0.95, "method": "percentile bootstrap over samples",
                **({"values": {"dice": means}} if keep_values else {})}
    return {"metrics": metrics, "boot": boot,
            "per_structure": {k: {"dice": round(float(np.mean(v)), 4), "n": len(v)}
                              for k, v in sorted(per_structure.items())}}


class BoxScorer(Scorer):
    """Box prompts: every sample's structure segmented from the tight box of its ground-truth mask, Dice per sample
    and structure with a bootstrap interval of the mean; overlays for the report; no predictions.csv."""

    def __init__(self, predictor, recipe, export: Path, weights: Path) -> None:
        super().__init__(recipe, export, weights)
        self.predictor = predictor

    def score(self, where: str, split: Optional[str], external: bool, keep_values: bool) -> ScoredSet:
        urls, manifest, splits = split_urls(where, split)
        rows, overlays = score_boxes(self.predictor, urls, manifest, self.recipe.head.mask,
                                     f"external set {where}" if external else f"split '{split}' of {where}")
        summary = dice_summary(rows, self.recipe.eval, keep_values=keep_values)
        result = {"metrics": summary["metrics"], "per_structure": summary["per_structure"],
                  **({"bootstrap": summary["boot"]} if summary["boot"] else {})}
        return ScoredSet(manifest.name if external else "internal", where, splits, len(rows), result, {},
                         (manifest.digest,), dataset_block(manifest, where, split, len(rows)), rows, overlays)

    def body(self, internal: ScoredSet) -> dict[str, Any]:
        boot = internal.result.get("bootstrap")
        return {
            "metrics": internal.result["metrics"],
            "per_structure": internal.result["per_structure"],
            **({"intervals": boot["intervals"],
                "bootstrap": {k: v for k, v in boot.items() if k not in ("intervals", "values")}} if boot else {}),
            "per_sample": internal.rows,
            "definitions": {"dice": "mean over samples of 2|P∩G|/(|P|+|G|) at the original resolution, each "
                                    "predicted from the tight bounding box of its ground-truth mask (no jitter), "
                                    "threshold 0.5",
                            "dice_by_structure_mean": "mean over structures of their mean Dice"},
        }

    def external_fields(self, scored: ScoredSet) -> dict[str, Any]:
        return {"per_structure": scored.result["per_structure"]}

    def report_inputs(self, sets: list[ScoredSet]) -> dict[str, Any]:
        return {"overlays": {s.name: s.pictures for s in sets}}
