"""Task kind `classification`: timm's classifier on a backbone (head.type=classify), single-label, graded or
multi-label, by LoRA / full / last-k / linear probe; the export is the merged classifier as a timm folder
(+ the peft adapter), evaluated with per-site, external-site and unit-level results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medfound.adapt.tasks import build_classification_task, endpoint
from medfound.adapt.tuning import merged_copy, print_parameter_table
from medfound.config import BackboneConfig
from medfound.data.loaders import (class_keep_rates, eval_image_transform, image_train_loader, normalizer, prepare,
                                   train_image_transform)
from medfound.data.manifest import LabelSchema, read_manifest
from medfound.data.pipeline import Decoding, Reading, make_loader, shard_urls
from medfound.data.scale import first_metas, require_spacing, scale_stats
from medfound.evaluate.metrics import aggregate_units, classification_metrics, multilabel_metrics, positive_index
from medfound.evaluate.report import CLASSIFICATION_NORMALISED, ClassificationScorer
from medfound.io import atomic_write_bytes
from medfound.publish.export import read_lineage
from medfound.registry import HEADS
from medfound.run import backbone_structure, lineage, parent_lineage
from medfound.run.selection import apply_selection, build_selection
from medfound.tasks.base import NETWORK_SNIPPET, TrainData, load_strict, register_task
from medfound.tasks.images import TimmExport, check_img_size, image_training_data, tuning_words
from medfound.train.checkpoint import load_checkpoint

TUNING_TEXT = {"lora": "LoRA (r={r}, alpha={alpha}) + classifier", "full": "full fine-tuning",
               "linear_probe": "linear probe (frozen backbone)", "last_k": "last {k} blocks + classifier"}


@register_task
class ClassificationSpec(TimmExport):
    name = "classification"
    stage = "fine-tuning"
    weights_file = "model.safetensors"
    meta_file = "classifier.json"  # the network format's (a head timm cannot rebuild); timm folders use config.json
    pipeline_tag = "image-classification"
    capabilities = frozenset({"evaluate", "external", "out"})

    def training_data(self, recipe) -> TrainData:
        return image_training_data(recipe)

    def build(self, recipe, data: TrainData):
        m = data.manifests[0]
        split = recipe.data.train_split
        schema = endpoint(m.label_schema, recipe.head.binary_threshold)
        if schema.type != "multilabel":  # a head.positive_class that names no class fails before training
            positive_index(schema.names, recipe.head.positive_class)
        counts, total = m.class_counts(split), m.counts["by_split"].get(split)
        if data.subset is not None:  # class weights from the labels actually trained on
            counts, total = data.subset.class_counts or counts, len(data.subset.keys)
        task = HEADS.build(recipe.head.type, recipe, m.label_schema, counts, total)
        check_img_size(task.model, recipe.data.img_size)
        return task

    def parameter_table(self, module, recipe) -> None:
        print_parameter_table(module.model, recipe.tuning, module.classifier)

    def train_loader(self, recipe, data: TrainData, ctx):
        keep = class_keep_rates(recipe.data, data.manifests[0], recipe.head.binary_threshold,
                                counts=data.subset.class_counts if data.subset is not None else None)
        return image_train_loader(recipe.data, recipe.trainer.seed, data.sets, data.manifests,
                                  train_image_transform(recipe.data), labelled=True, class_keep=keep, keys=data.keys)

    def describe(self, recipe, data: TrainData) -> str:
        schema = endpoint(data.manifests[0].label_schema, recipe.head.binary_threshold)
        loss = "sigmoid binary cross-entropy per finding" if schema.type == "multilabel" else "cross-entropy"
        return f"{tuning_words(recipe, TUNING_TEXT)}, {loss}"

    def lineage(self, recipe, state, data: TrainData) -> dict[str, Any]:
        record = lineage(recipe, state, data.manifests, self.stage, self.describe(recipe, data),
                         parent_lineage(recipe.backbone))

        record["label_schema"] = state.module.label_schema.model_dump()  # the endpoint trained
        record["tuning"] = recipe.tuning
        record["scale"] = scale_stats(recipe.data.shards[0], recipe.data.train_split)  # the scale it expects
        return record

    def export(self, recipe, module, lineage: dict[str, Any], data: TrainData, export: Path) -> dict[str, Any]:
        d, schema = recipe.data, module.label_schema
        structure = recipe.backbone.model_copy(update={"weights": None}) if recipe.backbone.name else \
            backbone_structure(recipe, recipe.backbone.weights)
        meta = {"medfound": lineage, "head": recipe.head.model_dump(), "label_names": schema.names,
                "label_schema": schema.model_dump(), "backbone": structure.model_dump(mode="json"),
                "input_size": [3, d.img_size, d.img_size], "mean": list(d.mean), "std": list(d.std)}
        return self.format(recipe).write(self, recipe, merged_copy(module.model), export, lineage=lineage,
                                         meta=meta, adapter=module.model if recipe.tuning == "lora" else None)

    def selection(self, recipe, data: TrainData, run_dir: Path) -> Any:
        """eval.every: score eval.select_split during training and export the best step (medfound.run.selection)."""

        m = data.manifests[0]
        return build_selection(recipe, m.counts["by_split"], m.label_schema.names, run_dir, "auroc",
                               lambda module, keys: self.validate(recipe, module, keys))

    def validate(self, recipe, module, keys: frozenset | None = None) -> dict[str, Any]:
        """The metrics of the training module (eval mode, on its device) on eval.select_split (only `keys` of it,
        when given), no intervals."""
        import torch

        d, ev = recipe.data, recipe.eval
        manifest = read_manifest(d.shards[0])
        schema = endpoint(manifest.label_schema, recipe.head.binary_threshold)
        multilabel = schema.type == "multilabel"
        urls = shard_urls([d.shards[0]], ev.select_split)[0]
        loader = make_loader(urls, Decoding(prepare(d, eval_image_transform(d)), labelled=True,
                                            num_classes=manifest.label_schema.num_classes, multilabel=multilabel,
                                            max_bad_fraction=d.max_bad_fraction), batch_size=d.eval_batch_size,
                             reading=Reading(split_by_node=False, keys=keys))  # the main process validates all of it
        device = next(module.parameters()).device
        norm = normalizer(d).to(device)
        probs, labels = [], []
        with torch.no_grad():
            for batch in loader:
                logits = module.model(norm(batch["image"].to(device))).float()
                probs.append((torch.sigmoid(logits) if multilabel else torch.softmax(logits, 1)).cpu().numpy())
                labels.append(batch["label"].numpy())
        import numpy as np

        p, y = np.concatenate(probs), np.concatenate(labels)
        if recipe.head.binary_threshold is not None:
            y = (y >= recipe.head.binary_threshold).astype(np.int64)
        if multilabel:
            return multilabel_metrics(p, y, schema.names, split=ev.select_split)["metrics"]
        return classification_metrics(p, y, schema.type, schema.names, split=ev.select_split,
                                      specificity=ev.specificity,
                                      positive=positive_index(schema.names, recipe.head.positive_class))["metrics"]

    def scale_normalised(self, recipe) -> tuple[str, ...]:
        """The scale keys the preprocessing evens out (not compared by the scale check; evaluate's rule)."""

        return CLASSIFICATION_NORMALISED

    def predict(self, run, recipe, staged, out: Path, rt) -> list[dict[str, Any]]:
        """`medfound predict`: the exported classifier on every sample of `staged.shards` (medfound.predict) ->
        the rows of predictions.csv, one per input (a DICOM frame each): every class probability, the predicted class,
        and for binary models with an operating point in eval.json (sens_at_spec) the decision at its threshold."""
        import json

        import torch
        from tqdm.auto import tqdm

        d = recipe.data
        names = read_lineage(run.export).get("label_schema", {}).get("names") or \
            read_manifest(d.shards[0]).label_schema.names  # the endpoint the classifier was trained on
        multilabel = read_lineage(run.export).get("label_schema", {}).get("type") == "multilabel"
        report = json.loads((run.path / "eval.json").read_text()) if (run.path / "eval.json").is_file() else {}
        point = report.get("operating_point") or {}
        manifest = read_manifest(staged.shards)
        if d.spacing_mm is not None:  # every input needs its own pixel spacing, before any is predicted

            require_spacing(staged.shards, "the inputs (DICOM carries PixelSpacing; PNG/JPEG do not)")
        urls = [u for split in manifest.counts["by_split"] for u in shard_urls([staged.shards], split)[0]]
        agg = recipe.eval.aggregate
        if agg is not None:  # units only where the inputs record the unit fields (a table's columns, DICOM tags)

            missing = sorted({f for m in first_metas(staged.shards) for f in agg.by if m.get(f) in (None, "")})
            if missing:
                rt.warnings.append(f"eval.aggregate by {agg.by}: the inputs do not record {missing} (an images "
                                   "table's columns, DICOM's own tags, or a shard set's meta); units.csv is not "
                                   "written, the images are predicted one by one")
                agg = None
        loader = make_loader(urls, Decoding(prepare(d, eval_image_transform(d)), max_bad_fraction=1.0,
                                            keep_meta=agg.by if agg else ()),
                             batch_size=rt.batch_size or d.eval_batch_size, reading=Reading(split_by_node=False),
                             num_workers=rt.workers(d.num_workers))
        model = self.load(run.export, recipe)
        device = rt.torch_device()
        model, norm = model.to(device), normalizer(d).to(device)
        rows: list[dict[str, Any]] = []
        metas: list[dict[str, Any]] = []
        with torch.no_grad(), tqdm(total=manifest.counts["total"], desc="predict", unit="img",
                                   disable=not rt.progress) as bar:
            for batch in loader:
                with rt.autocast(device):
                    logits = model(norm(batch["image"].to(device))).float()
                probs = (torch.sigmoid(logits) if multilabel else torch.softmax(logits, 1)).cpu().numpy()
                metas += batch.get("meta", [{}] * len(probs))
                for key, p in zip(batch["key"], probs):
                    row = {"input": staged.name(key), "key": key,
                           **{f"p_{c}": round(float(v), 6) for c, v in zip(names, p)}}
                    if multilabel:
                        row["predicted"] = "|".join(c for c, v in zip(names, p) if v > 0.5)
                    else:
                        row["predicted"] = names[int(p.argmax())]
                        if point.get("threshold") is not None and point.get("positive_class") in names:
                            pos = names.index(point["positive_class"])
                            row[f"decision_at_specificity_{point['specificity_target']:g}"] = \
                                point["positive_class"] if p[pos] >= point["threshold"] else \
                                names[1 - pos] if len(names) == 2 else "not " + point["positive_class"]
                    rows.append(row)
                bar.update(len(batch["key"]))
        if agg is not None and rows:
            write_units(out, rows, metas, names, agg, multilabel)
        return rows

    def rebuild(self, run_dir: Path, recipe) -> Any:
        """The trained classifier rebuilt from the recipe and the newest checkpoint, LoRA merged."""

        export = Path(run_dir) / "export"
        schema = LabelSchema(**read_lineage(export)["label_schema"])
        # loss weights do not change the network; the lineage's schema is already the trained endpoint
        head = recipe.head.model_copy(update={"class_weights": None, "binary_threshold": None})
        task = build_classification_task(recipe.model_copy(update={"backbone": backbone_structure(recipe, export),
                                                                   "head": head}), schema)
        load_checkpoint(self.checkpoint(run_dir), task)
        apply_selection(run_dir, task)  # eval.every: the selected step's weights, as the export holds
        return merged_copy(task.model)

    def load_network(self, export: Path, recipe) -> Any:
        """The `network` format (a head timm cannot rebuild, e.g. an MLP): the classifier rebuilt by the head's own
        builder from the recorded backbone structure and label schema, loaded strictly; eval mode. Images -> logits,
        as timm's classifier."""
        import json

        meta = json.loads((Path(export) / self.meta_file).read_text())
        head = recipe.head.model_copy(update={"class_weights": None, "binary_threshold": None})
        built = recipe.model_copy(update={"backbone": BackboneConfig(**meta["backbone"]), "head": head,
                                          "tuning": "full"})
        task = HEADS.build(recipe.head.type, built, LabelSchema(**meta["label_schema"]), None, None)
        load_strict(task.model, Path(export) / self.weights_file, "classifier")
        return task.model.eval()

    def publish_details(self, recipe, meta: dict[str, Any], export: Path) -> tuple[list, dict[str, Any]]:
        return [("classes", ", ".join(meta["label_names"]))], \
            {"input_size": meta["input_size"], "mean": meta["mean"], "std": meta["std"]}

    def load_snippet(self) -> str:
        return NETWORK_SNIPPET.format(folder="PATH_TO_THIS_FOLDER", what="the classifier, eval mode") + \
            "\n# rows = model.predict(['image.png'])  # class probabilities, preprocessed as in training" \
            "\n# by hand, after that preprocessing: model(x) -> logits [B, K]"

    def scorer(self, run, recipe, out: Path) -> Any:
        return ClassificationScorer(self.load(run.export, recipe), recipe, run.export, run.export / self.weights_file)


def write_units(out: Path, rows: list[dict[str, Any]], metas: list[dict[str, Any]], names: list[str], agg: Any,
                multilabel: bool) -> None:
    """eval.aggregate for new studies: the image probabilities combined per unit (e.g. a breast from its CC and MLO
    views) exactly as evaluation combines them (`aggregate_units`) -> `out`/units.csv (`metas`: each row's unit
    fields)."""
    import csv
    import io

    import numpy as np

    probs = np.array([[float(r[f"p_{c}"]) for c in names] for r in rows])
    ids = [tuple(str(m[f]) for f in agg.by) for m in metas]
    dummy = np.zeros((len(rows), len(names)) if multilabel else len(rows), dtype=np.int64)
    unit_probs, _, units = aggregate_units(probs, dummy, ids, agg.reduce)
    members: dict[tuple, int] = {}
    for u in ids:
        members[u] = members.get(u, 0) + 1
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([*agg.by, "images", *(f"p_{c}" for c in names), "predicted"])
    for u, p in zip(units, unit_probs):
        predicted = "|".join(c for c, v in zip(names, p) if v > 0.5) if multilabel else names[int(np.argmax(p))]
        w.writerow([*u, members[u], *(round(float(v), 6) for v in p), predicted])
    atomic_write_bytes(out / "units.csv", buf.getvalue().encode())
