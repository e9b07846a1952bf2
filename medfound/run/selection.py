"""Validation-based model selection (`eval.every`, `eval.select`, `eval.select_split`).

Every `eval.every` optimizer steps, and at the last step, the training loop hands the module to a `Selection`: it
scores the validation split with the task's `validate` (no bootstrap; the same metric functions as evaluation),
appends the step's metrics to RUN_DIR/selection/selection.json and, when the selected metric improved (strictly:
a tie keeps the earlier step), saves the trainable tensors and buffers to RUN_DIR/selection/best.safetensors. Both
are written atomically, so a preempted run resumes its history; a step scored again after a resume (the same
weights, by exact resume) replaces its entry. After training the best tensors are loaded into the module before the
export, so the export, the test metrics (computed once, on it), eval.json and the card all describe the selected
step. `apply_selection` does the same for a rebuild from the checkpoint (publish's reload check).

The score runs on the main process with the module in eval mode, inside a fork of the RNG state (torch, numpy,
random), so selection never changes the training run's random draws.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Callable, Optional

from medfound.config import ConfigError
from medfound.data.fractions import training_subset
from medfound.evaluate.definitions import DEFINITIONS  # noqa: F401  (fills METRICS, torch-free)
from medfound.io import atomic_write_bytes, atomic_write_json
from medfound.registry import METRICS

MINIMISED = frozenset({"ece", "hd95", "loss"})
DIR = "selection"


class Selection:
    """The selection state of one run; `due(step, max_steps)` says when to call it with the module. Each call
    returns the step's validation metrics, which the loop logs under `val/` (metrics.jsonl, TensorBoard, wandb)."""

    prefix = "val"

    def __init__(self, run_dir: Path, metric: str, split: str, every: int,
                 score: Callable[[Any], dict[str, Any]], subset: Optional[dict[str, Any]] = None) -> None:
        self.dir = Path(run_dir) / DIR
        self.metric, self.split, self.every, self.score = metric, split, every, score
        self.subset = subset  # the validation samples scored, when training uses a fraction of the labels
        self.minimise = metric in MINIMISED
        self.history: dict[int, dict[str, Any]] = {}
        record = self.dir / "selection.json"
        if record.is_file():  # a resumed run keeps what it validated before
            old = json.loads(record.read_text())
            if (old.get("metric"), old.get("split")) == (metric, split):
                self.history = {int(h["step"]): h["metrics"] for h in old.get("history", [])}

    def due(self, step: int, max_steps: int) -> bool:
        return step % self.every == 0 or step == max_steps

    def best(self) -> Optional[tuple[int, float]]:
        scored = [(s, m[self.metric]) for s, m in self.history.items() if m.get(self.metric) is not None]
        if not scored:
            return None
        key = (lambda sv: (sv[1], -sv[0])) if not self.minimise else (lambda sv: (-sv[1], -sv[0]))
        return max(scored, key=key)

    def __call__(self, step: int, module: Any) -> dict[str, float]:
        import numpy as np
        import torch
        from safetensors.torch import save

        was = module.training
        py, npy = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            module.eval()
            try:
                metrics = self.score(module)
            finally:
                module.train(was)
        random.setstate(py)
        np.random.set_state(npy)
        if self.metric not in metrics:
            raise ValueError(f"eval.select={self.metric} is not a metric of this task on split '{self.split}' "
                             f"(it gives {sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))}): "
                             "choose one of those")
        before = self.best()
        self.history[step] = metrics
        now = self.best()
        if now is not None and now[0] == step and (before is None or before[0] != step):
            state = trainable_state(module)
            atomic_write_bytes(self.dir / "best.safetensors",
                               save(state, metadata={"step": str(step), "metric": self.metric}))
        atomic_write_json(self.dir / "selection.json", self.record())
        value = metrics[self.metric]
        shown = "n/a" if value is None else f"{value:.4f}"
        best = "n/a" if now is None else f"step {now[0]}, {now[1]:.4f}"
        from tqdm.auto import tqdm

        tqdm.write(f"validation ({self.split}) at step {step}: {self.metric} {shown} (best: {best})")
        return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    def record(self) -> dict[str, Any]:
        """The selection block of the lineage and eval.json. `tied`: how many looks scored exactly the best value
        (all of them: the validation samples could not tell the steps apart, e.g. AUROC 1.0 on the 5 images of a 1%
        validation subset, and the tie rule picked the earliest)."""
        best = self.best()
        tied = 0 if best is None else sum(m.get(self.metric) == best[1] for m in self.history.values())
        return {"metric": self.metric, "split": self.split, "every": self.every,
                **({"subset": self.subset} if self.subset else {}),
                "direction": "min" if self.minimise else "max",
                "best_step": None if best is None else best[0], "best_value": None if best is None else best[1],
                "tied": tied, "history": [{"step": s, "metrics": self.history[s]} for s in sorted(self.history)]}

    def restore(self, module: Any) -> None:
        """Load the best step's tensors into `module` (the export is then the selected checkpoint)."""
        apply_selection(self.dir.parent, module)

    def finish(self, module: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """After training: the best step restored into `module`; (the lineage's `selection` block, the run summary's
        `selected_step`)."""
        self.restore(module)
        record = self.record()
        return {"selection": record}, {"selected_step": record["best_step"]}


def build_selection(recipe, counts: dict[str, int], class_names: list[str], run_dir: Path, default_metric: str,
                    score: Callable[[Any, Optional[frozenset]], dict[str, Any]],
                    index: Optional[list] = None) -> Optional[Selection]:
    """The `Selection` of a run whose task scores a validation split (`eval.every`), or None without eval.every.
    Checks, naming the fix: a sharded strategy (only the main process scores, on whole weights), an unknown metric,
    a missing validation split, selecting on the reported split. With `data.train_fraction` / `train_shots` it
    scores the same fraction of the validation split, so selection never sees more labels than training does.
    `counts`: samples (slides) per split; `class_names`: the label schema's names (the stratified subset); `index`:
    the validation split's (key, label, patient) where data.shards[0] is not a shard set (MIL bags).
    `score(module, keys)`: the task's validation metrics of `module` on eval.select_split (only `keys` when given)."""

    ev = recipe.eval
    if ev.every is None:
        return None
    metric = ev.select or default_metric
    if recipe.trainer.strategy in ("fsdp", "zero3"):
        raise ConfigError(f"eval.every scores the model on the main process, which a trainer.strategy="
                          f"{recipe.trainer.strategy} run has only in shards: use ddp, zero1 or zero2, or drop "
                          "eval.every and select afterwards")
    if metric not in METRICS.names():
        raise ConfigError(f"eval.select={metric!r} is not a metric; choose one of {', '.join(METRICS.names())}")
    if not counts.get(ev.select_split):
        raise ConfigError(f"eval.select_split={ev.select_split!r} has no samples in {recipe.data.shards[0]} "
                          f"(splits: {', '.join(f'{k} {v}' for k, v in counts.items())}); name the validation "
                          "split, or shard one (--split-fractions)")
    if ev.select_split == ev.split:
        raise ConfigError(f"eval.select_split and eval.split are both {ev.split!r}: selecting on the split "
                          "that reports the metrics makes them optimistic; select on a validation split")
    subset = training_subset(recipe.data, recipe.data.shards[0], ev.select_split, class_names, validation=True,
                             index=index)
    keys = None if subset is None else subset.keys
    return Selection(run_dir, metric, ev.select_split, ev.every, lambda module: score(module, keys),
                     subset=None if subset is None else subset.record)


def kept_names(module: Any) -> set[str]:
    """The state-dict keys selection keeps: every parameter that trains, and every buffer (the frozen rest cannot
    change)."""
    return {n for n, p in module.named_parameters() if p.requires_grad} | {n for n, _ in module.named_buffers()}


def trainable_state(module: Any) -> dict[str, Any]:
    """The tensors selection keeps (`kept_names`), on the CPU."""
    keep = kept_names(module)
    return {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items() if k in keep}


def apply_selection(run_dir: Path, module: Any) -> Optional[int]:
    """If the run selected a checkpoint (RUN_DIR/selection/best.safetensors), load its tensors into `module` and
    return its step; None when the run had no selection. The saved keys must be exactly the module's trainable
    parameters and buffers (`kept_names`): the frozen rest is not saved."""
    return load_kept_state(Path(run_dir) / DIR / "best.safetensors", module, kept_names(module),
                           "the network", "the module's trainable tensors", "trainable")


def load_kept_state(path: Path, module: Any, want: set[str], what: str, within: str, kind: str) -> Optional[int]:
    """Load a kept best state (a safetensors file whose metadata names its `step`: validation selection's, the
    representation monitor's) into `module` and return the step; None when there is no such file. Its keys must be
    exactly `want`: strict=False only because a kept state may leave out tensors that cannot change (selection's
    frozen rest); any other difference raises before anything is loaded, naming the keys (`what` the recipe
    builds, `within` the keys it wants, `kind` of tensor)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    state = load_file(str(path))
    unexpected, absent = sorted(set(state) - want), sorted(want - set(state))
    if unexpected or absent:
        raise RuntimeError(f"{path} does not fit {what} the recipe builds (not in {within}: {unexpected[:5]}; "
                           f"{kind} but not saved: {absent[:5]}): it was written by another recipe or tuning; "
                           f"delete {path.parent} only if you know the run changed")
    module.load_state_dict(state, strict=False)
    with safe_open(str(path), "pt") as f:
        return int(f.metadata()["step"])
