"""Scoring image models on shard sets: classification (softmax / sigmoid probabilities, per-site and external
results, units of several images) and segmentation (sliding-window inference, Dice/HD95 per image and class).

The model is given by the caller, loaded by its task kind (`medfound.tasks`): for classification the timm folder
`RUN_DIR/export` exactly as `medfound publish` ships it, evaluated with the run's own preprocessing.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from medfound.config import FinetuneRecipe
from medfound.data.loaders import eval_image_transform, normalizer, prepare
from medfound.data.pipeline import make_loader
from medfound.evaluate.metrics import classification_metrics, multilabel_metrics, positive_index, score_with_sites
from medfound.evaluate.records import (dataset_block, eval_progress, external_block, network_lineage, record_tail,
                                       scored_block, split_urls, trained_on, write_predictions, write_rows)
from medfound.io import atomic_write_json, sha256_file


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


def check_scale(entry: dict[str, Any], path: str, name: str, expected: Optional[dict[str, Any]],
                normalised: tuple[str, ...] = ()) -> None:
    """An external set's scale beside the training data's (eval.json `scale`), and a warning (console, eval.json,
    report.md, card) when they differ beyond medfound.data.scale.SCALE_TOLERANCE."""
    import warnings as _warnings

    from medfound.data.scale import scale_stats, scale_warnings

    if not expected:
        return
    entry["scale"] = scale_stats(path)
    for w in scale_warnings(name, entry["scale"], expected, normalised):
        entry.setdefault("warnings", []).append(w)
        _warnings.warn(w, stacklevel=2)


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


def evaluate_classification(model: torch.nn.Module, weights: Path, recipe: FinetuneRecipe, split: str, out: Path
                            ) -> dict[str, Any]:
    """Score `model` (the timm folder of `weights`, loaded) on `split` of the run's shards, and on every external
    set -> `out`/eval.json, predictions.csv, report/."""
    from medfound.adapt.tasks import endpoint

    shards = recipe.data.shards[0]
    urls, manifest, _ = split_urls(shards, split)
    d, ev = recipe.data, recipe.eval
    threshold = recipe.head.binary_threshold
    schema = endpoint(manifest.label_schema, threshold)
    multilabel = schema.type == "multilabel"
    agg = ev.aggregate
    external = list(ev.external)
    if d.spacing_mm is not None:  # every scored set must carry pixel spacings: checked before anything is scored
        from medfound.data.scale import require_spacing

        for where in [shards, *map(str, external)]:
            require_spacing(where, f"shard set {where}")

    def run(urls: list[str], keep=(), bar=None):
        loader = make_loader(urls, transform=prepare(d, eval_image_transform(d)), batch_size=d.eval_batch_size,
                             labelled=True, train=False, num_workers=d.num_workers,
                             num_classes=manifest.label_schema.num_classes,  # the stored labels' range, not the endpoint's
                             multilabel=multilabel, max_bad_fraction=d.max_bad_fraction, keep_meta=keep,
                             verify="sha256")
        probs, labels, keys, sites, skipped, metas = predict(model, loader, normalizer(d), multilabel, bar)
        if threshold is not None:
            labels = (labels >= threshold).astype(np.int64)
        return probs, labels, keys, sites, skipped, metas

    positive = positive_index(schema.names, recipe.head.positive_class) if not multilabel else 1

    def score(probs, labels, sites, name):
        return score_with_sites(probs, labels, sites, schema.type, schema.names, name, ev.bootstrap, ev.seed,
                                ev.specificity, keep_values=bool(external), interval=ev.interval,
                                min_per_class=ev.min_per_class, positive=positive)

    start = time.time()
    show = recipe.trainer.progress
    probs, labels, keys, sites, skipped, metas = run(urls, agg.by if agg else (),
                                                     eval_progress(manifest, [split], f"evaluate {split}", show))
    result, by_site = score(probs, labels, sites, split)
    warnings = list(result["warnings"])
    units = None
    if agg is not None:
        from medfound.evaluate.metrics import aggregate_units

        ids = [tuple(str(m[f]) for f in agg.by) for m in metas]
        up, uy, _ = aggregate_units(probs, labels, ids, agg.reduce)
        scored = multilabel_metrics(up, uy, schema.names, split=f"{split}/units") if multilabel else \
            classification_metrics(up, uy, schema.type, schema.names, split=f"{split}/units", positive=positive)
        units = {"by": agg.by, "reduce": agg.reduce, "n": int(len(uy)), "images": int(len(labels)),
                 "metrics": scored["metrics"], "per_class": scored["per_class"]}
        warnings += scored["warnings"]
    predictions = [("internal", probs, labels, keys, sites)]
    externals = []
    lineage = network_lineage(weights.parent)
    trained = trained_on(lineage)
    expected = lineage.get("scale")  # the training data's scale (data/scale.py)
    for ext in external:
        ext = str(ext)
        e_urls, e_manifest, e_splits = split_urls(ext, ev.external_split)
        e_schema = endpoint(e_manifest.label_schema, threshold)
        if e_schema.names != schema.names:
            raise ValueError(f"external set {ext} has classes {e_schema.names}, the model {schema.names}: an external "
                             "set must share the label schema (re-shard it with the same class names)")
        e_probs, e_labels, e_keys, e_sites, e_skipped, _ = run(
            e_urls, bar=eval_progress(e_manifest, e_splits, f"external {e_manifest.name}", show))
        e_result, e_by_site = score(e_probs, e_labels, e_sites, f"external {e_manifest.name}")
        warnings += e_result["warnings"] + ([f"external {e_manifest.name}: {len(e_skipped)} undecodable samples "
                                             "skipped"] if e_skipped else [])
        entry = external_block(e_manifest.name, ext, e_splits, len(e_labels), e_result, e_by_site, result,
                               (e_manifest.digest,), trained)
        entry["calibration"] = e_result["calibration"]
        check_scale(entry, ext, e_manifest.name, expected, CLASSIFICATION_NORMALISED)
        externals.append(entry)
        predictions.append((e_manifest.name, e_probs, e_labels, e_keys, e_sites))
    report = {
        "task": "classification",
        "label_type": schema.type,
        "class_names": schema.names,
        "dataset": dataset_block(manifest, shards, split, len(labels)),
        "model": {"export": str(weights.parent), "sha256": sha256_file(weights)},
        **({"scale": expected} if expected else {}),
        **scored_block(result, by_site, schema.type),
        **({"units": units} if units else {}),
        **({"external": externals} if externals else {}),
        **record_tail(warnings, skipped, start, externals, lineage),
    }
    write_predictions(out / "predictions.csv", schema.names, predictions)
    atomic_write_json(out / "eval.json", report)
    if ev.report:
        from medfound.evaluate.markdown import write_report

        write_report(out, report, predictions=predictions)
    return report


def evaluate_segmentation(model: torch.nn.Module, normalize: Optional[torch.nn.Module], weights: Path,
                          recipe: FinetuneRecipe, split: str, out: Path) -> dict[str, Any]:
    """Sliding-window inference of `model` (`[B, C, *S]` -> logits) over every `split` image (and every external
    set), Dice/HD95 per image and class with bootstrap intervals -> `out`/eval.json, report/report.md with overlays.
    `weights`: the file `model` was loaded from (eval.json records its sha256); `normalize`: the device-side
    normaliser (None where the transform already normalised)."""
    from medfound.data.seg_transforms import build_seg_transform
    from medfound.evaluate.segmentation import CONVENTIONS, score_loader

    seg, d, ev = recipe.segment, recipe.data, recipe.eval
    shards = recipe.data.shards[0]
    urls, manifest, _ = split_urls(shards, split)
    n_overlays = 4

    def score_set(urls: list[str], name: str, bar):
        loader = make_loader(urls, transform=prepare(d, build_seg_transform(seg, train=False, window=d.window)),
                             batch_size=1, labelled=False, train=False, num_workers=d.num_workers,
                             max_bad_fraction=d.max_bad_fraction, verify="sha256")
        scorer, skipped, overlays = score_loader(model, normalize, loader, seg, hd=seg.hd95, bar=bar,
                                                 n_overlays=n_overlays)
        bar.close()
        if not scorer.per_image:
            raise ValueError(f"{name} yielded no samples to evaluate")
        return scorer, skipped, overlays

    from medfound.data.seg_transforms import check_mask_members

    # every set has the masks scoring needs, before the internal split is scored again
    check_mask_members(manifest, [seg.mask, seg.roi], f"split '{split}' of {shards}")
    for ext in ev.external:
        check_mask_members(split_urls(str(ext), ev.external_split)[1], [seg.mask, seg.roi], f"external set {ext}")
    start = time.time()
    show = recipe.trainer.progress
    scorer, skipped, overlays = score_set(urls, f"split '{split}' of {shards}",
                                          eval_progress(manifest, [split], f"evaluate {split}", show))
    result = scorer.result()
    boot = scorer.bootstrap(ev.bootstrap, ev.seed, keep_values=bool(ev.external)) if ev.bootstrap else None
    externals, warnings, ext_overlays = [], [], {}
    per_image_sets = [("internal", result["per_image"])]
    lineage = network_lineage(weights.parent)
    trained = trained_on(lineage)
    expected = lineage.get("scale")
    for ext in ev.external:
        ext = str(ext)
        e_urls, e_manifest, e_splits = split_urls(ext, ev.external_split)
        e_scorer, e_skipped, e_over = score_set(e_urls, f"external set {ext}",
                                                eval_progress(e_manifest, e_splits, f"external {e_manifest.name}",
                                                              show))
        e_result = e_scorer.result()
        if boot:
            e_result["bootstrap"] = e_scorer.bootstrap(ev.bootstrap, ev.seed, keep_values=True)
        entry = external_block(e_manifest.name, ext, e_splits, len(e_scorer.per_image),
                               {"metrics": e_result["metrics"], **({"bootstrap": e_result["bootstrap"]} if boot else {})},
                               {}, {"metrics": result["metrics"], **({"bootstrap": boot} if boot else {})},
                               (e_manifest.digest,), trained)
        entry["per_class"] = e_result["per_class"]
        entry["by_site"] = e_scorer.by_site(ev.bootstrap, ev.seed)
        per_image_sets.append((e_manifest.name, e_result["per_image"]))
        check_scale(entry, ext, e_manifest.name, expected, normalised_scale(seg))
        externals.append(entry)
        ext_overlays[e_manifest.name] = e_over
        warnings += [f"external {e_manifest.name}: {len(e_skipped)} undecodable samples skipped"] if e_skipped else []
    report = {
        "task": "segmentation",
        "class_names": seg.names,
        "dataset": dataset_block(manifest, shards, split, len(scorer.per_image)),
        "model": {"export": str(weights.parent), "sha256": sha256_file(weights), "head": recipe.head.type},
        **({"scale": expected} if expected else {}),
        "inference": {"sliding_window": list(seg.patch_size), "overlap": seg.overlap, "blend": "gaussian",
                      "roi": seg.roi, **({"fov_diameter": seg.fov_diameter} if seg.fov_diameter else {}),
                      **({"scale": seg.scale} if seg.scale else {}), **({"mpp": seg.mpp} if seg.mpp else {})},
        "metrics": result["metrics"],
        **({"intervals": boot["intervals"],
            "bootstrap": {k: v for k, v in boot.items() if k not in ("intervals", "values")}} if boot else {}),
        "per_class": result["per_class"],
        "by_site": scorer.by_site(ev.bootstrap, ev.seed),
        "per_image": result["per_image"],
        **({"external": externals} if externals else {}),
        "definitions": CONVENTIONS,
        **record_tail(warnings, skipped, start, externals, lineage),
    }
    write_rows(Path(out) / "predictions.csv", per_image_sets)
    atomic_write_json(Path(out) / "eval.json", report)
    if ev.report:
        from medfound.evaluate.markdown import write_report

        write_report(out, report, overlays={"internal": overlays, **ext_overlays})
    return report
