"""The training loop every recipe uses.

It knows nothing about MAE, DINO or classification: it calls `module(batch)` and optimises `out["loss"]`.
Objectives and tasks may define optional hooks, called on the unwrapped module:
- `param_groups(optim_cfg) -> list[dict]`: their own parameter groups (layer-wise lr decay, multipliers);
- `before_optimizer_step(step, max_steps)`: e.g. DINO cancels the last layer's gradients early on;
- `after_optimizer_step(step, max_steps)`: e.g. the EMA teacher update;
- `visualize(batch, out) -> PIL.Image`: saved to `logs/images/` every `trainer.visualize_every` steps;
- `collapse(values) -> str | None`: at each log step, given the window's mean logged values, a description when the
  features collapsed (DINOv2: the normalised feature std of student or teacher near 0). It and the representation
  monitor's collapsed look feed one guard: a warning once, with the step and the likely causes, and with
  `trainer.stop_on_collapse` a checkpoint and a stop (`CollapseError`).

Everything numeric lives here once: gradient accumulation (each micro-batch loss divided by the number of
micro-batches, so the update equals one big batch), clipping, learning rate and weight decay as pure
functions of the step, non-finite steps skipped (all ranks agree) and a stop after
`trainer.max_bad_steps` of them in a row, and checkpoints complete enough to resume exactly: weights,
optimizer, and for every rank its data position and RNG states. The process group and mixed precision come
from accelerate; how the module is spread over the processes is the strategy's (`trainer.strategy`:
ddp, fsdp, zero1/2/3; train/strategy.py): the same loop runs on one CPU or under `accelerate launch` /
`torchrun` on many GPUs. Optional module hooks for strategies: `fsdp_units()` (extra modules FSDP shards on
their own, e.g. DINOv2's heads) and `touches_gradients` (True when `before_optimizer_step` edits gradients,
which zero* refuses).
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn as nn
import yaml
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from tqdm.auto import tqdm

from medfound.config import OptimConfig, TrainerConfig
from medfound.train.checkpoint import capture_rng, latest_checkpoint, restore_rng, save_checkpoint
from medfound.train.logging import MetricsLogger
from medfound.train.optim import build_optimizer, lr_at, wd_at
from medfound.train.strategy import DDPStrategy, FSDPStrategy, first_nonfinite
from medfound.io import atomic_write_bytes
from medfound.train.zero import ZeroStrategy


@dataclass
class TrainState:
    step: int = 0              # optimizer steps taken
    images_seen: int = 0       # across all processes
    train_seconds: float = 0.0
    skipped_steps: int = 0     # optimizer steps skipped for a non-finite loss or gradient
    # this process's data position:
    epoch: int = 0             # data epoch in progress
    batch_in_epoch: int = 0    # micro-batches of this epoch already consumed
    preempted: bool = False
    module: Optional[nn.Module] = field(default=None, repr=False)  # after fit: the trained plain module (main process)


_SHARED = ("step", "images_seen", "train_seconds", "skipped_steps")


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


class CollapseError(RuntimeError):
    """The features collapsed and trainer.stop_on_collapse stopped the run (after a checkpoint)."""


COLLAPSE_CAUSES = ("Likely causes: a learning rate too high for the batch (optim.blr / optim.lr), too few or duplicated "
                   "images (the manifest's counts; `medfound shard` lists duplicates), for DINOv2 the teacher "
                   "temperature (objective.teacher_temp, objective.teacher_temp_warmup_steps) or KoLeo switched off "
                   "(objective.koleo_weight); a few thousand images: start from pretrain/dinov2_small_data.yaml")


def _any_rank(accelerator: Accelerator, flag: bool) -> bool:
    """True if `flag` is set on any process (every process must take the same branch)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def build_strategy(accelerator: Accelerator, trainer: TrainerConfig):
    """The run's strategy object for `trainer.strategy` (the names config.TrainerConfig.strategy allows)."""
    if trainer.strategy.startswith("zero"):
        return ZeroStrategy(accelerator, trainer, stage=int(trainer.strategy[-1]))
    return {"ddp": DDPStrategy, "fsdp": FSDPStrategy}[trainer.strategy](accelerator, trainer)


class Coordinator:
    """What a checkpoint write needs from the process group (save_checkpoint's `coordinator`)."""

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator
        self.main = accelerator.is_main_process

    def broadcast(self, obj: Any) -> Any:
        if self.accelerator.num_processes == 1:
            return obj
        box = [obj]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def any(self, flag: bool) -> bool:
        return _any_rank(self.accelerator, flag)


def fit(module: nn.Module, make_loader: Callable[[int], Iterable[dict]], *, trainer: TrainerConfig, optim: OptimConfig,
        lr: float, run_dir: Path, accelerator: Accelerator, config_text: str,
        resume_from: Optional[Path] = None, normalize: Optional[nn.Module] = None,
        selection: Optional[Any] = None) -> TrainState:
    """Train `module` for `trainer.max_steps` optimizer steps.

    Args:
        module: returns {"loss": scalar, ...}; other 0-dim tensors in the output are logged.
        make_loader: epoch -> iterable of batches, the same batches in the same order for the same epoch
            (and rank and worker).
        lr: the resolved peak learning rate (recipe.derived.lr).
        resume_from: a checkpoint directory to continue from (see `resolve_resume`).
        normalize: applied to `image`/`crops` on the device (the loaders ship unnormalised uint8 batches).
        selection: validation-based model selection (`medfound.run.selection.Selection`) or the pretraining monitor
            (`medfound.run.monitor.Monitor`): called on the main process with the unwrapped module at the steps it
            is `due`, before that step's checkpoint; a dict it returns is logged under its `prefix`.
    Returns:
        The final TrainState (`preempted=True` when stopped by SIGTERM after checkpointing).
    """
    run_dir = Path(run_dir)
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    accum = trainer.grad_accum_steps
    strategy = build_strategy(accelerator, trainer)
    model, optimizer, inner, saved = strategy.setup(module, lambda m: build_optimizer(m, optim, lr), resume_from)
    state = TrainState()
    pending_rng = None
    data_position: dict[str, Any] = {}  # this epoch, per DataLoader worker: the last `_pos` consumed (+ "global")
    global_start: Optional[int] = None  # a global-order stream resumed: the epoch's first unconsumed position
    if saved is not None:
        ranks = saved["ranks"]
        mine = ranks[rank] if len(ranks) == world else ranks[0]
        global_order = all("global" in (r.get("data_position") or {}) for r in ranks)
        if len(ranks) != world:
            accelerator.print(f"warning: {resume_from} was written by {len(ranks)} processes, this run has {world}: "
                              "weights and optimizer resume exactly; " +
                              ("the data continues at its global position (data.global_order: no sample of the epoch "
                               "repeated or skipped), the RNG streams do not" if global_order else
                               "the data order and RNG do not (data.global_order=true would keep the data exact)"))
        state = TrainState(**{k: saved[k] for k in _SHARED if k in saved}, epoch=mine["epoch"],
                           batch_in_epoch=mine["batch_in_epoch"])
        if global_order:
            # a global-order stream: everything before the furthest position was consumed, on any number of ranks
            global_start = max(int(r["data_position"]["global"]) for r in ranks)
            state.batch_in_epoch = 0
        elif len(ranks) == world and mine.get("data_position"):
            data_position = dict(mine["data_position"])
        pending_rng = (mine["rng"], saved["_rng_tensors"][mine["rng_index"]])
        written = saved.get("strategy", "ddp")
        accelerator.print(f"resuming from {resume_from} at step {state.step} (epoch {state.epoch}, "
                          f"batch {state.batch_in_epoch})" + (f"; written under trainer.strategy={written}, "
                                                               f"continuing under {trainer.strategy}"
                                                               if written != trainer.strategy else ""))
    if normalize is not None:
        normalize = normalize.to(accelerator.device)
    logger = MetricsLogger(run_dir, trainer.loggers, enabled=main, wandb_mode=trainer.wandb_mode,
                           wandb_project=trainer.wandb_project,
                           config=yaml.safe_load(config_text) if "wandb" in trainer.loggers else None,
                           resume_step=state.step)
    ckpt_root = run_dir / "checkpoints"

    def checkpoint() -> Optional[Path]:
        broken = first_nonfinite(inner)
        if _any_rank(accelerator, broken is not None):
            raise FloatingPointError(
                f"the weights became non-finite by step {state.step} ({broken or 'on another rank'}); this state was "
                f"not saved. Lower optim.lr / optim.blr or check optim.weight_decay; the last good checkpoint is "
                f"{latest_checkpoint(ckpt_root)}.")
        scalars, tensors = capture_rng()
        everyone = gather_object([{"epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch, "rng": scalars,
                                   "rng_tensors": tensors, "data_position": dict(data_position)}])
        shared = {**{k: getattr(state, k) for k in _SHARED}, "strategy": trainer.strategy}
        path = save_checkpoint(ckpt_root, inner, optimizer, shared, everyone, config_text,
                               keep=trainer.keep_checkpoints, protect=resume_from, write_weights=strategy.write_weights,
                               fmt=strategy.checkpoint_format, coordinator=Coordinator(accelerator))
        accelerator.wait_for_everyone()
        return path

    bar = tqdm(total=trainer.max_steps, initial=state.step, disable=not (main and trainer.progress),
               desc="train", dynamic_ncols=True, mininterval=1.0)
    window: dict[str, list[float]] = {}
    window_images, window_start = 0, time.time()
    micro, cycle_bad, bad_in_a_row, last_bad = 0, False, 0, ""
    collapse_hook, collapse_warned = getattr(inner, "collapse", None), False
    if selection is not None and state.step == 0 and getattr(selection, "look_at_start", False):
        if main:  # the representation monitor's look at the starting weights: what continuation starts from
            looked = selection(0, inner)
            if isinstance(looked, dict) and looked:
                logger.log(0, looked, prefix=getattr(selection, "prefix", "selection"))
        accelerator.wait_for_everyone()
    with _Preemption() as preempt:
        while state.step < trainer.max_steps:
            loader = make_loader(state.epoch)
            fast = bool(state.batch_in_epoch and data_position and hasattr(loader, "resume_at"))
            if global_start is not None:  # global order: the same positions, whatever the number of processes
                loader.resume_global(global_start)
                data_position, global_start = {"global": global_start}, None
            elif fast:  # the workers read and drop what was consumed, without decoding it
                loader.resume_at(data_position)
            elif not state.batch_in_epoch:
                data_position = {}
            iterator = iter(loader)
            seen_this_epoch = 0
            for _ in range(state.batch_in_epoch):  # exact resume: replay the data position
                replayed = next(iterator)
                if fast and "_skipped" not in replayed:
                    raise RuntimeError("resuming the data stream: a decoded batch came where a skipped one was due; "
                                       "the checkpoint's data position does not fit this loader")
                seen_this_epoch += 1
            if pending_rng is not None:
                restore_rng(*pending_rng)
                pending_rng = None
            step_start = time.time()
            for batch in iterator:
                seen_this_epoch += 1
                pos = batch.pop("_pos", None)
                if pos is not None:
                    data_position[str(pos[0])] = list(pos[1:])
                gpos = batch.pop("_gpos", None)
                if gpos is not None:
                    data_position["global"] = max(int(gpos), int(data_position.get("global", 0)))
                bad = batch.pop("_bad", None)
                if bad:
                    window.setdefault("bad_samples", []).append(float(len(bad)))
                    logger.log(state.step, {"skipped_samples": bad}, prefix="data")
                batch = to_device(batch, accelerator.device, normalize)
                sync = (micro + 1) % accum == 0
                with strategy.gradient_sync(model, sync):
                    with accelerator.autocast():
                        out = model(batch)
                    loss = out["loss"]
                    if not torch.isfinite(loss.detach()).all():
                        cycle_bad = True
                        last_bad = (f"loss {loss.item()} at step {state.step} (epoch {state.epoch}, batch "
                                    f"{state.batch_in_epoch}, first keys {batch.get('key', [])[:4]})")
                    strategy.backward(loss / accum)  # every rank runs backward, finite or not (DDP)
                micro += 1
                state.batch_in_epoch += 1
                n_images = len(batch["key"]) * world
                state.images_seen += n_images
                window_images += n_images
                for k, v in out.items():
                    if torch.is_tensor(v) and v.ndim == 0:
                        window.setdefault(k, []).append(float(v.detach()))
                if not sync:
                    continue

                lr_now = lr_at(state.step, base_lr=lr, max_steps=trainer.max_steps, warmup_steps=optim.warmup_steps,
                               min_lr=optim.min_lr, schedule=optim.schedule)
                wd_now = wd_at(state.step, optim, trainer.max_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr_now * group.get("lr_scale", 1.0)
                    group["weight_decay"] = wd_now * group.get("wd_scale", 1.0)
                grad_norm = None
                if trainer.clip_grad_norm is not None:
                    grad_norm = strategy.clip_grad_norm(model, trainer.clip_grad_norm)  # None: clipped in step
                    if grad_norm is not None and not math.isfinite(grad_norm) and not cycle_bad:
                        cycle_bad = True
                        last_bad = f"gradient norm {grad_norm} at step {state.step} (epoch {state.epoch})"
                bad_now = _any_rank(accelerator, cycle_bad)
                if bad_now:
                    strategy.skip(optimizer)  # the weights never see a non-finite update
                else:
                    inner_hook = getattr(inner, "before_optimizer_step", None)
                    if inner_hook is not None:
                        inner_hook(state.step, trainer.max_steps)
                    if not strategy.step(optimizer):  # zero*: DeepSpeed found the gradient norm non-finite
                        bad_now, last_bad = True, f"non-finite gradient norm at step {state.step} (epoch {state.epoch})"
                    strategy.zero_grad(optimizer)
                    if grad_norm is None:
                        grad_norm = strategy.grad_norm()
                if bad_now:
                    state.skipped_steps += 1
                    bad_in_a_row += 1
                    cycle_bad = False
                    logger.log(state.step, {"skipped_step": last_bad or "non-finite on another rank",
                                            "skipped_steps": state.skipped_steps}, prefix="nonfinite")
                    accelerator.print(f"warning: skipped a non-finite step: {last_bad or 'on another rank'}")
                    if bad_in_a_row >= trainer.max_bad_steps:
                        last = latest_checkpoint(ckpt_root)
                        raise FloatingPointError(
                            f"{bad_in_a_row} steps in a row had a non-finite loss or gradient; the last: "
                            f"{last_bad or 'on another rank'}. The weights were not updated by them. Lower optim.lr, "
                            f"set trainer.clip_grad_norm or trainer.precision=fp32, or check these samples; the last "
                            f"good checkpoint is {last} (intact).")
                    continue
                bad_in_a_row = 0
                hook = getattr(inner, "after_optimizer_step", None)
                if hook is not None:
                    hook(state.step, trainer.max_steps)
                state.step += 1
                now = time.time()
                state.train_seconds += now - step_start
                step_start = now
                bar.update(1)

                collapse, checked = None, False
                if state.step % trainer.log_every == 0 or state.step == trainer.max_steps:
                    elapsed = max(time.time() - window_start, 1e-9)
                    values = {k: sum(v) if k == "bad_samples" else sum(v) / len(v) for k, v in window.items()}
                    values.update(lr=lr_now, weight_decay=wd_now, epoch=state.epoch,
                                  images_per_s=window_images / elapsed, images_seen=state.images_seen,
                                  train_seconds=round(state.train_seconds, 2), skipped_steps=state.skipped_steps)
                    if grad_norm is not None and math.isfinite(grad_norm):
                        values["grad_norm"] = grad_norm
                    logger.log(state.step, values)
                    bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr_now:.2e}",
                                    img_s=f"{values['images_per_s']:.0f}")
                    window, window_images, window_start = {}, 0, time.time()
                    collapse, checked = (collapse_hook(values) if collapse_hook else None), True
                if main and trainer.visualize_every and state.step % trainer.visualize_every == 0 \
                        and hasattr(inner, "visualize"):
                    picture = inner.visualize(batch, out)
                    _save_image(picture, run_dir / "logs" / "images" / f"step_{state.step:08d}.png")
                    logger.log_image(state.step, picture)

                if selection is not None and selection.due(state.step, trainer.max_steps):
                    if main:
                        looked = selection(state.step, inner)
                        if isinstance(looked, dict) and looked:  # a monitor's values: beside the loss, in every logger
                            logger.log(state.step, looked, prefix=getattr(selection, "prefix", "selection"))
                            if looked.get("collapsed") and collapse is None:
                                collapse = (f"the representation monitor's features collapsed (feature_std "
                                            f"{looked.get('feature_std')}, effective rank {looked.get('effective_rank')})")
                    checked = True
                    accelerator.wait_for_everyone()
                if checked and not collapse_warned and _any_rank(accelerator, collapse is not None):
                    collapse_warned = True
                    logger.log(state.step, {"collapsed_at_step": state.step}, prefix="collapse")
                    text = f"step {state.step}: {collapse or 'the features collapsed on another rank'}. {COLLAPSE_CAUSES}"
                    if trainer.stop_on_collapse:
                        path = checkpoint()
                        raise CollapseError(f"{text}. Stopped (trainer.stop_on_collapse); the state at the collapse "
                                            f"is checkpoint {path}, earlier ones are kept")
                    accelerator.print(f"\nwarning: {text}. Training goes on (trainer.stop_on_collapse=true stops "
                                      "here); this warning is printed once")
                if _any_rank(accelerator, preempt.requested):
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
                    workers = getattr(loader, "num_workers", 0)
                    raise ValueError(
                        "the training split yielded no batch: it holds fewer samples than data.batch_size (batches "
                        "are full-size in training); lower data.batch_size" + (
                            f". With data.num_workers={workers} each worker batches its own share of the epoch, so "
                            f"an epoch needs batch_size x {workers} samples: lower data.num_workers too, or raise "
                            "data.samples_per_epoch (resampled streams)" if workers > 1 else ""))
                state.epoch += 1
                state.batch_in_epoch = 0
                data_position = {}
    bar.close()
    logger.close()
    if not state.preempted:
        state.module = strategy.export_module(inner)
    strategy.close()
    return state


def _save_image(image: Any, path: Path) -> None:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
