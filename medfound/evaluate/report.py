"""`medfound evaluate RUN_DIR`: score a fine-tuned run's export on its test split -> `RUN_DIR/eval.json`.

The model evaluated is `RUN_DIR/export` loaded through timm (`local-dir:`), exactly the artifact
`medfound publish` ships, with the run's own evaluation preprocessing.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import timm
import torch

import medfound
from medfound.config import FinetuneRecipe, load_recipe
from medfound.data.pipeline import make_loader, shard_urls
from medfound.evaluate.metrics import classification_metrics, multilabel_metrics, score_with_sites
from medfound.io import atomic_write_json, sha256_file


@torch.no_grad()
def predict(model: torch.nn.Module, loader, normalize: torch.nn.Module, multilabel: bool = False
            ) -> tuple[np.ndarray, np.ndarray, list[str], list[Optional[str]], list[str], list[dict]]:
    """Probabilities `[N, K]` (softmax; multi-label: a sigmoid per finding), labels (`[N]`, or multi-hot `[N, K]`),
    keys and sites for every sample of `loader`, the reports of samples skipped as undecodable, and the samples'
    kept meta fields (`make_loader(keep_meta=...)`; empty otherwise)."""
    model.eval()
    probs, labels, keys, sites, skipped, metas = [], [], [], [], [], []
    for batch in loader:
        skipped += batch.pop("_bad", [])
        metas += batch.get("meta", [])
        logits = model(normalize(batch["image"])).float()
        probs.append((torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=1)).numpy())
        labels.append(batch["label"].numpy())
        keys += batch["key"]
        sites += batch.get("site", [None] * len(batch["key"]))
    if not probs:
        raise ValueError("the evaluation split yielded no samples")
    return np.concatenate(probs), np.concatenate(labels), keys, sites, skipped, metas


def load_run_recipe(run_dir: Path) -> Any:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a medfound run directory (no config.yaml)")
    return load_recipe(path)


def evaluate_run(run_dir: str | Path, split: Optional[str] = None, external: Optional[list[str | Path]] = None,
                 out: Optional[str | Path] = None) -> dict[str, Any]:
    """Evaluate a run's export (or a published folder) on the run's labelled shard set (`eval.split`, or `split`)
    and on the external shard sets (`eval.external`, or `external`); write eval.json, predictions and
    report/report.md into `out` (default: the run directory; a published timm folder needs `out`, so the folder and
    its card stay as published)."""
    run_dir = Path(run_dir)
    published = (run_dir / "README.md").is_file() and not (run_dir / "checkpoints").exists()
    if published:  # `medfound publish` output: timm (training_config.yaml + model.safetensors) or a network folder
        timm_folder = (run_dir / "training_config.yaml").is_file()
        recipe = load_recipe(run_dir / ("training_config.yaml" if timm_folder else "config.yaml"))
        export = run_dir if timm_folder else run_dir / "export"
        if out is None:
            raise ValueError(f"{run_dir} is a published folder: give --out DIR for the evaluation, so the folder and "
                             "its checked card stay as published")
    else:
        recipe, export = load_run_recipe(run_dir), run_dir / "export"
    out = Path(out) if out is not None else run_dir
    if not isinstance(recipe, FinetuneRecipe):
        raise ValueError(f"{run_dir} is a {recipe.kind} run: evaluate a finetune run (pretraining has no labels; "
                         "fine-tune its export with `medfound finetune` first)")
    weights = export / {"segmentation": "segmenter.safetensors", "mil": "mil.safetensors",
                        "prompt": "prompt_segmenter.safetensors"}.get(recipe.task, "model.safetensors")
    if not weights.is_file():
        raise FileNotFoundError(f"{export} has no {weights.name}: the run has not finished; "
                                "continue it with `medfound finetune RECIPE trainer.resume=auto`")
    if out != run_dir and recipe.task in ("mil", "prompt"):
        raise ValueError(f"--out is for classification and segmentation runs; a {recipe.task} run writes its "
                         f"evaluation into {run_dir}")
    out.mkdir(parents=True, exist_ok=True)
    split = split or recipe.eval.split
    if external:
        recipe = recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"external": [str(e) for e in
                                                                                              external]})})
    if recipe.eval.external and recipe.task in ("mil", "prompt"):
        raise ValueError(f"eval.external is scored for classification and segmentation runs; {run_dir} is a "
                         f"{recipe.task} run: evaluate the external bags/shards as its own split instead "
                         "(`medfound evaluate RUN --split S` after adding them to the run's data)")
    if recipe.task == "segmentation":
        return evaluate_segmentation(run_dir, recipe, split, out)
    if recipe.task == "mil":
        from medfound.adapt.mil import evaluate_mil

        return evaluate_mil(run_dir, recipe, split)
    if recipe.task == "prompt":
        from medfound.adapt.prompt import evaluate_prompt

        return evaluate_prompt(run_dir, recipe, split)
    return evaluate_classification(export, recipe, split, out)


def split_urls(shards: Path, split: Optional[str]) -> tuple[list[str], Any, list[str]]:
    """Shard paths of `split` of a shard set (None: every split, as for an external site), its manifest and the
    splits used."""
    from medfound.data.manifest import read_manifest

    if split is not None:
        urls, (manifest,) = shard_urls([shards], split)
        return urls, manifest, [split]
    manifest = read_manifest(shards)
    return [u for sp in manifest.splits for u in shard_urls([shards], sp)[0]], manifest, list(manifest.splits)


def scored_block(result: dict[str, Any], by_site: dict[str, Any], label_type: str) -> dict[str, Any]:
    """The eval.json fields of a scored classification split (also MIL): metrics, per-class values, intervals,
    calibration bins, the operating point, per-site results and the definitions."""
    from medfound.evaluate.metrics import metric_definitions

    boot = result.get("bootstrap")
    return {
        "metrics": result["metrics"],
        "per_class": result["per_class"],
        **({"intervals": boot["intervals"],
            "bootstrap": {k: v for k, v in boot.items() if k not in ("intervals", "values")}} if boot else {}),
        **({"operating_point": result["operating_point"]} if "operating_point" in result else {}),
        "calibration": result["calibration"],
        "by_site": by_site,
        "definitions": metric_definitions(result["metrics"], label_type),
    }


def external_block(name: str, path: str, splits: list[str], n: int, result: dict[str, Any], by_site: dict,
                   internal: dict[str, Any]) -> dict[str, Any]:
    """One external set beside the internal test: its metrics and intervals, and the drop (external - internal)
    of every metric with the interval of the difference of the two independent bootstraps."""
    from medfound.evaluate.bootstrap import difference_interval

    metrics = result["metrics"]
    drop = {k: (None if v is None or internal["metrics"].get(k) is None else float(v - internal["metrics"][k]))
            for k, v in metrics.items() if isinstance(v, (int, float)) or v is None}
    entry = {"name": name, "path": str(path), "splits": splits, "num_samples": int(n), "metrics": metrics,
             "drop": drop, "by_site": by_site}
    ext_boot, int_boot = result.get("bootstrap"), internal.get("bootstrap")
    if ext_boot and int_boot:
        entry["intervals"] = ext_boot["intervals"]
        entry["drop_intervals"] = {k: difference_interval(ext_boot["values"][k], int_boot["values"][k])
                                   for k in drop if k in ext_boot["values"] and k in int_boot["values"]}
    return entry


def evaluate_classification(export: Path, recipe: FinetuneRecipe, split: str, out: Path) -> dict[str, Any]:
    """Score the timm folder `export` on `split` of the run's shards, and on every external set -> `out`/eval.json,
    predictions.csv, report/."""
    from medfound.adapt.tasks import endpoint

    shards = recipe.data.shards[0]
    urls, manifest, _ = split_urls(shards, split)
    model = timm.create_model(f"local-dir:{export}", pretrained=True)
    d, ev = recipe.data, recipe.eval
    threshold = recipe.head.binary_threshold
    schema = endpoint(manifest.label_schema, threshold)
    multilabel = schema.type == "multilabel"
    agg = ev.aggregate
    external = list(ev.external)

    def run(urls: list[str], keep=()):
        loader = make_loader(urls, transform=d.prepare(d.transform(train=False)), batch_size=d.eval_batch_size,
                             labelled=True, train=False, num_workers=d.num_workers,
                             num_classes=manifest.label_schema.num_classes,  # the stored labels' range, not the endpoint's
                             multilabel=multilabel, max_bad_fraction=d.max_bad_fraction, keep_meta=keep,
                             verify="sha256")
        probs, labels, keys, sites, skipped, metas = predict(model, loader, d.normalizer(), multilabel)
        if threshold is not None:
            labels = (labels >= threshold).astype(np.int64)
        return probs, labels, keys, sites, skipped, metas

    def score(probs, labels, sites, name):
        return score_with_sites(probs, labels, sites, schema.type, schema.names, name, ev.bootstrap, ev.seed,
                                ev.specificity, keep_values=bool(external))

    start = time.time()
    probs, labels, keys, sites, skipped, metas = run(urls, agg.by if agg else ())
    result, by_site = score(probs, labels, sites, split)
    warnings = list(result["warnings"])
    units = None
    if agg is not None:
        from medfound.evaluate.metrics import aggregate_units

        ids = [tuple(str(m[f]) for f in agg.by) for m in metas]
        up, uy, _ = aggregate_units(probs, labels, ids, agg.reduce)
        scored = multilabel_metrics(up, uy, schema.names, split=f"{split}/units") if multilabel else \
            classification_metrics(up, uy, schema.type, schema.names, split=f"{split}/units")
        units = {"by": agg.by, "reduce": agg.reduce, "n": int(len(uy)), "images": int(len(labels)),
                 "metrics": scored["metrics"], "per_class": scored["per_class"]}
        warnings += scored["warnings"]
    predictions = [("internal", probs, labels, keys, sites)]
    externals = []
    for ext in external:
        ext = str(ext)
        e_urls, e_manifest, e_splits = split_urls(ext, ev.external_split)
        e_schema = endpoint(e_manifest.label_schema, threshold)
        if e_schema.names != schema.names:
            raise ValueError(f"external set {ext} has classes {e_schema.names}, the model {schema.names}: an external "
                             "set must share the label schema (re-shard it with the same class names)")
        e_probs, e_labels, e_keys, e_sites, e_skipped, _ = run(e_urls)
        e_result, e_by_site = score(e_probs, e_labels, e_sites, f"external {e_manifest.name}")
        warnings += e_result["warnings"] + ([f"external {e_manifest.name}: {len(e_skipped)} undecodable samples "
                                             "skipped"] if e_skipped else [])
        entry = external_block(e_manifest.name, ext, e_splits, len(e_labels), e_result, e_by_site, result)
        entry["calibration"] = e_result["calibration"]
        externals.append(entry)
        predictions.append((e_manifest.name, e_probs, e_labels, e_keys, e_sites))
    report = {
        "task": "classification",
        "label_type": schema.type,
        "class_names": schema.names,
        "dataset": _dataset(manifest, shards, split, len(labels)),
        "model": {"export": str(export), "sha256": sha256_file(export / "model.safetensors")},
        **scored_block(result, by_site, schema.type),
        **({"units": units} if units else {}),
        **({"external": externals} if externals else {}),
        **_record(warnings, skipped, start),
    }
    write_predictions(out / "predictions.csv", schema.names, predictions)
    atomic_write_json(out / "eval.json", report)
    if ev.report:
        from medfound.evaluate.markdown import write_report

        write_report(out, report, predictions=predictions)
    return report


def write_predictions(path: Path, class_names: list[str], sets: list[tuple]) -> None:
    """One row per scored sample: set, key, site, label(s), probability per class -> CSV (atomic)."""
    import csv
    import io

    from medfound.io import atomic_write_bytes

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["set", "key", "site", "label", *[f"p_{c}" for c in class_names]])
    for name, probs, labels, keys, sites in sets:
        for i, key in enumerate(keys):
            label = " ".join(str(int(v)) for v in labels[i]) if np.ndim(labels[i]) else int(labels[i])
            w.writerow([name, key, sites[i] or "", label, *[f"{float(p):.6f}" for p in probs[i]]])
    atomic_write_bytes(path, buf.getvalue().encode())


def _dataset(manifest, shards: Path, split: str, n: int) -> dict[str, Any]:
    return {"name": manifest.name, "path": str(shards), "split": split, "modality": manifest.modality,
            "manifest_digest": manifest.digest, "num_samples": int(n)}


def _record(warnings: list[str], skipped: list[str], start: float) -> dict[str, Any]:
    """The tail every eval.json carries: warnings, skipped samples, timing and provenance."""
    return {"warnings": warnings + ([f"{len(skipped)} undecodable samples skipped"] if skipped else []),
            "skipped_samples": skipped, "seconds": round(time.time() - start, 2),
            "medfound_version": medfound.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def load_segmenter(run_dir: Path, recipe: FinetuneRecipe) -> torch.nn.Module:
    """The trained segmentation network of a run, rebuilt from its recipe (architecture only: the ViT's structure
    from `export/backbone/config.json`) and loaded strictly from `export/segmenter.safetensors`."""
    import json

    from safetensors.torch import load_file

    from medfound.adapt.tasks import build_task
    from medfound.config import BackboneConfig

    export = Path(run_dir) / "export"
    update: dict[str, Any] = {"tuning": "full"}
    if recipe.backbone is not None:
        cfg_path = export / "backbone" / "config.json"
        if cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text())
            args = {k: v for k, v in cfg.get("model_args", {}).items() if k not in ("num_classes", "global_pool")}
            update["backbone"] = BackboneConfig(name=cfg["architecture"], model_args={**args, **recipe.backbone.model_args})
    task = build_task(recipe.model_copy(update=update))
    state = load_file(str(export / "segmenter.safetensors"))
    try:
        task.model.load_state_dict(state)
    except RuntimeError as e:
        raise RuntimeError(f"{export}/segmenter.safetensors does not fit the network the run's recipe builds "
                           f"(was the recipe edited?): {e}") from None
    return task.model.eval()


def evaluate_segmentation(run_dir: Path, recipe: FinetuneRecipe, split: str, out: Optional[Path] = None
                          ) -> dict[str, Any]:
    """Sliding-window inference over every `split` image (and every external set), Dice/HD95 per image and class
    with bootstrap intervals -> eval.json, report/report.md with overlays."""
    from medfound.data.seg_transforms import build_seg_transform
    from medfound.evaluate.segmentation import CONVENTIONS, SegmentationScorer, predict_probs
    from medfound.workflows import segment_normalizer

    seg, d, ev = recipe.segment, recipe.data, recipe.eval
    shards = recipe.data.shards[0]
    urls, manifest, _ = split_urls(shards, split)
    model = load_segmenter(run_dir, recipe)
    normalize = segment_normalizer(recipe)
    n_overlays = 4

    def score_set(urls: list[str], name: str):
        loader = make_loader(urls, transform=d.prepare(build_seg_transform(seg, train=False, window=d.window)),
                             batch_size=1, labelled=False, train=False, num_workers=d.num_workers,
                             max_bad_fraction=d.max_bad_fraction, verify="sha256")
        scorer, skipped, overlays = SegmentationScorer(seg.names, hd=seg.hd95), [], []
        for batch in loader:
            skipped += batch.pop("_bad", [])
            image = batch["image"] if normalize is None else normalize(batch["image"])
            probs = predict_probs(model, image.float(), seg.patch_size, seg.overlap)[0]
            roi = batch["roi"][0, 0] if "roi" in batch else None
            key = batch["key"][0]
            spacing = batch["spacing"][0].tolist() if "spacing" in batch else None
            row = scorer.add(key, probs, batch["mask"][0, 0], roi, spacing)
            if batch.get("site") and batch["site"][0]:
                row["site"] = batch["site"][0]
            if len(overlays) < n_overlays:
                overlays.append({"key": key, "image": batch["image"][0].float().numpy(),
                                 "truth": batch["mask"][0, 0].numpy(), "pred": probs.argmax(0).numpy(),
                                 "dice": {k: v for k, v in row.items() if k.startswith("dice/")}})
        if not scorer.per_image:
            raise ValueError(f"{name} yielded no samples to evaluate")
        return scorer, skipped, overlays

    start = time.time()
    scorer, skipped, overlays = score_set(urls, f"split '{split}' of {shards}")
    result = scorer.result()
    boot = scorer.bootstrap(ev.bootstrap, ev.seed, keep_values=bool(ev.external)) if ev.bootstrap else None
    externals, warnings, ext_overlays = [], [], {}
    for ext in ev.external:
        ext = str(ext)
        e_urls, e_manifest, e_splits = split_urls(ext, ev.external_split)
        e_scorer, e_skipped, e_over = score_set(e_urls, f"external set {ext}")
        e_result = e_scorer.result()
        if boot:
            e_result["bootstrap"] = e_scorer.bootstrap(ev.bootstrap, ev.seed, keep_values=True)
        entry = external_block(e_manifest.name, ext, e_splits, len(e_scorer.per_image),
                               {"metrics": e_result["metrics"], **({"bootstrap": e_result["bootstrap"]} if boot else {})},
                               {}, {"metrics": result["metrics"], **({"bootstrap": boot} if boot else {})})
        entry["per_class"] = e_result["per_class"]
        entry["by_site"] = e_scorer.by_site(ev.bootstrap, ev.seed)
        externals.append(entry)
        ext_overlays[e_manifest.name] = e_over
        warnings += [f"external {e_manifest.name}: {len(e_skipped)} undecodable samples skipped"] if e_skipped else []
    report = {
        "task": "segmentation",
        "class_names": seg.names,
        "dataset": _dataset(manifest, shards, split, len(scorer.per_image)),
        "model": {"export": str(run_dir / "export"),
                  "sha256": sha256_file(run_dir / "export" / "segmenter.safetensors"), "head": recipe.head.type},
        "inference": {"sliding_window": list(seg.patch_size), "overlap": seg.overlap, "blend": "gaussian",
                      "roi": seg.roi},
        "metrics": result["metrics"],
        **({"intervals": boot["intervals"],
            "bootstrap": {k: v for k, v in boot.items() if k not in ("intervals", "values")}} if boot else {}),
        "per_class": result["per_class"],
        "by_site": scorer.by_site(ev.bootstrap, ev.seed),
        "per_image": result["per_image"],
        **({"external": externals} if externals else {}),
        "definitions": CONVENTIONS,
        **_record(warnings, skipped, start),
    }
    out = Path(out) if out is not None else run_dir
    atomic_write_json(out / "eval.json", report)
    if ev.report:
        from medfound.evaluate.markdown import write_report

        write_report(out, report, overlays={"internal": overlays, **ext_overlays})
    return report
