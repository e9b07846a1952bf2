"""Metrics to `RUN_DIR/logs/metrics.jsonl` (always), plus TensorBoard and/or wandb (offline by default)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

from medfound.io import atomic_write_text


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
            # one wandb run per run directory (its id derived from the path): a resumed run, and the test metrics
            # logged after training, continue the same wandb run
            import hashlib

            run_id = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
            self.wandb = wandb.init(dir=str(self.path.parent), mode=wandb_mode, project=wandb_project,
                                    config=config or {}, name=Path(run_dir).name, id=run_id, resume="allow")

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

    def log_image(self, step: int, image: Any, tag: str = "images/train") -> None:
        """A training picture (PIL) in TensorBoard's Images tab and wandb (the PNG itself is in logs/images/)."""
        if not self.enabled:
            return
        if self.tb is not None:
            import numpy as np

            self.tb.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")
        if self.wandb is not None:
            import wandb

            self.wandb.log({tag: wandb.Image(image)}, step=step)

    def log_hparams(self, hparams: dict[str, Any], metrics: dict[str, float], step: int) -> None:
        """The run's hyperparameters beside its final test metrics: TensorBoard's HParams view (written into the run's
        own TensorBoard folder, its metrics as `hparam/NAME` at `step`) and the wandb run's config and summary."""
        if not self.enabled:
            return
        metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            self.tb.add_hparams(hparams, {f"hparam/{k}": v for k, v in metrics.items()}, run_name=".",
                                global_step=step)
        if self.wandb is not None:
            self.wandb.config.update(hparams, allow_val_change=True)
            self.wandb.summary.update({f"test/{k}": v for k, v in metrics.items()})

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


def flat_hparams(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The scalar leaves of a recipe (`recipe.model_dump(mode="json")`) as dotted keys, for HParams views; lists
    become their text, None is left out."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_hparams(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(v)
        elif isinstance(v, (bool, int, float, str)):
            out[key] = v
    return out


def evaluation_pictures(folder: Path, heatmaps: int = 4) -> list[Path]:
    """The pictures an evaluation wrote into `folder`: report/*.png (ROC, confusion, reliability, segmentation and
    box overlays) and the first `heatmaps` MIL attention heatmaps."""
    folder = Path(folder)
    return sorted((folder / "report").glob("*.png")) + sorted((folder / "heatmaps").glob("*.png"))[:heatmaps]


def log_test_metrics(run_dir: Path, recipe: Any, step: int, metrics: dict[str, Any]) -> None:
    """After the export is scored: the test metrics under `test/` at the final step (metrics.jsonl and the recipe's
    trackers), the evaluation's pictures under `images/eval/` (`evaluation_pictures`) and the hyperparameters beside
    them (TensorBoard HParams, wandb config)."""
    t = recipe.trainer
    logger = MetricsLogger(run_dir, t.loggers, wandb_mode=t.wandb_mode, wandb_project=t.wandb_project,
                           resume_step=step)
    try:
        logger.log(step, {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None},
                   prefix="test")
        if logger.tb is not None or logger.wandb is not None:
            from PIL import Image

            for path in evaluation_pictures(run_dir):
                with Image.open(path) as image:
                    logger.log_image(step, image, tag=f"images/eval/{path.parent.name}/{path.stem}")
            logger.log_hparams(flat_hparams(recipe.model_dump(mode="json")), metrics, step)
    finally:
        logger.close()
