"""The representation monitor of pretraining (`monitor:` in a pretrain recipe): is the backbone learning anything?

Before the first step of a run (the starting weights: a continuation's baseline), every `monitor.every` optimizer
steps, and at the last step, the training loop hands the objective to a `Monitor`
(on the main process, in eval mode, inside a fork of the RNG like validation-based selection, so the run trains
exactly as without it). The backbone the export will hold (`export_backbone()`: MAE's encoder, DINOv2's teacher)
embeds a labelled shard set with the evaluation transform; k-NN (medfound.evaluate.probes.knn_probs: cosine, k = 20,
DINO's weighted votes) from the bank split to the scored split gives `knn_auroc` and `knn_accuracy`; and two collapse
signals come from the scored features themselves:
- `feature_std`: the mean over dimensions of the per-dimension standard deviation of the L2-normalised features (0
  when every image maps to the same point; DINOv2's student_feature_std is the same quantity on the training crops);
- `effective_rank`: exp of the entropy of the normalised singular values of the centred features (Roy & Vetterli
  2007), 1 when the features span one direction, up to the feature dimension.
A look whose features collapsed (feature_std < 1e-4, or effective rank < 1.5) prints a warning naming the step. The
values go to metrics.jsonl, TensorBoard and wandb under `monitor/`, the export's lineage keeps the history and the
last look, and the model card shows the last look.

The looks are also written to RUN_DIR/monitor/monitor.json (atomically), so a preempted run resumes its history.
With `monitor.export: best`, a look that beats every earlier one on `monitor.select` (strictly: a tie keeps the
earlier step; collapsed looks never count; the step-0 look of the starting weights does) saves the objective's whole
state (student, teacher, heads, decoder) to RUN_DIR/monitor/best.safetensors, and after training that state is loaded
before the export: the export, its heads, the lineage (`monitor.best_step`) and the card describe the best look.
A continuation that gains for a few hundred steps and then drifts (benchmarks/quality_continue.py) keeps its peak.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np

from medfound.config import ConfigError, DataConfig
from medfound.data.loaders import eval_image_transform, normalizer, prepare
from medfound.data.manifest import read_manifest
from medfound.data.pipeline import Decoding, Reading, make_loader, shard_urls
from medfound.evaluate.probes import knn_probs, l2, metric_value
from medfound.io import atomic_write_bytes, atomic_write_json
from medfound.run.selection import load_kept_state

COLLAPSE_STD = 1e-4
COLLAPSE_RANK = 1.5
DIR = "monitor"


def effective_rank(x: np.ndarray) -> float:
    """exp(entropy of the normalised singular values of the centred rows of `x`) (Roy & Vetterli 2007)."""
    centred = x - x.mean(axis=0, keepdims=True)
    s = np.linalg.svd(centred, compute_uv=False)
    if s.sum() <= 1e-12:
        return 1.0
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


class Monitor:
    """The monitor of one pretraining run; `due`, `__call__` and `finish` as Selection's (medfound.run.selection)."""

    prefix = "monitor"
    look_at_start = True  # step 0 too: the starting weights' values (a continuation's baseline)

    def __init__(self, recipe, run_dir: Optional[Path] = None) -> None:
        self.cfg = recipe.monitor
        self.data = recipe.data
        self.dir = None if run_dir is None else Path(run_dir) / DIR
        self.history: dict[int, dict[str, float]] = {}
        self.warnings: list[str] = []
        if self.cfg.export == "best" and self.dir is None:
            raise ValueError("monitor.export=best keeps the best look's state in RUN_DIR/monitor: give the run directory")
        record = None if self.dir is None else self.dir / "monitor.json"
        if record is not None and record.is_file():  # a resumed run keeps what it looked at before
            old = json.loads(record.read_text())
            if [old.get(k) for k in ("shards", "bank_split", "split")] == [str(self.cfg.shards), self.cfg.bank_split,
                                                                           self.cfg.split]:
                self.history = {int(h["step"]): {k: v for k, v in h.items() if k != "step"} for h in old["history"]}
                self.warnings = list(old.get("warnings", []))

    def due(self, step: int, max_steps: int) -> bool:
        return step % self.cfg.every == 0 or step == max_steps

    def _embed(self, encoder: Any, split: str, limit: int) -> tuple[np.ndarray, np.ndarray]:
        d = self.data
        cfg = DataConfig(shards=[self.cfg.shards], batch_size=64, img_size=d.img_size, mean=d.mean, std=d.std,
                         augment="none", window=d.window)
        manifest = read_manifest(self.cfg.shards)
        urls, _ = shard_urls([self.cfg.shards], split)
        loader = make_loader(urls, Decoding(prepare(cfg, eval_image_transform(cfg)), labelled=True,
                                            num_classes=manifest.label_schema.num_classes), batch_size=64,
                             reading=Reading(split_by_node=False))
        device = next(encoder.parameters()).device
        norm = normalizer(cfg).to(device)
        xs, ys, n = [], [], 0
        for batch in loader:
            xs.append(encoder(norm(batch["image"].to(device))).float().cpu().numpy())
            ys.append(batch["label"].numpy())
            n += len(ys[-1])
            if n >= limit:
                break
        return np.concatenate(xs)[:limit], np.concatenate(ys)[:limit]

    def __call__(self, step: int, module: Any) -> dict[str, float]:
        import torch
        from tqdm.auto import tqdm

        encoder = module.export_backbone()
        was = encoder.training
        py, npy = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            encoder.eval()
            try:
                bank_x, bank_y = self._embed(encoder, self.cfg.bank_split, self.cfg.max_bank)
                x, y = self._embed(encoder, self.cfg.split, self.cfg.max_queries)
            finally:
                encoder.train(was)
        random.setstate(py)
        np.random.set_state(npy)
        k = int(max(bank_y.max(), y.max())) + 1
        probs = knn_probs(bank_x, bank_y, x, k, self.cfg.k, self.cfg.temperature)
        label_type = "binary" if k == 2 else "multiclass"
        values = {"knn_auroc": metric_value("auroc", probs, y, label_type, 1),
                  "knn_accuracy": metric_value("accuracy", probs, y, label_type, 1),
                  "feature_std": float(l2(x).std(axis=0).mean()), "effective_rank": effective_rank(x)}
        values = {name: round(v, 6) for name, v in values.items() if v is not None}
        collapsed = values["feature_std"] < COLLAPSE_STD or values["effective_rank"] < COLLAPSE_RANK
        values["collapsed"] = float(collapsed)
        if step == 0:  # the look at a fresh start: what an earlier run in this directory left is not this run's
            self.history, self.warnings = {}, []
            if self.dir is not None:
                (self.dir / "best.safetensors").unlink(missing_ok=True)
        before = self.best()
        self.history[step] = values
        now = self.best()
        if self.cfg.export == "best" and now is not None and now[0] == step and (before is None or before[0] != step):
            from safetensors.torch import save

            state = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
            atomic_write_bytes(self.dir / "best.safetensors", save(state, metadata={
                "step": str(step), "select": self.cfg.select, "value": str(now[1])}))
        if self.dir is not None:
            atomic_write_json(self.dir / "monitor.json", self.record())
        if collapsed:
            warning = (f"step {step}: the features collapsed (feature_std {values['feature_std']:.2e}, effective rank "
                       f"{values['effective_rank']:.2f}): every image maps to about the same point. Lower the "
                       "learning rate, check the objective's settings (DINOv2: teacher temperature, centering, KoLeo)")
            self.warnings.append(warning)
            tqdm.write(f"warning: {warning}")
        else:
            kept = (f" (best: step {now[0]}, {now[1]:.4f})" if self.cfg.export == "best" and now is not None
                    else "")
            tqdm.write(f"monitor at step {step}: k-NN {self.cfg.split} auroc {values.get('knn_auroc', 'n/a')}, "
                       f"accuracy {values['knn_accuracy']:.4f}; feature std {values['feature_std']:.4f}, effective "
                       f"rank {values['effective_rank']:.1f}{kept}")
        return values

    def best(self) -> Optional[tuple[int, float]]:
        """(step, value) of the look with the highest `monitor.select`, collapsed looks apart; a tie keeps the
        earlier step."""
        scored = [(s, v[self.cfg.select]) for s, v in self.history.items()
                  if v.get(self.cfg.select) is not None and not v.get("collapsed")]
        return max(scored, key=lambda sv: (sv[1], -sv[0])) if scored else None

    def record(self) -> dict[str, Any]:
        last = max(self.history) if self.history else None
        best = self.best()
        return {"shards": str(self.cfg.shards), "bank_split": self.cfg.bank_split, "split": self.cfg.split,
                "every": self.cfg.every, "k": self.cfg.k, "export": self.cfg.export, "select": self.cfg.select,
                "last_step": last, "last": self.history.get(last) if last is not None else None,
                "best_step": None if best is None else best[0], "best": None if best is None else self.history[best[0]],
                "warnings": self.warnings, "history": [{"step": s, **self.history[s]} for s in sorted(self.history)]}

    def finish(self, module: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the lineage's `monitor` block, what the run summary adds): the export is the last step's backbone, or
        with `monitor.export: best` the best look's, loaded into `module` here (`exported_step` says which)."""
        record = self.record()
        exported = record["last_step"]
        if self.cfg.export == "best":
            exported = apply_monitor_best(self.dir.parent, module)
            if exported is None:
                raise RuntimeError(f"monitor.export=best, but no look was scored on {self.cfg.select} (every look "
                                   f"collapsed, or the set lacks a class): {self.dir / 'best.safetensors'} was never "
                                   "written; rerun with monitor.export=last")
        record["exported_step"] = exported
        shown = self.history.get(exported) if exported is not None else None
        return {"monitor": record}, ({"monitor": shown, "monitor_step": exported} if shown else {})


def apply_monitor_best(run_dir: Path, module: Any) -> Optional[int]:
    """Load the monitor's best look (RUN_DIR/monitor/best.safetensors, `monitor.export: best`) into the objective
    `module`, every key of its state (any difference raises, naming the keys), and return its step; None when the
    run kept none."""
    return load_kept_state(Path(run_dir) / DIR / "best.safetensors", module, set(module.state_dict()),
                           "the objective", "its state", "in its state")


def build_monitor(recipe, run_dir: Optional[Path] = None) -> Optional[Monitor]:
    """The recipe's monitor, or None; refused under sharded strategies (the main process embeds the whole model)."""

    if recipe.monitor is None:
        return None
    if recipe.trainer.strategy in ("fsdp", "zero3"):
        raise ConfigError(f"monitor embeds images with the whole backbone on the main process, which a trainer.strategy="
                          f"{recipe.trainer.strategy} run holds only in shards: use ddp, zero1 or zero2, or drop monitor")

    m = read_manifest(recipe.monitor.shards)
    if m.label_schema.type in ("none", "multilabel"):
        raise ConfigError(f"monitor.shards {recipe.monitor.shards} is {m.label_schema.type}: k-NN needs single-label "
                          "samples")
    missing = [s for s in (recipe.monitor.bank_split, recipe.monitor.split) if not m.counts["by_split"].get(s)]
    if missing:
        raise ConfigError(f"monitor.shards {recipe.monitor.shards} has no split {missing} (it has "
                          f"{', '.join(m.counts['by_split'])}): set monitor.bank_split / monitor.split")
    return Monitor(recipe, run_dir)
