"""`medfound bench BACKBONE [BACKBONE ...] --suite SUITE --out DIR`: every backbone through every task and protocol
of a suite, then the paired differences between backbones; see medfound/bench/__init__.py for the whole picture."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional

from medfound.bench.backbones import resolve
from medfound.bench.report import write_all
from medfound.bench.suite import load_suite
from medfound.data.fractions import label_index
from medfound.data.location import is_url
from medfound.data.manifest import read_manifest
from medfound.data.samples import sample_data, shard_commands
from medfound.io import atomic_write_json, is_run_dir
from medfound.registry import BENCH_PROTOCOLS

# Loaded by torch-free commands (`medfound ls`, `validate`, `--help`): medfound modules that bring in torch or
# numpy are imported inside the functions that need them (tests/test_layering.py keeps it so).

MARKER = ".medfound-bench.json"


def prepare_out(out: Path, record: dict[str, Any]) -> None:
    """A new or empty `out`, or one an earlier bench wrote (its marker): finished work there is reused (features,
    fine-tuning runs); any other folder is refused, so bench never writes into a folder it did not make."""

    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        what = "a training run directory" if is_run_dir(out) else "files medfound bench did not write"
        raise FileExistsError(f"--out {out} holds {what}: choose a new folder (a folder an earlier `medfound bench` "
                              "wrote is continued, reusing its features and runs)")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / MARKER, record)


def task_shards(task, out: Path, base: Path) -> str:
    """The task's labelled shard set: given (`shards:`), or made once under OUT/shards (`sample:`, `npz:`)."""
    from medfound.workflows import shard

    if task.shards is not None:
        if is_url(task.shards):
            return task.shards
        path = Path(task.shards)
        path = path if path.is_absolute() else (base / path)
        if not (path / "manifest.json").is_file():
            raise FileNotFoundError(f"task {task.name}: {path} holds no manifest.json (shard the data set first: "
                                    f"`medfound shard KIND INPUT --out {path}`)")
        return str(path)
    target = out / "shards" / task.name
    if (target / "manifest.json").is_file():
        return str(target)
    if task.sample is not None:
        argv = next(a for a in shard_commands(out / "bundled", sample_data())
                    if a[a.index("--name") + 1] == task.sample)
        opts = dict(zip(argv[3::2], argv[4::2]))
        npz, label_type = Path(argv[2]), opts.get("--label-type")
        names = opts.get("--label-names", "").split(",") or None
        modality, license = opts.get("--modality", "other"), opts.get("--license")
    else:
        npz = Path(task.npz) if Path(task.npz).is_absolute() else base / task.npz
        if not npz.is_file():
            raise FileNotFoundError(f"task {task.name}: npz {npz} not found")
        label_type, names, modality, license = task.label_type, task.label_names, task.modality, None
    shard("npz", npz, target, name=task.name, modality=modality, label_type=label_type, label_names=names,
          license=license, max_count=1000, workers=1)
    return str(target)


def run_bench(specs: list[str], suite_name: str, out: str | Path, cache: Optional[str | Path] = None,
              progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the suite for every backbone; returns {"results", "paired", "written"} (see medfound.bench.report)."""
    import medfound
    import numpy as np

    from medfound.bench.features import Features, cached_features, in_order
    from medfound.bench.protocols import TaskData
    from medfound.bench.stats import paired, score
    from medfound.evaluate.metrics import positive_index
    from medfound.tasks.images import check_img_size

    start = time.time()
    suite_path, suite = load_suite(suite_name)
    backbones = [resolve(s) for s in specs]
    labels = [b.label for b in backbones]
    if len(set(labels)) != len(labels):
        raise ValueError(f"backbone labels must differ ({labels}): name them LABEL=SPEC")
    unknown = sorted({x for p in suite.protocols for x in (getattr(p, "backbones", None) or [])} - set(labels))
    if unknown:
        raise ValueError(f"suite {suite.name} restricts protocols to backbones {unknown}, which are not given "
                         f"(given: {', '.join(labels)})")
    out = Path(out)
    record = {"suite": {"name": suite.name, "path": str(suite_path), "config": suite.model_dump(mode="json")},
              "backbones": [{"label": b.label, "spec": b.spec} for b in backbones],
              "medfound_version": medfound.__version__}
    prepare_out(out, {**record, "written_by": "medfound bench"})
    cache = Path(cache) if cache is not None else out / "features"
    results: list[dict[str, Any]] = []
    pairs: list[dict[str, Any]] = []
    for task in suite.tasks:
        shards = task_shards(task, out, suite_path.parent)
        manifest = read_manifest(shards)
        schema = manifest.label_schema
        if schema.type in ("none", "multilabel"):
            raise ValueError(f"task {task.name}: {shards} is {schema.type}; bench scores single-label tasks "
                             "(binary, multi-class, ordinal)")
        missing = [s for s in (task.train_split, task.val_split, task.test_split)
                   if not manifest.counts["by_split"].get(s)]
        if missing:
            raise ValueError(f"task {task.name}: {shards} has no split {missing} (it has "
                             f"{', '.join(manifest.counts['by_split'])}); set train_split / val_split / test_split")
        positive = positive_index(schema.names, None) if schema.type == "binary" else 1
        index = {"train": label_index(shards, task.train_split), "val": label_index(shards, task.val_split),
                 "test": label_index(shards, task.test_split)}
        order = {split: [k for k, _, _ in index[name]] for name, split in
                 (("train", task.train_split), ("val", task.val_split), ("test", task.test_split))}
        test = Features(order[task.test_split], np.zeros((len(index["test"]), 0), np.float32),
                        np.array([label for _, label, _ in index["test"]], dtype=np.int64))
        scored: dict[tuple, dict[str, Any]] = {}
        for b in backbones:
            protocols = [p for p in suite.protocols if not getattr(p, "backbones", None) or b.label in p.backbones]
            prep = b.input_config()
            if task.img_size is not None:
                prep["img_size"] = task.img_size
            built: dict[str, Any] = {}

            def model_fn(b=b, prep=prep, built=built):
                if "model" not in built:
                    built["model"] = b.build()
                    check_img_size(built["model"], prep["img_size"])
                return built["model"]

            feats = {task.test_split: test}
            if any(p.needs_features for p in protocols):  # frozen features of the three splits, cached
                for split in (task.train_split, task.val_split, task.test_split):
                    found, hit = cached_features(b, model_fn, shards, split, prep, cache, len(schema.names), progress)
                    feats[split] = in_order(found, order[split])  # the label index's order: paired by position
                    log(f"{task.name} / {b.label}: {split} features {found.x.shape} "
                        f"({'cached' if hit else 'computed'})")
            data = TaskData(task, shards, schema.names, schema.type, positive, feats.get(task.train_split),
                            feats.get(task.val_split), feats[task.test_split], index, b, prep,
                            out / "runs" / task.name / _safe(b.label), progress)
            for proto in protocols:
                runner = BENCH_PROTOCOLS.get(proto.name).load()
                for pred in runner(proto, data, suite.fractions if proto.uses_fractions else [], suite.seeds):
                    s = score(pred, data.test.y, task.metric, schema.type, positive, suite.bootstrap,
                              suite.bootstrap_seed)
                    row = {"task": task.name, "backbone": b.label, "protocol": pred.protocol, "setting": pred.setting,
                           "fraction": pred.fraction, "shots": pred.shots, "seed": pred.seed, "metric": task.metric,
                           "value": s["value"], "low": s["low"], "high": s["high"], "n_train": pred.n_train,
                           "degenerate": bool(pred.notes.get("degenerate")),
                           "notes": {k: v for k, v in pred.notes.items() if k != "degenerate"},
                           "interval": s["interval"]}
                    results.append(row)
                    scored.setdefault((pred.protocol, pred.setting, pred.seed), {})[b.label] = s
                    flag = " (degenerate: one class for every sample)" if row["degenerate"] else ""
                    interval = "" if s["low"] is None else f" [{s['low']:.3f}, {s['high']:.3f}]"
                    log(f"{task.name} / {b.label} / {pred.protocol} {pred.setting} seed {pred.seed}: "
                        f"{task.metric} {s['value']}{interval}{flag}")
        for (protocol, setting, seed), by_backbone in scored.items():
            names = list(by_backbone)
            for i, a in enumerate(names):
                for b_ in names[i + 1:]:
                    q = paired(by_backbone[a], by_backbone[b_])
                    if q is not None:
                        pairs.append({"task": task.name, "protocol": protocol, "setting": setting, "seed": seed,
                                      "metric": task.metric, "a": a, "b": b_, **q})
    record["seconds"] = round(time.time() - start, 1)
    written = write_all(out, results, pairs, suite, record)
    return {"results": results, "paired": pairs, "written": written}


def _safe(label: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_\-.]+", "_", label).strip("_") or "backbone"
