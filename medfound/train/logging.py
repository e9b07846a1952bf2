"""Metrics to `RUN_DIR/logs/metrics.jsonl` (always), plus TensorBoard and/or wandb (offline by default)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional


class MetricsLogger:
    """Append-only JSONL (one object per line: step, time, values) mirrored to the chosen trackers.

    Resumed runs append to the same file, so the log of a preempted run is continuous. `resume_step`: the step the
    run continues from; records of later steps (logged by the interrupted run after its last checkpoint, and about
    to be logged again) are dropped first, from metrics.jsonl and TensorBoard alike, so every step is logged once.
    """

    def __init__(self, run_dir: Path, loggers: list[str], config: Optional[dict[str, Any]] = None,
                 enabled: bool = True, wandb_mode: str = "offline", wandb_project: str = "medfound",
                 resume_step: int = 0):
        self.enabled = enabled
        self.path = Path(run_dir) / "logs" / "metrics.jsonl"
        self.tb = self.wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        if "tensorboard" in loggers:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(self.path.parent / "tensorboard"), purge_step=resume_step + 1)
        if "wandb" in loggers:
            try:
                import wandb
            except ImportError as e:
                raise ImportError("trainer.loggers includes wandb, which is not installed: "
                                  "pip install medfound[wandb] (offline unless trainer.wandb_mode=online)") from e
            self.wandb = wandb.init(dir=str(self.path.parent), mode=wandb_mode, project=wandb_project,
                                    config=config or {}, name=Path(run_dir).name, resume="allow")

    def _truncate_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        kept, dropped = [], 0
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # the last line of a killed write
                dropped += 1
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(line)
            else:
                dropped += 1
        if dropped:
            from medfound.io import atomic_write_text

            atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def log(self, step: int, values: dict[str, Any], prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), "phase": prefix, **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in values.items():
            if isinstance(v, (int, float)):
                if self.tb is not None:
                    self.tb.add_scalar(f"{prefix}/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{k}": v for k, v in values.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "logs" / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
