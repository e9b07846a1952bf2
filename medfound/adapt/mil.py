"""Slide-level MIL runs end to end: train ABMIL on a bag folder, export it, evaluate it with attention heatmaps.

`medfound finetune adapt/uni_abmil.yaml` (head.type=abmil, data.shards=[BAGS]) comes here through
`workflows.run_finetune`; `medfound evaluate RUN_DIR` through `evaluate.report.evaluate_run`.

Export: `RUN_DIR/export/mil.safetensors` (the head's weights) + `mil.json` (head settings, feature width, label
schema, the bag folder's backbone record and digest, lineage). Evaluation: slide-level metrics as for images, per
site when slides carry one, the five most-attended tiles per slide, and `RUN_DIR/heatmaps/<slide>.png`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medfound.config import FinetuneRecipe
from medfound.data.bags import bag_loader, bag_schema, read_bags, slides_of
from medfound.io import atomic_write_bytes, atomic_write_json, sha256_file


def _counts(index: dict, split: str, directory: Path) -> tuple[list[int], int]:
    schema = bag_schema(index)
    slides = slides_of(index, split, directory)
    counts = [0] * schema.num_classes
    for s in slides:
        for c in (s["label"] if isinstance(s["label"], list) else [s["label"]]):
            counts[int(c)] += 1
    return counts, len(slides)


def run_mil(recipe: FinetuneRecipe, command: str = "medfound finetune") -> dict[str, Any]:
    """Train the ABMIL head on `data.shards[0]` (a bag folder), export it, evaluate it -> eval.json."""
    from safetensors.torch import save

    from medfound.adapt.tasks import build_mil_task
    from medfound.evaluate.report import evaluate_run
    from medfound.train.loop import fit
    from medfound.workflows import _lineage, _seed_per_rank, _start, run_summary

    accelerator, run_dir, resume, text = _start(recipe, command)
    bags = Path(recipe.data.shards[0])
    index = read_bags(bags)
    schema = bag_schema(index)
    counts, n_train = _counts(index, recipe.data.train_split, bags)
    task = build_mil_task(recipe, index["backbone"]["feature_dim"], schema, counts, n_train)
    _seed_per_rank(recipe, accelerator)
    d, h = recipe.data, recipe.head
    rank, world = accelerator.process_index, accelerator.num_processes
    if d.balance_sites or d.stain_normalize:
        raise ValueError("MIL trains on stored tile features: data.balanced_sampling=site and data.stain_normalize "
                         "act on images; stain-normalise when extracting the bags' tiles instead")

    def loader(epoch: int):
        batches = bag_loader(bags, d.train_split, d.batch_size, train=True, seed=recipe.trainer.seed, epoch=epoch,
                             max_tiles=h.max_tiles, balanced=d.balance_classes)
        return (b for i, b in enumerate(batches) if i % world == rank)

    state = fit(task, loader, trainer=recipe.trainer, optim=recipe.optim, lr=recipe.derived.lr, run_dir=run_dir,
                accelerator=accelerator, config_text=text, resume_from=resume, normalize=None)
    summary = run_summary(run_dir, state, accelerator)
    if state.preempted or not accelerator.is_main_process:
        return summary
    task = state.module
    loss = "sigmoid BCE per finding" if schema.type == "multilabel" else "cross-entropy"
    lineage = _lineage(recipe, state, [], "slide-level MIL", f"gated-attention MIL (Ilse et al. 2018), {loss}, "
                       "frozen tile features", {})
    lineage["datasets"] = [{**index["source"], "bags_digest": index["digest"], "slides": len(index["slides"])}]
    lineage["images_seen"] = state.images_seen  # slides
    export = run_dir / "export"
    weights = {k: v.detach().contiguous() for k, v in task.model.state_dict().items()}
    atomic_write_bytes(export / "mil.safetensors", save(weights))
    atomic_write_json(export / "mil.json", {"head": h.model_dump(), "feature_dim": index["backbone"]["feature_dim"],
                                            "label_schema": schema.model_dump(), "backbone": index["backbone"],
                                            "bags_digest": index["digest"], "medfound": lineage})
    report = evaluate_run(run_dir)
    summary.update(export=str(export), eval=report["metrics"], eval_file=str(run_dir / "eval.json"))
    return summary


def load_mil(run_dir: Path, recipe: FinetuneRecipe) -> torch.nn.Module:
    """The trained ABMIL task of a run, loaded strictly from `export/mil.safetensors`."""
    from safetensors.torch import load_file

    from medfound.adapt.tasks import build_mil_task
    from medfound.data.manifest import LabelSchema

    export = Path(run_dir) / "export"
    meta = json.loads((export / "mil.json").read_text())
    head = recipe.head.model_copy(update={"class_weights": None})
    task = build_mil_task(recipe.model_copy(update={"head": head}), meta["feature_dim"],
                          LabelSchema(**meta["label_schema"]))
    try:
        task.model.load_state_dict(load_file(str(export / "mil.safetensors")))
    except RuntimeError as e:
        raise RuntimeError(f"{export}/mil.safetensors does not fit the head the run's recipe builds "
                           f"(was the recipe edited?): {e}") from None
    return task.eval()


@torch.no_grad()
def evaluate_mil(run_dir: Path, recipe: FinetuneRecipe, split: str) -> dict[str, Any]:
    """Slide-level metrics on `split` of the bag folder, attention heatmaps -> eval.json."""
    from medfound.evaluate.heatmap import save_heatmap
    from medfound.evaluate.metrics import score_with_sites
    from medfound.evaluate.report import _record, scored_block

    run_dir = Path(run_dir)
    bags = Path(recipe.data.shards[0])
    index = read_bags(bags)
    schema = bag_schema(index)
    meta = json.loads((run_dir / "export" / "mil.json").read_text())
    if meta["backbone"]["sha256"] != index["backbone"]["sha256"]:
        raise ValueError(f"{bags} was extracted with another backbone ({index['backbone']['path']}) than the one "
                         f"the head was trained on ({meta['backbone']['path']}); re-extract or point data.shards at "
                         "the original bags")
    task = load_mil(run_dir, recipe)
    records = {s["slide"]: s for s in index["slides"]}
    start = time.time()
    probs, labels, keys, sites, top = [], [], [], [], {}
    multilabel = schema.type == "multilabel"
    for batch in bag_loader(bags, split, recipe.data.eval_batch_size, train=False):
        out = task(batch)
        logits = out["logits"].float()
        probs.append((torch.sigmoid(logits) if multilabel else torch.softmax(logits, 1)).numpy())
        labels.append(batch["label"].numpy())
        for i, slide in enumerate(batch["key"]):
            n = int(batch["mask"][i].sum())
            att, coords = out["attention"][i, :n].numpy(), batch["coords"][i, :n].numpy()
            order = np.argsort(-att)[:5]
            top[slide] = [{"x": int(coords[j][0]), "y": int(coords[j][1]), "attention": round(float(att[j]), 5)}
                          for j in order]
            if recipe.head.heatmaps:
                save_heatmap(bags, records[slide], att, coords, run_dir / "heatmaps" / f"{records[slide]['file'].rsplit('.', 1)[0]}.png")
        keys += batch["key"]
        sites += batch.get("site", [None] * len(batch["key"]))
    probs, labels = np.concatenate(probs), np.concatenate(labels)

    ev = recipe.eval
    result, by_site = score_with_sites(probs, labels, sites, schema.type, schema.names, split, ev.bootstrap, ev.seed,
                                       ev.specificity)
    report = {
        "task": "mil",
        "label_type": schema.type,
        "class_names": schema.names,
        "dataset": {"name": index["source"]["name"], "path": str(bags), "split": split,
                    "modality": index["source"]["modality"], "manifest_digest": index["source"]["digest"],
                    "bags_digest": index["digest"], "num_samples": int(len(labels)), "unit": "slide"},
        "model": {"export": str(run_dir / "export"), "sha256": sha256_file(run_dir / "export" / "mil.safetensors"),
                  "backbone": index["backbone"]},
        **scored_block(result, by_site, schema.type),
        "slides": [{"slide": k, "label": (labels[i].tolist() if multilabel else int(labels[i])),
                    "probs": [round(float(p), 5) for p in probs[i]], "top_tiles": top[k]} for i, k in enumerate(keys)],
        "heatmaps": str(run_dir / "heatmaps") if recipe.head.heatmaps else None,
        **_record(result["warnings"], [], start),
    }
    atomic_write_json(run_dir / "eval.json", report)
    if ev.report:
        from medfound.evaluate.markdown import write_report

        write_report(run_dir, report, predictions=[("internal", probs, labels, keys, sites)])
    return report
