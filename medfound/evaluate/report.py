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
from medfound.evaluate.metrics import DEFINITIONS, classification_metrics
from medfound.io import atomic_write_json, sha256_file


@torch.no_grad()
def predict(model: torch.nn.Module, loader, normalize: torch.nn.Module
            ) -> tuple[np.ndarray, np.ndarray, list[str], list[Optional[str]], list[str]]:
    """Softmax probabilities `[N, K]`, labels `[N]`, keys and sites for every sample of `loader`, and the
    reports of samples skipped as undecodable."""
    model.eval()
    probs, labels, keys, sites, skipped = [], [], [], [], []
    for batch in loader:
        skipped += batch.pop("_bad", [])
        probs.append(torch.softmax(model(normalize(batch["image"])).float(), dim=1).numpy())
        labels.append(batch["label"].numpy())
        keys += batch["key"]
        sites += batch.get("site", [None] * len(batch["key"]))
    if not probs:
        raise ValueError("the evaluation split yielded no samples")
    return np.concatenate(probs), np.concatenate(labels), keys, sites, skipped


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
    if not (export / "model.safetensors").is_file():
        raise FileNotFoundError(f"{export} has no model.safetensors: the run has not finished; "
                                "continue it with `medfound finetune RECIPE trainer.resume=auto`")
    split = split or recipe.eval.split
    shards = recipe.data.shards[0]
    urls, (manifest,) = shard_urls([shards], split)
    model = timm.create_model(f"local-dir:{export}", pretrained=True)
    d = recipe.data
    schema = manifest.label_schema
    if schema.type == "multilabel":
        raise ValueError(f"{shards} is multi-label: multi-label evaluation (per-finding AUROC) is not implemented yet")
    loader = make_loader(urls, transform=d.transform(train=False), batch_size=d.eval_batch_size, labelled=True,
                         train=False, num_workers=d.num_workers, num_classes=schema.num_classes,
                         max_bad_fraction=d.max_bad_fraction)
    start = time.time()
    probs, labels, keys, sites, skipped = predict(model, loader, d.normalizer())
    result = classification_metrics(probs, labels, schema.type, schema.names, split=split)
    by_site = {}
    for site in sorted({s for s in sites if s}):
        idx = np.array([s == site for s in sites])
        by_site[site] = {"n": int(idx.sum()), **classification_metrics(probs[idx], labels[idx], schema.type,
                                                                        schema.names, split=f"{split}/{site}")["metrics"]}
    report = {
        "task": "classification",
        "label_type": schema.type,
        "class_names": schema.names,
        "dataset": {"name": manifest.name, "path": str(shards), "split": split, "modality": manifest.modality,
                    "manifest_digest": manifest.digest, "num_samples": int(len(labels))},
        "model": {"export": str(export), "sha256": sha256_file(export / "model.safetensors")},
        "metrics": result["metrics"],
        "per_class": result["per_class"],
        "by_site": by_site,
        "definitions": {k: v for k, v in DEFINITIONS.items() if k in result["metrics"]},
        "warnings": result["warnings"] + ([f"{len(skipped)} undecodable samples skipped"] if skipped else []),
        "skipped_samples": skipped,
        "seconds": round(time.time() - start, 2),
        "medfound_version": medfound.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_json(run_dir / "eval.json", report)
    return report
