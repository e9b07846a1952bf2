"""The training loop every recipe uses.

It knows nothing about MAE or classification: it calls `module(batch)` and optimises `out["loss"]`.
Everything numeric lives here once: gradient accumulation (the loss of each micro-batch is divided
by the number of micro-batches, so the update equals one big batch), clipping, the learning rate as
a pure function of the step, NaN/Inf detection, and checkpoints complete enough to resume exactly
(weights, optimizer, data position and every RNG). Distribution and mixed precision come from
accelerate: the same loop runs on one CPU or under `accelerate launch` / `torchrun` on many GPUs.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn as nn
from accelerate import Accelerator
from tqdm.auto import tqdm

from medfound.config import OptimConfig, TrainerConfig
from medfound.train.checkpoint import latest_checkpoint, load_checkpoint, restore_rng, save_checkpoint
from medfound.train.logging import MetricsLogger
from medfound.train.optim import build_optimizer, lr_at


@dataclass
class TrainState:
    step: int = 0              # optimizer steps taken
    epoch: int = 0             # data epoch in progress
    batch_in_epoch: int = 0    # micro-batches of this epoch already consumed (the data position)
    images_seen: int = 0       # across all processes
    train_seconds: float = 0.0
    preempted: bool = False


def resolve_resume(trainer: TrainerConfig, run_dir: Path) -> Optional[Path]:
    """The checkpoint to resume from, or None to start fresh; refuses to overwrite an existing run."""
    ckpts = run_dir / "checkpoints"
    if trainer.resume is None:
        if latest_checkpoint(ckpts) is not None:
            raise FileExistsError(f"{run_dir} already holds checkpoints: continue it with trainer.resume=auto, "
                                  "or choose a new trainer.output_dir")
        return None
    if trainer.resume == "auto":
        return latest_checkpoint(ckpts)
    path = Path(trainer.resume)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"trainer.resume={path} is not a checkpoint directory (no trainer_state.json); "
                                "use 'auto' or a checkpoints/step_NNNNNNNN directory")
    return path


def to_device(batch: dict[str, Any], device: torch.device, normalize: Optional[nn.Module] = None) -> dict[str, Any]:
    """Move tensors (and lists of crops) to `device`; then normalise `image`/`crops` there when asked."""
    out = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else
           [t.to(device, non_blocking=True) for t in v] if k == "crops" else v for k, v in batch.items()}
    if normalize is not None:
        out["image"] = normalize(out["image"])
        if "crops" in out:
            out["crops"] = [normalize(t) for t in out["crops"]]
    return out


class _Preemption:
    """SIGTERM (SLURM preemption, `kill`) sets a flag; the loop checkpoints at the next step and exits."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> "_Preemption":
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. inside some notebook runners)
            self._previous = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def fit(module: nn.Module, make_loader: Callable[[int], Iterable[dict]], *, trainer: TrainerConfig, optim: OptimConfig,
        lr: float, run_dir: Path, accelerator: Accelerator, config_text: str,
        resume_from: Optional[Path] = None, normalize: Optional[nn.Module] = None) -> TrainState:
    """Train `module` for `trainer.max_steps` optimizer steps.

    Args:
        module: returns {"loss": scalar, ...}; other 0-dim tensors in the output are logged.
        make_loader: epoch -> iterable of batches, the same batches in the same order for the same epoch.
        lr: the resolved peak learning rate (recipe.derived.lr).
        resume_from: a checkpoint directory to continue from (see `resolve_resume`).
        normalize: applied to `image`/`crops` on the device (the loaders ship unnormalised uint8 batches).
    Returns:
        The final TrainState (`preempted=True` when stopped by SIGTERM after checkpointing).
    """
    run_dir = Path(run_dir)
    main = accelerator.is_main_process
    accum = trainer.grad_accum_steps
    optimizer = build_optimizer(module, optim, lr)
    state = TrainState()
    pending_rng = None
    if resume_from is not None:
        saved = load_checkpoint(resume_from, module, optimizer)
        state = TrainState(**{k: saved[k] for k in asdict(state) if k in saved and k != "preempted"})
        pending_rng = (saved["rng"], saved["_rng_tensors"])
        accelerator.print(f"resuming from {resume_from} at step {state.step} (epoch {state.epoch}, "
                          f"batch {state.batch_in_epoch})")
    model, optimizer = accelerator.prepare(module, optimizer)
    if normalize is not None:
        normalize = normalize.to(accelerator.device)
    logger = MetricsLogger(run_dir, trainer.loggers, enabled=main)
    ckpt_root = run_dir / "checkpoints"

    def checkpoint() -> Path:
        accelerator.wait_for_everyone()
        path = None
        if main:
            path = save_checkpoint(ckpt_root, accelerator.unwrap_model(model), optimizer,
                                   {k: v for k, v in asdict(state).items() if k != "preempted"},
                                   config_text, keep=trainer.keep_checkpoints)
        accelerator.wait_for_everyone()
        return path

    bar = tqdm(total=trainer.max_steps, initial=state.step, disable=not (main and trainer.progress),
               desc="train", dynamic_ncols=True, mininterval=1.0)
    window: dict[str, list[float]] = {}
    window_images, window_start = 0, time.time()
    micro = 0
    with _Preemption() as preempt:
        while state.step < trainer.max_steps:
            iterator = iter(make_loader(state.epoch))
            seen_this_epoch = 0
            for _ in range(state.batch_in_epoch):  # exact resume: replay the data position
                next(iterator)
                seen_this_epoch += 1
            if pending_rng is not None:
                restore_rng(*pending_rng)
                pending_rng = None
            step_start = time.time()
            for batch in iterator:
                seen_this_epoch += 1
                bad = batch.pop("_bad", None)
                if bad:
                    window.setdefault("bad_samples", []).append(float(len(bad)))
                    logger.log(state.step, {"skipped_samples": bad}, prefix="data")
                batch = to_device(batch, accelerator.device, normalize)
                sync = (micro + 1) % accum == 0
                no_sync = accelerator.no_sync(model) if not sync and accelerator.num_processes > 1 \
                    else contextlib.nullcontext()
                with no_sync:
                    with accelerator.autocast():
                        out = model(batch)
                    loss = out["loss"]
                    if not torch.isfinite(loss.detach()).all():
                        last = latest_checkpoint(ckpt_root)
                        raise FloatingPointError(
                            f"loss is {loss.item()} at step {state.step} (epoch {state.epoch}, batch "
                            f"{state.batch_in_epoch}, first keys {batch.get('key', [])[:4]}). Lower optim.lr, set "
                            f"trainer.clip_grad_norm, or check these samples; last good checkpoint: {last}")
                    accelerator.backward(loss / accum)
                micro += 1
                state.batch_in_epoch += 1
                n_images = len(batch["key"]) * accelerator.num_processes
                state.images_seen += n_images
                window_images += n_images
                for k, v in out.items():
                    if torch.is_tensor(v) and v.ndim == 0:
                        window.setdefault(k, []).append(float(v.detach()))
                if not sync:
                    continue

                lr_now = lr_at(state.step, base_lr=lr, max_steps=trainer.max_steps, warmup_steps=optim.warmup_steps,
                               min_lr=optim.min_lr, schedule=optim.schedule)
                for group in optimizer.param_groups:
                    group["lr"] = lr_now * group.get("lr_scale", 1.0)
                grad_norm = None
                if trainer.clip_grad_norm is not None:
                    grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), trainer.clip_grad_norm))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                now = time.time()
                state.train_seconds += now - step_start
                step_start = now
                bar.update(1)

                if state.step % trainer.log_every == 0 or state.step == trainer.max_steps:
                    elapsed = max(time.time() - window_start, 1e-9)
                    values = {k: sum(v) if k == "bad_samples" else sum(v) / len(v) for k, v in window.items()}
                    values.update(lr=lr_now, epoch=state.epoch, images_per_s=window_images / elapsed,
                                  images_seen=state.images_seen, train_seconds=round(state.train_seconds, 2))
                    if grad_norm is not None and math.isfinite(grad_norm):
                        values["grad_norm"] = grad_norm
                    logger.log(state.step, values)
                    bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr_now:.2e}",
                                    img_s=f"{values['images_per_s']:.0f}")
                    window, window_images, window_start = {}, 0, time.time()

                if preempt.requested:
                    path = checkpoint()
                    accelerator.print(f"\nSIGTERM: checkpoint written to {path}; resume with trainer.resume=auto")
                    state.preempted = True
                    break
                if state.step % trainer.checkpoint_every == 0 or state.step == trainer.max_steps:
                    checkpoint()
                if state.step >= trainer.max_steps:
                    break
            if state.preempted:
                break
            if state.step < trainer.max_steps:
                if seen_this_epoch == 0:
                    raise ValueError("the training split yielded no batch: it holds fewer samples than "
                                     "data.batch_size (batches are full-size in training); lower data.batch_size")
                state.epoch += 1
                state.batch_in_epoch = 0
    bar.close()
    logger.close()
    return state
