"""Task kind `mil`: slide-level classification with gated-attention MIL (head.type=abmil) over a bag folder of tile
features from `medfound extract` (data.shards[0]); the backbone that made them stays frozen.

Export: `export/mil.safetensors` (the head's weights) + `mil.json` (head settings, feature width, label schema, the
bag folder's backbone record and digest, lineage). Evaluation: slide-level metrics as for images, per site when
slides carry one, on the internal split and every external bag folder (eval.external, extracted with the same
backbone), the five most-attended tiles per slide, and `heatmaps/<slide>.png` beside eval.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np

from medfound.adapt.extract import extract_bags, tiling
from medfound.adapt.tasks import build_mil_task
from medfound.data.bags import bag_loader, bag_schema, read_bags, slide_index, slides_of
from medfound.data.fractions import training_subset
from medfound.data.ingest.wsi import SLIDE_SUFFIXES
from medfound.data.manifest import LabelSchema, read_manifest
from medfound.evaluate.heatmap import save_heatmap
from medfound.evaluate.metrics import classification_metrics, multilabel_metrics, positive_index, score_with_sites
from medfound.evaluate.procedure import ScoredSet
from medfound.evaluate.records import scored_block
from medfound.evaluate.report import ProbabilityScorer
from medfound.io import sha256_file
from medfound.run import lineage
from medfound.run.selection import build_selection
from medfound.tasks.base import NETWORK_SNIPPET, TaskBase, TrainData, load_strict, register_task


def slide_counts(index: dict, split: str, directory: Path) -> tuple[list[int], int]:
    """Per-class slide counts of `split` of a bag folder and its number of slides."""

    schema = bag_schema(index)
    slides = slides_of(index, split, directory)
    counts = [0] * schema.num_classes
    for s in slides:
        for c in (s["label"] if isinstance(s["label"], list) else [s["label"]]):
            counts[int(c)] += 1
    return counts, len(slides)


@register_task
class MILSpec(TaskBase):
    name = "mil"
    stage = "slide-level MIL"
    export_format = "network"
    evaluation_outputs = ("heatmaps",)  # report.md links ../heatmaps
    weights_file = "mil.safetensors"
    meta_file = "mil.json"
    pipeline_tag = "image-classification"
    capabilities = frozenset({"evaluate", "external", "out"})

    def training_data(self, recipe) -> TrainData:
        """The bag folder, its index and schema, and (data.train_fraction / train_shots) the labelled slides kept:
        stratified by class, nested, seeded, as for images (medfound.data.fractions); class counts for the loss
        weights are those of the slides kept."""

        d = recipe.data
        bags = Path(d.shards[0])
        index = read_bags(bags)
        schema = bag_schema(index)
        counts, n_train = slide_counts(index, d.train_split, bags)
        subset = training_subset(d, str(bags), d.train_split, schema.names,
                                 index=slide_index(index, d.train_split, bags))
        if subset is not None:
            counts, n_train = subset.class_counts or counts, len(subset.keys)
        return TrainData(extra={"bags": bags, "index": index, "schema": schema, "counts": counts,
                                "n_train": n_train}, subset=subset)

    def build(self, recipe, data: TrainData):
        x = data.extra
        if x["schema"].type != "multilabel":  # a head.positive_class that names no class fails before training
            positive_index(x["schema"].names, recipe.head.positive_class)
        return build_mil_task(recipe, x["index"]["backbone"]["feature_dim"], x["schema"], x["counts"], x["n_train"])

    def parameter_table(self, module, recipe) -> None:
        return None

    def selection(self, recipe, data: TrainData, run_dir: Path) -> Any:
        """eval.every: the slides of eval.select_split scored by the evaluation's own code (auroc by default), the
        best step exported (medfound.run.selection)."""

        counts: dict[str, int] = {}
        for s in data.extra["index"]["slides"]:
            counts[s["split"]] = counts.get(s["split"], 0) + 1

        x = data.extra
        index = slide_index(x["index"], recipe.eval.select_split, x["bags"]) if counts.get(recipe.eval.select_split) \
            else None
        return build_selection(recipe, counts, x["schema"].names, run_dir, "auroc",
                               lambda module, keys: self.validate(recipe, module, data, keys), index=index)

    def validate(self, recipe, module, data: TrainData, keys: Optional[frozenset] = None) -> dict[str, Any]:
        """Slide-level metrics of the training head on eval.select_split (the evaluation's metric functions), no
        intervals."""

        x, ev = data.extra, recipe.eval
        schema = x["schema"]
        probs, labels, _, _, _ = score_bags(module, x["bags"], x["index"], {"backbone": x["index"]["backbone"]},
                                            ev.select_split, recipe.data.eval_batch_size, None, only=keys)
        if schema.type == "multilabel":
            return multilabel_metrics(probs, labels, schema.names, split=ev.select_split)["metrics"]
        return classification_metrics(probs, labels, schema.type, schema.names, split=ev.select_split,
                                      specificity=ev.specificity,
                                      positive=positive_index(schema.names, recipe.head.positive_class))["metrics"]

    def train_loader(self, recipe, data: TrainData, ctx):
        d, h = recipe.data, recipe.head
        bags, rank, world = data.extra["bags"], ctx.rank, ctx.world

        def loader(epoch: int):
            batches = bag_loader(bags, d.train_split, d.batch_size, train=True, seed=recipe.trainer.seed, epoch=epoch,
                                 max_tiles=h.max_tiles, balanced=d.balance_classes, keys=data.keys)
            return (b for i, b in enumerate(batches) if i % world == rank)
        return loader

    def normalizer(self, recipe):
        return None  # features, not images

    def describe(self, recipe, data: TrainData) -> str:
        loss = "sigmoid BCE per finding" if data.extra["schema"].type == "multilabel" else "cross-entropy"
        return f"gated-attention MIL (Ilse et al. 2018), {loss}, frozen tile features"

    def lineage(self, recipe, state, data: TrainData) -> dict[str, Any]:
        index = data.extra["index"]
        record = lineage(recipe, state, [], self.stage, self.describe(recipe, data), {})
        record["datasets"] = [{**index["source"], "bags_digest": index["digest"], "slides": len(index["slides"])}]
        record["images_seen"] = state.images_seen  # slides
        return record

    def export(self, recipe, module, lineage: dict[str, Any], data: TrainData, export: Path) -> dict[str, Any]:
        index = data.extra["index"]
        return self.format(recipe).write(self, recipe, module.model, export, lineage=lineage, meta={
            "head": recipe.head.model_dump(), "feature_dim": index["backbone"]["feature_dim"],
            "label_schema": data.extra["schema"].model_dump(), "backbone": index["backbone"],
            "tiling": bag_tiling(index), "bags_digest": index["digest"], "medfound": lineage})

    def load_network(self, export: Path, recipe) -> Any:
        """The trained ABMIL task, loaded strictly from export/mil.safetensors; eval mode.
        `{"features": [B, N, D], "mask": [B, N]}` -> {"logits", "attention"}."""

        export = Path(export)
        meta = json.loads((export / self.meta_file).read_text())
        head = recipe.head.model_copy(update={"class_weights": None})
        task = build_mil_task(recipe.model_copy(update={"head": head}), meta["feature_dim"],
                              LabelSchema(**meta["label_schema"]))
        load_strict(task.model, export / self.weights_file, "head")
        return task.eval()

    def predict_ingest(self, run) -> dict[str, dict[str, Any]]:
        """How `medfound predict` reads raw inputs for this model: slides tiled as the head's bags were (`shard wsi`
        options, recorded in mil.json at export)."""
        tiling = json.loads((run.export / self.meta_file).read_text()).get("tiling")
        if not tiling or not tiling.get("tile_size"):
            raise ValueError(f"{run.export / self.meta_file} records no tiling (a head trained before medfound "
                             "recorded it): re-extract its bags and retrain, or tile the slides yourself with `shard "
                             "wsi` and score the bags with `medfound evaluate`")
        return {"wsi": {"mpp": tiling["mpp"], "tile_size": tiling["tile_size"], "min_tissue": tiling["min_tissue"],
                        "backend": tiling.get("backend") or "tiffslide",
                        "slide_mpp": tiling.get("slide_mpp_override")}}

    predict_options = frozenset({"backbone"})  # the tile backbone, when its recorded path is not here

    def predict(self, run, recipe, staged, out: Path, rt, backbone: Optional[str] = None) -> list[dict[str, Any]]:
        """`medfound predict RUN SLIDE...`: each whole-slide image tiled with the tiling the head's bags were cut
        with (µm/px, tile size, tissue threshold: `shard wsi`'s own reader), embedded by the recorded backbone
        (`extract`'s own code; its sha256 must match, `--backbone DIR` where its recorded path is not on this
        machine), and scored by the head: a row per slide with every class probability and the predicted class, the
        most-attended tile, and `heatmaps/KEY.png` (attention over the slide's thumbnail)."""

        if staged.kind != "wsi":
            raise ValueError(f"a MIL model reads whole-slide images ({', '.join(SLIDE_SUFFIXES)}), not "
                             f"{staged.kind}")
        meta = json.loads((run.export / self.meta_file).read_text())
        want = meta["backbone"]
        folder = Path(backbone or want.get("path") or "")
        weights = folder / "model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"the tile backbone {folder} is not on this machine: pass --backbone DIR (the "
                                    f"export with sha256 {want['sha256'][:12]}... the head was trained on)")
        if sha256_file(weights) != want["sha256"]:
            raise ValueError(f"--backbone {folder} is another backbone (sha256 {sha256_file(weights)[:12]}...) than "
                             f"the one the head was trained on ({want['sha256'][:12]}...)")
        bags = Path(staged.shards).parent / "bags"
        device = rt.torch_device()
        extract_bags(staged.shards, folder, bags, batch_size=rt.batch_size or 64, device=str(device),
                     precision="fp32" if rt.precision == "fp32" else "bf16", num_workers=rt.workers(0))
        index = read_bags(bags)
        task = self.load(run.export, recipe)
        schema_names = meta["label_schema"]["names"]
        probs, _, keys, _, top = score_bags(task, bags, index, meta, None, recipe.data.eval_batch_size,
                                            out / "heatmaps", labelled=False)
        records = {r["slide"]: r for r in index["slides"]}
        multilabel = meta["label_schema"].get("type") == "multilabel"
        rows = []
        for key, p in zip(keys, probs):
            row = {"input": staged.name(key), "key": key, **{f"p_{c}": round(float(v), 6)
                                                            for c, v in zip(schema_names, p)}}
            row["predicted"] = ("|".join(c for c, v in zip(schema_names, p) if v > 0.5) if multilabel
                                else schema_names[int(np.argmax(p))])
            first = (top.get(key) or [{}])[0]
            row.update(tiles=records[key]["tiles"], top_tile_x=first.get("x"), top_tile_y=first.get("y"),
                       heatmap=f"heatmaps/{records[key]['file'].rsplit('.', 1)[0]}.png")
            rows.append(row)
        return rows

    def scorer(self, run, recipe, out: Path) -> Any:
        return MILScorer(self.load(run.export, recipe), json.loads((run.export / self.meta_file).read_text()), recipe,
                         run.export, run.export / self.weights_file, Path(out))

    def publish_details(self, recipe, meta: dict[str, Any], export: Path) -> tuple[list, dict[str, Any]]:
        b = meta["backbone"]
        details = [("tile features", f"{meta['feature_dim']}-d from `{b.get('arch', '?')}` (sha256 "
                                     f"`{b.get('sha256', '?')}`): extract bags with that backbone")]
        return details, {"input": "a bag of tile features [N, D] from the backbone above",
                         "max_tiles": recipe.head.max_tiles}

    def load_snippet(self) -> str:
        return NETWORK_SNIPPET.format(folder="PATH_TO_THIS_FOLDER", what="the attention-MIL head over the tile "
                                      "features of its backbone") + \
            "\n# rows = model.predict(['slide.svs'])  # tiled and embedded as in training (needs the tile backbone)" \
            "\n# on your own bag: model({'features': f[None], 'mask': torch.ones(1, len(f), dtype=torch.bool)})"


def bag_tiling(index: dict) -> Optional[dict[str, Any]]:
    """How a bag folder's tiles were cut (extract records it; for older folders, read from its tile shards' manifest
    when they are on this machine), or None."""
    source = index.get("source") or {}
    if source.get("tiling"):
        return source["tiling"]

    try:
        return tiling(read_manifest(source["shards"]).ingest)
    except (KeyError, OSError, ValueError):
        return None


def score_bags(task, bags: Path, index: dict, meta: dict, split: Optional[str], batch_size: int,
               heatmaps: Optional[Path], labelled: bool = True, only: Optional[frozenset] = None):
    """Slide probabilities, labels, keys and sites of `split` (None: every slide) of a bag folder, the five
    most-attended tiles per slide, and (`heatmaps`) one attention heatmap PNG per slide. `labelled=False`: new
    slides without labels (labels is then None); `only`: just these slides (a validation fraction)."""
    import torch

    if meta["backbone"]["sha256"] != index["backbone"]["sha256"]:
        raise ValueError(f"{bags} was extracted with another backbone ({index['backbone']['path']}) than the one "
                         f"the head was trained on ({meta['backbone']['path']}); re-extract or point data.shards at "
                         "the original bags")
    multilabel = bag_schema(index).type == "multilabel"
    records = {s["slide"]: s for s in index["slides"]}
    probs, labels, keys, sites, top = [], [], [], [], {}
    splits = [split] if split else sorted({s["split"] for s in index["slides"]})
    with torch.no_grad():
        for sp in splits:
            for batch in bag_loader(bags, sp, batch_size, train=False, labelled=labelled, keys=only):
                out = task(batch)
                logits = out["logits"].float()
                probs.append((torch.sigmoid(logits) if multilabel else torch.softmax(logits, 1)).numpy())
                if labelled:
                    labels.append(batch["label"].numpy())
                for i, slide in enumerate(batch["key"]):
                    n = int(batch["mask"][i].sum())
                    att, coords = out["attention"][i, :n].numpy(), batch["coords"][i, :n].numpy()
                    order = np.argsort(-att)[:5]
                    top[slide] = [{"x": int(coords[j][0]), "y": int(coords[j][1]),
                                   "attention": round(float(att[j]), 5)} for j in order]
                    if heatmaps is not None:
                        save_heatmap(bags, records[slide], att, coords,
                                     heatmaps / f"{records[slide]['file'].rsplit('.', 1)[0]}.png")
                keys += batch["key"]
                sites += batch.get("site", [None] * len(batch["key"]))
    if not probs:
        raise ValueError(f"split {split!r} of the bag folder {bags} holds no slides")
    return np.concatenate(probs), np.concatenate(labels) if labelled else None, keys, sites, top


class MILScorer(ProbabilityScorer):
    """Slide-level MIL: the head over every slide's bag, scored as classification (per site, calibration), the most
    attended tiles per slide and (head.heatmaps) `heatmaps/<slide>.png` of the internal split; externals are bag
    folders of the same label schema, extracted with the same backbone."""

    def __init__(self, task, meta: dict, recipe, export: Path, weights: Path, out: Path) -> None:
        super().__init__(recipe, export, weights)
        self.head, self.meta = task, meta
        self.index = read_bags(Path(recipe.data.shards[0]))
        self.schema = bag_schema(self.index)
        self.heatmaps = out / "heatmaps" if recipe.head.heatmaps else None
        self.positive = positive_index(self.schema.names, recipe.head.positive_class) \
            if self.schema.type != "multilabel" else 1

    def score(self, where: str, split: Optional[str], external: bool, keep_values: bool) -> ScoredSet:
        ev = self.recipe.eval
        index = read_bags(Path(where)) if external else self.index
        if external and bag_schema(index).names != self.schema.names:
            raise ValueError(f"external bags {where} have classes {bag_schema(index).names}, the model "
                             f"{self.schema.names}: an external set must share the label schema")
        probs, labels, keys, sites, top = score_bags(self.head, Path(where), index, self.meta, split,
                                                     self.recipe.data.eval_batch_size,
                                                     None if external else self.heatmaps)
        name = index["source"]["name"]
        result, by_site = score_with_sites(probs, labels, sites, self.schema.type, self.schema.names,
                                           f"external {name}" if external else split, ev.bootstrap, ev.seed,
                                           ev.specificity, keep_values=keep_values, interval=ev.interval,
                                           min_per_class=ev.min_per_class, positive=self.positive)
        result["top_tiles"] = top
        splits = [split] if split else sorted({s["split"] for s in index["slides"]})
        dataset = {"name": name, "path": where, "split": split, "modality": index["source"]["modality"],
                   "manifest_digest": index["source"]["digest"], "bags_digest": index["digest"],
                   "num_samples": int(len(labels)), "unit": "slide"}
        return ScoredSet(name if external else "internal", where, splits, len(labels), result, by_site,
                         (index.get("digest"), index["source"].get("digest")), dataset, (probs, labels, keys, sites),
                         warnings=list(result["warnings"]))

    def model_fields(self) -> dict[str, Any]:
        return {"backbone": self.index["backbone"]}

    def body(self, internal: ScoredSet) -> dict[str, Any]:
        probs, labels, keys, _ = internal.rows
        top, multilabel = internal.result["top_tiles"], self.schema.type == "multilabel"
        return {**scored_block(internal.result, internal.by_site, self.schema.type),
                "slides": [{"slide": k, "label": (labels[i].tolist() if multilabel else int(labels[i])),
                            "probs": [round(float(p), 5) for p in probs[i]], "top_tiles": top[k]}
                           for i, k in enumerate(keys)],
                "heatmaps": "heatmaps" if self.heatmaps else None}  # beside eval.json

