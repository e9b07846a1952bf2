"""The scorers of image models on shard sets (medfound.evaluate.procedure runs them): classification (softmax /
sigmoid probabilities, per-site and external results, units of several images) and segmentation (sliding-window
inference, Dice/HD95 per image and class).

The model is given by the caller, loaded by its task kind (`medfound.tasks`): for classification the timm folder
`RUN_DIR/export` exactly as `medfound publish` ships it, evaluated with the run's own preprocessing.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from medfound.config import FinetuneRecipe
from medfound.config.eval import EVALUATE_SCALE_KEYS
from medfound.data.loaders import eval_image_transform, normalizer, prepare
from medfound.data.pipeline import Decoding, Reading, make_loader
from medfound.evaluate.metrics import classification_metrics, multilabel_metrics, positive_index, score_with_sites
from medfound.evaluate.procedure import ScoredSet, Scorer
from medfound.evaluate.records import (dataset_block, eval_progress, network_lineage, scored_block, split_urls,
                                       write_predictions, write_rows)
from medfound.adapt.tasks import endpoint
from medfound.data.manifest import read_manifest
from medfound.data.scale import require_spacing
from medfound.data.seg_transforms import build_seg_transform, check_mask_members
from medfound.evaluate.metrics import aggregate_units
from medfound.evaluate.segmentation import CONVENTIONS, auto_target, score_loader


@torch.no_grad()
def predict(model: torch.nn.Module, loader, normalize: torch.nn.Module, multilabel: bool = False, bar=None
            ) -> tuple[np.ndarray, np.ndarray, list[str], list[Optional[str]], list[str], list[dict]]:
    """Probabilities `[N, K]` (softmax; multi-label: a sigmoid per finding), labels (`[N]`, or multi-hot `[N, K]`),
    keys and sites for every sample of `loader`, the reports of samples skipped as undecodable, and the samples'
    kept meta fields (`make_loader(keep_meta=...)`; empty otherwise). `bar` (`eval_progress`) counts the images."""
    model.eval()
    probs, labels, keys, sites, skipped, metas = [], [], [], [], [], []
    for batch in loader:
        if bar is not None:
            bar.update(len(batch["key"]) + len(batch.get("_bad", [])))
        skipped += batch.pop("_bad", [])
        metas += batch.get("meta", [])
        logits = model(normalize(batch["image"])).float()
        probs.append((torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=1)).numpy())
        labels.append(batch["label"].numpy())
        keys += batch["key"]
        sites += batch.get("site", [None] * len(batch["key"]))
    if bar is not None:
        bar.close()
    if not probs:
        raise ValueError("the evaluation split yielded no samples")
    return np.concatenate(probs), np.concatenate(labels), keys, sites, skipped, metas


# classification inputs are resized whole to data.img_size (or resampled to data.spacing_mm), which evens out pixel
# spacing; only tile resolution (a fixed tile size at another um/px is another field) is compared
CLASSIFICATION_NORMALISED = ("spacing_mm", "fov_diameter_px", "structure_px")


def normalised_scale(seg: Any) -> tuple[str, ...]:
    """The scale keys (medfound.data.scale) that a segmentation run's resampling makes equal for every set:
    segment.fov_diameter evens out the field of view, segment.mpp the um/px, segment.spacing (each image resampled
    from its own spacing) the pixel spacing; segment.scale, one factor for every set, evens out none of them, but the
    user chose it for this set, so none is compared."""
    if seg.spacing is not None:
        return ("spacing_mm", "structure_px")
    if seg.fov_diameter:  # the masks' structure size is known in native pixels only: not comparable after resampling
        return ("fov_diameter_px", "structure_px")
    if seg.mpp:
        return ("mpp", "structure_px")
    return ("fov_diameter_px", "spacing_mm", "mpp", "structure_px") if seg.scale else ()


class ProbabilityScorer(Scorer):
    """What the scorers of class probabilities share (classification, MIL): `self.schema` names the classes; the
    header, the external sets' calibration, predictions.csv and the report's curves come from the probabilities
    kept in each set's rows `(probs, labels, keys, sites)`."""

    schema: Any

    def header(self, internal: ScoredSet) -> dict[str, Any]:
        return {"label_type": self.schema.type, "class_names": self.schema.names}

    def external_fields(self, scored: ScoredSet) -> dict[str, Any]:
        return {"calibration": scored.result["calibration"]}

    def write_predictions(self, path: Path, sets: list[ScoredSet]) -> None:
        write_predictions(path, self.schema.names, [(s.name, *s.rows) for s in sets])

    def report_inputs(self, sets: list[ScoredSet]) -> dict[str, Any]:
        return {"predictions": [(s.name, *s.rows) for s in sets]}


class ClassificationScorer(ProbabilityScorer):
    """Classification, multi-label and ordinal: probabilities per image, metrics with bootstrap intervals, per site,
    units of several images (eval.aggregate), calibration; externals must share the label schema."""

    scale = CLASSIFICATION_NORMALISED

    def __init__(self, model: torch.nn.Module, recipe: FinetuneRecipe, export: Path, weights: Path) -> None:
        super().__init__(recipe, export, weights)
        self.model = model
        self.manifest = read_manifest(recipe.data.shards[0])
        self.threshold = recipe.head.binary_threshold
        self.schema = endpoint(self.manifest.label_schema, self.threshold)
        self.multilabel = self.schema.type == "multilabel"
        self.positive = positive_index(self.schema.names, recipe.head.positive_class) if not self.multilabel else 1

    def check(self, internal: str, split: str, externals: list[str]) -> None:
        if self.recipe.data.spacing_mm is not None:  # every scored set must carry pixel spacings
            for where in [internal, *externals]:
                require_spacing(where, f"shard set {where}")

    def score(self, where: str, split: Optional[str], external: bool, keep_values: bool) -> ScoredSet:
        d, ev, agg = self.recipe.data, self.recipe.eval, self.recipe.eval.aggregate
        urls, manifest, splits = split_urls(where, split)
        if external and endpoint(manifest.label_schema, self.threshold).names != self.schema.names:
            raise ValueError(f"external set {where} has classes {endpoint(manifest.label_schema, self.threshold).names}"
                             f", the model {self.schema.names}: an external set must share the label schema (re-shard "
                             "it with the same class names)")
        name = manifest.name if external else "internal"
        bar = eval_progress(manifest, splits, f"external {manifest.name}" if external else f"evaluate {split}",
                            self.recipe.trainer.progress)
        loader = make_loader(urls, Decoding(prepare(d, eval_image_transform(d)), labelled=True,
                                            num_classes=self.manifest.label_schema.num_classes,  # stored range
                                            multilabel=self.multilabel, max_bad_fraction=d.max_bad_fraction,
                                            keep_meta=agg.by if agg and not external else ()),
                             batch_size=d.eval_batch_size, reading=Reading(verify="sha256"), num_workers=d.num_workers)
        probs, labels, keys, sites, skipped, metas = predict(self.model, loader, normalizer(d), self.multilabel, bar)
        if self.threshold is not None:
            labels = (labels >= self.threshold).astype(np.int64)
        label = f"external {manifest.name}" if external else split
        result, by_site = score_with_sites(probs, labels, sites, self.schema.type, self.schema.names, label,
                                           ev.bootstrap, ev.seed, ev.specificity, keep_values=keep_values,
                                           interval=ev.interval, min_per_class=ev.min_per_class,
                                           positive=self.positive)
        warnings = list(result["warnings"])
        if external:
            warnings += [f"external {manifest.name}: {len(skipped)} undecodable samples skipped"] if skipped else []
        elif agg is not None:
            result["units"] = self._units(probs, labels, metas, split)
            warnings += result["units"].pop("warnings")
        return ScoredSet(name, where, splits, len(labels), result, by_site, (manifest.digest,),
                         dataset_block(manifest, where, split, len(labels)), (probs, labels, keys, sites),
                         warnings=warnings, skipped=[] if external else skipped)

    def _units(self, probs: np.ndarray, labels: np.ndarray, metas: list[dict], split: str) -> dict[str, Any]:
        """eval.aggregate: the images' probabilities combined per unit (a breast from its views) and scored."""
        agg = self.recipe.eval.aggregate
        ids = [tuple(str(m[f]) for f in agg.by) for m in metas]
        up, uy, _ = aggregate_units(probs, labels, ids, agg.reduce)
        scored = multilabel_metrics(up, uy, self.schema.names, split=f"{split}/units") if self.multilabel else \
            classification_metrics(up, uy, self.schema.type, self.schema.names, split=f"{split}/units",
                                   positive=self.positive)
        return {"by": agg.by, "reduce": agg.reduce, "n": int(len(uy)), "images": int(len(labels)),
                "metrics": scored["metrics"], "per_class": scored["per_class"], "warnings": scored["warnings"]}

    def body(self, internal: ScoredSet) -> dict[str, Any]:
        units = internal.result.get("units")
        return {**scored_block(internal.result, internal.by_site, self.schema.type),
                **({"units": units} if units else {})}


class SegmentationScorer(Scorer):
    """Segmentation: sliding-window inference over every image at its native geometry, Dice/HD95 per image and
    class and pooled pixel metrics with bootstrap intervals, per site, overlays for the report."""

    n_overlays = 4

    def __init__(self, model: torch.nn.Module, normalize: Optional[torch.nn.Module], recipe: FinetuneRecipe,
                 export: Path, weights: Path, trained_segment: Any = None) -> None:
        """`recipe.segment` scores the external sets (with any evaluate-time scale override); `trained_segment`
        (the run's own) scores the internal split, as trained, so a drop compares like with like."""
        super().__init__(recipe, export, weights)
        self.model, self.normalize = model, normalize
        self.internal_segment = trained_segment or recipe.segment
        self.overrides = {k: getattr(recipe.segment, k) for k in EVALUATE_SCALE_KEYS
                          if getattr(recipe.segment, k) != getattr(self.internal_segment, k)}
        self.scale = normalised_scale(recipe.segment)
        seg = recipe.segment
        self.scale_targets = {k: v for k, v in (("fov_diameter_px", seg.fov_diameter), ("mpp", seg.mpp)) if v}

    def check(self, internal: str, split: str, externals: list[str]) -> None:
        seg = self.recipe.segment  # every set has the masks scoring needs, before the internal split is scored
        check_mask_members(split_urls(internal, split)[1], [seg.mask, seg.roi],
                           f"split '{split}' of {internal}")
        for ext in externals:
            check_mask_members(split_urls(ext, self.recipe.eval.external_split)[1], [seg.mask, seg.roi],
                               f"external set {ext}")

    def score(self, where: str, split: Optional[str], external: bool, keep_values: bool) -> ScoredSet:
        seg = self.recipe.segment if external else self.internal_segment
        d, ev = self.recipe.data, self.recipe.eval
        urls, manifest, splits = split_urls(where, split)
        bar = eval_progress(manifest, splits, f"external {manifest.name}" if external else f"evaluate {split}",
                            self.recipe.trainer.progress)
        loader = make_loader(urls, Decoding(prepare(d, build_seg_transform(seg, train=False, window=d.window)),
                                            max_bad_fraction=d.max_bad_fraction), batch_size=1,
                             reading=Reading(verify="sha256"), num_workers=d.num_workers)
        scorer, skipped, overlays = score_loader(self.model, self.normalize, loader, seg, hd=seg.hd95, bar=bar,
                                                 n_overlays=self.n_overlays, tta=ev.tta_scales,
                                                 auto_target=self.auto_target if seg.scale == "auto" else None)
        bar.close()
        if not scorer.per_image:
            raise ValueError(f"{f'external set {where}' if external else f'split {split!r} of {where}'} yielded "
                             "no samples to evaluate")
        result = scorer.result()
        if ev.bootstrap:
            result["bootstrap"] = scorer.bootstrap(ev.bootstrap, ev.seed, keep_values=keep_values)
        warnings = [f"external {manifest.name}: {len(skipped)} undecodable samples skipped"] \
            if external and skipped else []
        return ScoredSet(manifest.name if external else "internal", where, splits, len(scorer.per_image), result,
                         scorer.by_site(ev.bootstrap, ev.seed), (manifest.digest,),
                         dataset_block(manifest, where, split, len(scorer.per_image)), result["per_image"],
                         overlays, warnings, [] if external else skipped)

    @functools.cached_property
    def auto_target(self) -> float:
        """segment.scale=auto: the training images' calibre as the model saw it (evaluate.segmentation.auto_target)."""
        return auto_target(network_lineage(self.export).get("scale"), self.recipe, self.internal_segment)

    def header(self, internal: ScoredSet) -> dict[str, Any]:
        return {"class_names": self.recipe.segment.names}

    def model_fields(self) -> dict[str, Any]:
        return {"head": self.recipe.head.type}

    def body(self, internal: ScoredSet) -> dict[str, Any]:
        seg, result = self.internal_segment, internal.result
        boot = result.get("bootstrap")
        return {
            "inference": {"sliding_window": list(seg.patch_size), "overlap": seg.overlap, "blend": "gaussian",
                          **({"tta_scales": list(self.recipe.eval.tta_scales)} if self.recipe.eval.tta_scales
                             else {}),
                          "roi": seg.roi, **({"fov_diameter": seg.fov_diameter} if seg.fov_diameter else {}),
                          **({"scale": seg.scale} if seg.scale else {}), **({"mpp": seg.mpp} if seg.mpp else {})},
            "metrics": result["metrics"],
            **({"intervals": boot["intervals"],
                "bootstrap": {k: v for k, v in boot.items() if k not in ("intervals", "values")}} if boot else {}),
            "per_class": result["per_class"],
            "by_site": internal.by_site,
            "per_image": result["per_image"],
            "definitions": CONVENTIONS,
        }

    def external_fields(self, scored: ScoredSet) -> dict[str, Any]:
        """Per class, and the evaluate-time scale overrides this set was scored with (the internal split never
        is: eval.json's `inference` is the trained one)."""
        rows = [r for r in scored.result["per_image"] if r.get("scale_factor")]
        factors, own = [r["scale_factor"] for r in rows], [r.get("scale_factor_image", r["scale_factor"]) for r in rows]
        auto = {"median": float(np.median(factors)), "min": min(factors), "max": max(factors),
                "pool": self.recipe.segment.auto_pool,
                "image_readings": {"median": float(np.median(own)), "min": min(own), "max": max(own)},
                "target_calibre_px": round(self.auto_target, 3)} if rows else None
        return {"per_class": scored.result["per_class"],
                **({"inference_overrides": {f"segment.{k}": v for k, v in self.overrides.items()}}
                   if self.overrides else {}),
                **({"auto_scale": auto} if auto else {})}

    def write_predictions(self, path: Path, sets: list[ScoredSet]) -> None:
        write_rows(path, [(s.name, s.rows) for s in sets])

    def report_inputs(self, sets: list[ScoredSet]) -> dict[str, Any]:
        return {"overlays": {s.name: s.pictures for s in sets}}
