"""The pieces every eval.json is made of, public so that each task kind's evaluation assembles its record from
them: the scored shard paths of a split, the dataset block, the scored-classification block, the external-set block
(with the drop and its interval), predictions.csv, and the tail (warnings, skipped samples, timing, provenance)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

import medfound
from medfound.data.manifest import read_manifest
from medfound.data.pipeline import shard_urls
from medfound.evaluate.bootstrap import difference_interval
from medfound.evaluate.metrics import metric_definitions
from medfound.io import atomic_write_bytes


def split_urls(shards: str | Path, split: Optional[str]) -> tuple[list[str], Any, list[str]]:
    """Shard paths of `split` of a shard set (None: every split, as for an external site), its manifest and the
    splits used."""

    if split is not None:
        urls, (manifest,) = shard_urls([shards], split)
        return urls, manifest, [split]
    manifest = read_manifest(shards)
    return [u for sp in manifest.splits for u in shard_urls([shards], sp)[0]], manifest, list(manifest.splits)


def eval_progress(manifest, splits: list[str], desc: str, enabled: bool = True):
    """A tqdm bar over the samples of `splits` of a shard set (images/s, like training's); update it by the batch's
    sample count. Off with `trainer.progress=false` or TQDM_DISABLE=1."""
    import os

    from tqdm.auto import tqdm

    by_split = manifest.counts.get("by_split", {})
    total = sum(by_split.get(s, 0) for s in splits) or None
    off = not enabled or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")
    return tqdm(total=total, desc=desc, unit="img", disable=off, dynamic_ncols=True, mininterval=1.0)


def scored_block(result: dict[str, Any], by_site: dict[str, Any], label_type: str) -> dict[str, Any]:
    """The eval.json fields of a scored classification split (also MIL): metrics, per-class values, intervals,
    calibration bins, the operating point, per-site results and the definitions."""

    boot = result.get("bootstrap")
    return {
        "metrics": result["metrics"],
        "per_class": result["per_class"],
        **({"intervals": boot["intervals"],
            "bootstrap": {k: v for k, v in boot.items() if k not in ("intervals", "values")}} if boot else {}),
        **({"positive_class": result["positive_class"]} if "positive_class" in result else {}),
        **({"operating_point": result["operating_point"]} if "operating_point" in result else {}),
        "calibration": result["calibration"],
        "by_site": by_site,
        "definitions": metric_definitions(result["metrics"], label_type),
    }


def network_lineage(export: Path) -> dict[str, Any]:
    """The lineage block of an export folder: config.json's (timm) or the network json's `medfound` block."""
    import json

    export = Path(export)
    for f in [export / "config.json", *sorted(export.glob("*.json"))]:
        if f.is_file():
            try:
                found = json.loads(f.read_text()).get("medfound")
            except (ValueError, AttributeError):
                continue
            if isinstance(found, dict) and found.get("datasets") is not None:
                return found
    return {}


def trained_on(lineage: dict[str, Any]) -> dict[str, str]:
    """digest -> "STAGE (NAME)" for every data set a model and its ancestors were trained on, from its lineage
    (`network_lineage(export)`)."""
    out: dict[str, str] = {}
    node: Optional[dict[str, Any]] = lineage
    while node:
        for d in node.get("datasets", []):
            for key in ("digest", "bags_digest"):
                if d.get(key):
                    out.setdefault(d[key], f"{node.get('stage', 'training')} ({d.get('name', '?')})")
        node = node.get("parent")
    return out


def trained_modalities(export: Path) -> list[str]:
    """The modalities of the data sets the exported model's last stage was trained on."""
    return sorted({d.get("modality") for d in network_lineage(export).get("datasets", []) if d.get("modality")})


def external_block(name: str, path: str, splits: list[str], n: int, result: dict[str, Any], by_site: dict,
                   internal: dict[str, Any], digests: tuple = (), trained: Optional[dict[str, str]] = None
                   ) -> dict[str, Any]:
    """One external set beside the internal test: its metrics and intervals, and the drop (external - internal)
    of every metric with the interval of the difference of the two independent bootstraps. A set whose manifest
    (or bags) digest is one the model was trained on (`trained`, from `trained_on`) is not an external site: the
    entry says so (`same_as_training`, and a warning that reaches eval.json, report.md, the card and the console)."""
    import warnings as _warnings

    metrics = result["metrics"]
    drop = {k: (None if v is None or internal["metrics"].get(k) is None else float(v - internal["metrics"][k]))
            for k, v in metrics.items() if isinstance(v, (int, float)) or v is None}
    entry = {"name": name, "path": str(path), "splits": splits, "num_samples": int(n), "metrics": metrics,
             "drop": drop, "by_site": by_site}
    ext_boot, int_boot = result.get("bootstrap"), internal.get("bootstrap")
    if ext_boot and int_boot:
        entry["intervals"] = ext_boot["intervals"]
        too_few = ext_boot.get("too_few") or int_boot.get("too_few")
        entry["drop_intervals"] = {k: None if too_few else difference_interval(ext_boot["values"][k],
                                                                              int_boot["values"][k])
                                   for k in drop if k in ext_boot["values"] and k in int_boot["values"]}
        if too_few:
            entry["too_few"] = too_few
    hit = next((trained[d] for d in digests if d and d in (trained or {})), None)
    if hit:
        entry["same_as_training"] = hit
        msg = (f"external set {name} ({path}) is the very shard set the model was trained on in {hit} (same manifest "
               "digest): it is not an external site, and its drop says nothing about another hospital")
        entry["warnings"] = [msg]
        _warnings.warn(msg, stacklevel=2)
    return entry



def write_predictions(path: Path, class_names: list[str], sets: list[tuple]) -> None:
    """One row per scored sample: set, key, site, label(s), probability per class -> CSV (atomic)."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["set", "key", "site", "label", *[f"p_{c}" for c in class_names]])
    for name, probs, labels, keys, sites in sets:
        for i, key in enumerate(keys):
            label = " ".join(str(int(v)) for v in labels[i]) if np.ndim(labels[i]) else int(labels[i])
            w.writerow([name, key, sites[i] or "", label, *[f"{float(p):.6f}" for p in probs[i]]])
    atomic_write_bytes(path, buf.getvalue().encode())


def write_rows(path: Path, sets: list[tuple[str, list[dict[str, Any]]]]) -> None:
    """Per-sample rows of several sets (segmentation: one per image with its Dice, HD95 and pixel counts) -> one
    CSV with a `set` column first (atomic)."""
    import csv
    import io

    columns: list[str] = []
    for _, rows in sets:
        for r in rows:
            columns += [k for k in r if k not in columns]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["set", *columns], restval="")
    w.writeheader()
    for name, rows in sets:
        for r in rows:
            w.writerow({"set": name, **{k: "" if v is None else v for k, v in r.items()}})
    atomic_write_bytes(Path(path), buf.getvalue().encode())


def dataset_block(manifest, shards: Path, split: str, n: int) -> dict[str, Any]:
    """eval.json's `dataset`: the scored shard set, split and sample count."""
    return {"name": manifest.name, "path": str(shards), "split": split, "modality": manifest.modality,
            "manifest_digest": manifest.digest, "num_samples": int(n)}


def selection_summary(lineage: dict[str, Any]) -> Optional[dict[str, Any]]:
    """eval.json's record of validation-based selection (eval.every): which step of how many won, on what."""
    sel = lineage.get("selection")
    if not sel:  # no eval.every: the last step, fixed in advance, is the export
        return {"policy": "fixed steps", "selected_step": lineage["steps"], "trained_steps": lineage["steps"]} \
            if lineage.get("steps") else None
    return {"policy": "best on validation", "metric": sel["metric"], "split": sel["split"], "every": sel["every"], "direction": sel["direction"],
            "selected_step": sel["best_step"], "value": sel["best_value"], "trained_steps": lineage.get("steps"),
            "scored_steps": [h["step"] for h in sel.get("history", [])], **({"tied": sel["tied"]} if "tied" in sel else {}),
            **({"samples": sel["subset"]["samples"], "of_samples": sel["subset"]["of_samples"]}
               if sel.get("subset") else {})}


def record_tail(warnings: list[str], skipped: list[str], start: float, externals: tuple = (),
                lineage: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The tail every eval.json carries: which validated step was exported (`selection`, eval.every), how many labels the model was trained on when it was a fraction of them
    (`train_labels`, from the export's `lineage`: a metric at 1% of the labels is not one at 100%), warnings (the
    externals' own included), skipped samples, timing and provenance."""
    warnings = list(warnings) + [w for e in externals for w in e.get("warnings", [])]
    subset = (lineage or {}).get("train_subset")
    selection = selection_summary(lineage or {})
    return {**({"train_labels": subset} if subset else {}), **({"selection": selection} if selection else {}),
            "warnings": warnings + ([f"{len(skipped)} undecodable samples skipped"] if skipped else []),
            "skipped_samples": skipped, "seconds": round(time.time() - start, 2),
            "medfound_version": medfound.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


