"""The benchmark protocols: each turns a task's frozen features (or the backbone itself, for fine-tuning) into test
predictions at every label fraction (or shot count) and seed. Registered in `medfound.registry.BENCH_PROTOCOLS`
(medfound/bench/suite.py); the statistics over the predictions are medfound/bench/stats.py's.

The labelled subsets are the fine-tuning path's own (`medfound.data.fractions.choose` on the training split's keys,
labels and patient tokens, seeded by the suite's seed): kNN, the linear probe and LoRA at 1% with seed 0 use the same
samples, and the 1% subset lies inside the 10% one. Wherever a protocol chooses anything on the validation split (the
linear probe's C, fine-tuning's selected step), it sees the same fraction of that split, never more labels than
training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from medfound.config import find_recipe, load_recipe
from medfound.data.fractions import choose
from medfound.evaluate.probes import knn_probs, logistic_probs, metric_value, simpleshot_probs
from medfound.io import atomic_write_json
from medfound.workflows import train


@dataclass
class TaskData:
    """One task x one backbone: what every protocol reads."""

    task: Any                 # medfound.bench.suite.BenchTask
    shards: str
    class_names: list[str]
    label_type: str
    positive: int             # binary: the positive column
    train: Any                # medfound.bench.features.Features
    val: Any
    test: Any
    index: dict[str, list]    # split -> label_index (key, label, patient), for the subsets
    backbone: Any             # medfound.bench.backbones.Backbone
    prep: dict[str, Any]
    work: Path                # OUT/runs/<task>/<backbone>: fine-tuning runs
    progress: bool = True


@dataclass
class Prediction:
    """A protocol's test predictions at one setting: probs `[N, K]`, or `[draws, N, K]` for few-shot."""

    protocol: str
    setting: str              # "fraction=0.01" / "shots=4"
    fraction: Optional[float]
    shots: Optional[int]
    seed: int
    probs: np.ndarray
    n_train: int
    notes: dict[str, Any] = field(default_factory=dict)


def _subset_rows(feats, index: list, fraction: Optional[float], shots: Optional[int], seed: int,
                 names: list[str], validation: bool = False) -> np.ndarray:
    """Row numbers of `feats` in the labelled subset (all rows at fraction 1); `validation`: a selection subset, every
    class keeping at least one sample (as fine-tuning's selection does)."""

    if shots is None and (fraction is None or fraction >= 1):
        return np.arange(len(feats.keys))
    keys = choose(index, names, fraction=fraction, shots=shots, seed=seed, at_least_one=validation).keys
    rows = np.array([i for i, k in enumerate(feats.keys) if k in keys], dtype=np.int64)
    if len(rows) != len(keys):
        raise ValueError(f"{len(keys) - len(rows)} chosen samples have no features (the shard set changed since "
                         "its features were cached?)")
    return rows


def _settings(fractions: list[float]) -> list[tuple[str, Optional[float], Optional[int]]]:
    return [(f"fraction={f:g}", f, None) for f in fractions]


def _degenerate(probs: np.ndarray) -> bool:
    return len(np.unique(probs.argmax(axis=-1))) == 1


def _fraction_subsets(data: TaskData, fractions: list[float], seeds: list[int]):
    """(seed, setting, fraction, training rows) for every seed and fraction, in that order."""
    for seed in seeds:
        for setting, f, _ in _settings(fractions):
            yield seed, setting, f, _subset_rows(data.train, data.index["train"], f, None, seed, data.class_names)


def run_knn(cfg, data: TaskData, fractions: list[float], seeds: list[int]) -> list[Prediction]:
    out = []
    k = len(data.class_names)
    for seed, setting, f, rows in _fraction_subsets(data, fractions, seeds):
        probs = knn_probs(data.train.x[rows], data.train.y[rows], data.test.x, k, cfg.k, cfg.temperature)
        out.append(Prediction("knn", setting, f, None, seed, probs, len(rows),
                              {"k": min(cfg.k, len(rows)), "temperature": cfg.temperature,
                               "degenerate": _degenerate(probs)}))
    return out


def run_linear(cfg, data: TaskData, fractions: list[float], seeds: list[int]) -> list[Prediction]:
    out = []
    k = len(data.class_names)
    for seed, setting, f, rows in _fraction_subsets(data, fractions, seeds):
        val = _subset_rows(data.val, data.index["val"], f, None, seed, data.class_names, validation=True)
        xtr, ytr = data.train.x[rows], data.train.y[rows]
        scores = []
        for c in cfg.c_grid:  # the validation subset chooses C (the task's metric; ties: the smaller C)
            p = logistic_probs(xtr, ytr, data.val.x[val], k, c, cfg.max_iter)
            v = metric_value(data.task.metric, p, data.val.y[val], data.label_type, data.positive)
            scores.append(-np.inf if v is None else v)
        best = int(np.argmax(scores))
        probs = logistic_probs(xtr, ytr, data.test.x, k, cfg.c_grid[best], cfg.max_iter)
        out.append(Prediction("linear", setting, f, None, seed, probs, len(rows),
                              {"C": cfg.c_grid[best], "validation_samples": int(len(val)),
                               "validation_value": None if not np.isfinite(scores[best]) else
                               round(float(scores[best]), 4), "degenerate": _degenerate(probs)}))
    return out


def run_fewshot(cfg, data: TaskData, fractions: list[float], seeds: list[int]) -> list[Prediction]:
    out = []
    k = len(data.class_names)
    for seed in seeds:
        for shots in cfg.shots:
            draws = []
            for draw in range(cfg.draws):  # the draws are seeded: the same supports for every backbone
                rows = _subset_rows(data.train, data.index["train"], None, shots, seed * 1_000_003 + draw,
                                    data.class_names)
                draws.append(simpleshot_probs(data.train.x[rows], data.train.y[rows], data.test.x, k))
            probs = np.stack(draws)
            out.append(Prediction("fewshot", f"shots={shots}", None, shots, seed, probs, shots * k,
                                  {"draws": cfg.draws,
                                   "degenerate": bool(np.mean([_degenerate(p) for p in probs]) > 0.5)}))
    return out


def run_finetune(cfg, data: TaskData, fractions: list[float], seeds: list[int]) -> list[Prediction]:
    """`medfound finetune` from the backbone at each fraction and seed (a run directory each, under
    OUT/runs/TASK/BACKBONE; a finished one is reused, a killed one continues with trainer.resume=auto)."""

    out = []
    t = data.task
    for seed in seeds:
        for setting, f, _ in _settings(fractions):
            run = data.work / f"{cfg.name}_f{f:g}_s{seed}"
            n_subset = len(data.index["train"]) if f >= 1 else len(choose(
                data.index["train"], data.class_names, fraction=f, seed=seed).keys)
            batch = min(cfg.batch_size, n_subset)  # training batches are full-size: never larger than the subset
            few = _thin_validation(cfg, data, f, seed) if cfg.every and cfg.min_val_per_class else None
            every = None if few else cfg.every
            overrides = [*data.backbone.recipe_overrides(), f"data.shards=[{data.shards}]",
                         f"data.train_split={t.train_split}", f"data.img_size={data.prep['img_size']}",
                         f"data.mean=[{','.join(map(str, data.prep['mean']))}]",
                         f"data.std=[{','.join(map(str, data.prep['std']))}]",
                         f"data.batch_size={batch}", f"tuning={cfg.name}",
                         f"trainer.output_dir={run}", f"trainer.max_steps={cfg.steps}", f"trainer.seed={seed}",
                         f"trainer.checkpoint_every={max(every or 100, 50)}", "trainer.resume=auto",
                         f"trainer.progress={'true' if data.progress else 'false'}",
                         f"optim.warmup_steps={max(1, min(100, cfg.steps // 10))}",
                         f"eval.split={t.test_split}", "eval.bootstrap=0",
                         *([f"eval.select_split={t.val_split}", f"eval.every={every}",
                            f"eval.select={t.metric}"] if every else []),
                         "eval.report=false", f"data.fraction_seed={seed}",
                         *([f"data.train_fraction={f:g}"] if f < 1 else []),
                         *([f"optim.lr={cfg.lr:g}"] if cfg.lr else []), *cfg.overrides]
            _same_settings(run, overrides)
            if not (run / "predictions.csv").is_file() or not (run / "eval.json").is_file():
                done = train(load_recipe(find_recipe(cfg.recipe, "adapt"), overrides), "medfound bench")
                if done.get("preempted"):  # SIGTERM: the run checkpointed; nothing to score yet
                    raise RuntimeError(f"stopped by SIGTERM in the fine-tuning run {run} at step {done['step']} "
                                       "(checkpoint written): run the same medfound bench command again to continue; "
                                       "finished runs and cached features are reused")
            probs, n_train, report = _run_predictions(run, data)
            sel = report.get("selection") or {}
            out.append(Prediction(cfg.name, setting, f, None, seed, probs, n_train,
                                  {"run": str(run), "selection": sel.get("policy"), "selected_step": sel.get("selected_step"),
                                   "validation_value": sel.get("value"), "steps": cfg.steps, "batch_size": batch,
                                   **({"fixed_steps_because": few} if few else {}),
                                   "degenerate": _degenerate(probs)}))
    return out


SETTINGS = "bench-settings.json"  # a fine-tuning run's recipe overrides, beside its folder's checkpoints


def _same_settings(run: Path, overrides: list[str]) -> None:
    """Record the overrides a bench fine-tuning run is made with, or refuse to reuse (or resume) a run that an earlier
    bench made with other settings (the suite's steps, lr, selection or overrides changed since): its numbers would
    be reported for settings it never ran. Paths (the run and shard folders) and the progress bar do not count."""
    def settings(items: list[str]) -> dict[str, str]:
        pairs = dict(o.split("=", 1) for o in items)
        return {k: v for k, v in pairs.items() if k not in ("trainer.output_dir", "data.shards", "trainer.progress")}

    want = settings(overrides)
    record = run / SETTINGS
    if record.is_file():
        had = settings(json.loads(record.read_text()))
        changed = sorted(k for k in set(had) | set(want) if had.get(k) != want.get(k))
        if changed:
            what = ", ".join(f"{k}: {had.get(k)} -> {want.get(k)}" for k in changed[:4])
            raise ValueError(f"{run} was run with other settings ({what}): delete that folder to redo it, or give "
                             "a new --out")
    elif run.is_dir() and any(run.iterdir()):
        return  # a run of an earlier medfound version, before the record: reused as it is
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record, overrides)


def _thin_validation(cfg, data: TaskData, fraction: float, seed: int) -> Optional[str]:
    """Why the validation subset at `fraction` cannot select a step (a class with fewer than
    `cfg.min_val_per_class` samples, or patients where the split has them), or None when it can."""
    # the fine-tuning path's own subset rule (medfound/data/fractions.py); at fraction 1 the whole split
    record = choose(data.index["val"], data.class_names, fraction=min(fraction, 1.0), seed=seed,
                    at_least_one=True).record
    per_class = {name: v["chosen"] for name, v in record["per_class"].items()}
    thin = {name: n for name, n in per_class.items() if n < cfg.min_val_per_class}
    if not thin:
        return None
    name, n = min(thin.items(), key=lambda kv: kv[1])
    return (f"the validation subset has {n} {record['unit']}{'s' * (n != 1)} of class {name!r} (min_val_per_class "
            f"{cfg.min_val_per_class}): the last of {cfg.steps} steps fixed in advance")


def _run_predictions(run: Path, data: TaskData) -> tuple[np.ndarray, int, dict]:
    """A fine-tuning run's test probabilities, in the order of the cached test features (by key)."""
    import csv

    report = json.loads((run / "eval.json").read_text())
    rows = {}
    with open(run / "predictions.csv", newline="") as f:
        for r in csv.DictReader(f):
            if r["set"] == "internal":
                rows[r["key"]] = [float(r[f"p_{c}"]) for c in data.class_names]
    missing = [k for k in data.test.keys if k not in rows]
    if missing:
        raise ValueError(f"{run}/predictions.csv lacks {len(missing)} test samples (e.g. {missing[0]}): the run "
                         "scored another split or set; delete the run folder to redo it")
    n_train = (report.get("train_labels") or {}).get("samples") or report.get("trained_on_samples") or 0
    if not n_train:
        cfg = json.loads((run / "export" / "config.json").read_text()).get("medfound", {})
        n_train = next((d["counts"]["by_split"].get(data.task.train_split, 0) for d in cfg.get("datasets", [])), 0)
    return np.array([rows[k] for k in data.test.keys]), int(n_train), report
