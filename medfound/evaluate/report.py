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
from medfound.evaluate.metrics import DEFINITIONS, classification_metrics, multilabel_metrics, score_with_sites
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


def evaluate_run(run_dir: str | Path, split: Optional[str] = None) -> dict[str, Any]:
    """Evaluate `RUN_DIR/export` on the run's labelled shard set (`eval.split`, or `split`); write eval.json."""
    run_dir = Path(run_dir)
    recipe = load_run_recipe(run_dir)
    if not isinstance(recipe, FinetuneRecipe):
        raise ValueError(f"{run_dir} is a {recipe.kind} run: evaluate a finetune run (pretraining has no labels; "
                         "fine-tune its export with `medfound finetune` first)")
    export = run_dir / "export"
    weights = export / {"segmentation": "segmenter.safetensors", "mil": "mil.safetensors",
                        "prompt": "prompt_segmenter.safetensors"}.get(recipe.task, "model.safetensors")
    if not weights.is_file():
        raise FileNotFoundError(f"{export} has no {weights.name}: the run has not finished; "
                                "continue it with `medfound finetune RECIPE trainer.resume=auto`")
    split = split or recipe.eval.split
    if recipe.task == "segmentation":
        return evaluate_segmentation(run_dir, recipe, split)
    if recipe.task == "mil":
        from medfound.adapt.mil import evaluate_mil

        return evaluate_mil(run_dir, recipe, split)
    if recipe.task == "prompt":
        from medfound.adapt.prompt import evaluate_prompt

        return evaluate_prompt(run_dir, recipe, split)
    shards = recipe.data.shards[0]
    urls, (manifest,) = shard_urls([shards], split)
    model = timm.create_model(f"local-dir:{export}", pretrained=True)
    d = recipe.data
    from medfound.adapt.tasks import endpoint

    threshold = recipe.head.binary_threshold
    schema = endpoint(manifest.label_schema, threshold)
    multilabel = schema.type == "multilabel"
    agg = recipe.eval.aggregate
    loader = make_loader(urls, transform=d.transform(train=False), batch_size=d.eval_batch_size, labelled=True,
                         train=False, num_workers=d.num_workers, num_classes=schema.num_classes, multilabel=multilabel,
                         max_bad_fraction=d.max_bad_fraction, keep_meta=agg.by if agg else ())
    start = time.time()
    probs, labels, keys, sites, skipped, metas = predict(model, loader, d.normalizer(), multilabel)
    if threshold is not None:
        labels = (labels >= threshold).astype(np.int64)

    result, by_site = score_with_sites(probs, labels, sites, schema.type, schema.names, split,
                                       recipe.eval.bootstrap, recipe.eval.seed)
    units = None
    if agg is not None:
        from medfound.evaluate.metrics import aggregate_units

        ids = [tuple(str(m[f]) for f in agg.by) for m in metas]
        up, uy, _ = aggregate_units(probs, labels, ids, agg.reduce)
        scored = multilabel_metrics(up, uy, schema.names, split=f"{split}/units") if multilabel else \
            classification_metrics(up, uy, schema.type, schema.names, split=f"{split}/units")
        units = {"by": agg.by, "reduce": agg.reduce, "n": int(len(uy)), "images": int(len(labels)),
                 "metrics": scored["metrics"], "per_class": scored["per_class"]}
        result["warnings"] += scored["warnings"]
    report = {
        "task": "classification",
        "label_type": schema.type,
        "class_names": schema.names,
        "dataset": _dataset(manifest, shards, split, len(labels)),
        "model": {"export": str(export), "sha256": sha256_file(export / "model.safetensors")},
        "metrics": result["metrics"],
        "per_class": result["per_class"],
        **({"intervals": result["bootstrap"]["intervals"],
            "bootstrap": {k: v for k, v in result["bootstrap"].items() if k != "intervals"}}
           if "bootstrap" in result else {}),
        "by_site": by_site,
        **({"units": units} if units else {}),
        "definitions": {k: v for k, v in DEFINITIONS.items() if k in result["metrics"]},
        **_record(result["warnings"], skipped, start),
    }
    atomic_write_json(run_dir / "eval.json", report)
    return report


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


def evaluate_segmentation(run_dir: Path, recipe: FinetuneRecipe, split: str) -> dict[str, Any]:
    """Sliding-window inference over every `split` image, Dice/HD95 per image and class -> eval.json."""
    from medfound.data.seg_transforms import build_seg_transform
    from medfound.evaluate.segmentation import CONVENTIONS, SegmentationScorer, predict_probs
    from medfound.workflows import segment_normalizer

    seg, d = recipe.segment, recipe.data
    shards = recipe.data.shards[0]
    urls, (manifest,) = shard_urls([shards], split)
    model = load_segmenter(run_dir, recipe)
    normalize = segment_normalizer(recipe)
    loader = make_loader(urls, transform=build_seg_transform(seg, train=False, window=d.window), batch_size=1,
                         labelled=False, train=False, num_workers=d.num_workers, max_bad_fraction=d.max_bad_fraction)
    scorer = SegmentationScorer(seg.names, hd=seg.hd95)
    start, skipped = time.time(), []
    for batch in loader:
        skipped += batch.pop("_bad", [])
        image = batch["image"] if normalize is None else normalize(batch["image"])
        probs = predict_probs(model, image.float(), seg.patch_size, seg.overlap)[0]
        roi = batch["roi"][0, 0] if "roi" in batch else None
        key = batch["key"][0]
        spacing = batch["spacing"][0].tolist() if "spacing" in batch else None
        scorer.add(key, probs, batch["mask"][0, 0], roi, spacing)
    if not scorer.per_image:
        raise ValueError(f"split '{split}' of {shards} yielded no samples to evaluate")
    result = scorer.result()
    report = {
        "task": "segmentation",
        "class_names": seg.names,
        "dataset": _dataset(manifest, shards, split, len(scorer.per_image)),
        "model": {"export": str(run_dir / "export"),
                  "sha256": sha256_file(run_dir / "export" / "segmenter.safetensors"), "head": recipe.head.type},
        "inference": {"sliding_window": list(seg.patch_size), "overlap": seg.overlap, "blend": "gaussian",
                      "roi": seg.roi},
        **result,
        "definitions": CONVENTIONS,
        **_record([], skipped, start),
    }
    atomic_write_json(run_dir / "eval.json", report)
    return report

