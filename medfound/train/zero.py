"""DeepSpeed ZeRO stages 1, 2 and 3 (`trainer.strategy: zero1 | zero2 | zero3`; the `[deepspeed]` extra).

Stage 1 partitions the optimizer state, stage 2 also the gradients, stage 3 also the parameters, each over
all processes. On CPU DeepSpeed runs with `DS_ACCELERATOR=cpu` (set here when there is no GPU) over the gloo
group accelerate already formed; on GPUs over nccl.

What medfound controls and what the DeepSpeed config may add: batch size per process, gradient
accumulation, clipping (`trainer.clip_grad_norm`; DeepSpeed's own default of 1.0 is never used silently)
and bf16 come from the recipe. `trainer.deepspeed_config` (e.g. `launch/deepspeed/zero3.json`) may add
`zero_optimization` tuning (buckets, overlap, offload); a key that contradicts the recipe is an error.

Non-finite steps: DeepSpeed computes the global gradient norm in every step and skips the update when it is
not finite (`engine.was_step_applied()`); the loop counts that as a skipped step, exactly like ddp/fsdp.

Checkpoints (`format: zero`) are DeepSpeed's own: every rank writes its partition of the optimizer (and for
stage 3 parameter) state in parallel into `zero/` of the checkpoint folder. DeepSpeed reads them with
`torch.load`; medfound forces `weights_only=True` around it (`weights_only_loads`), with only DeepSpeed's own
plain data classes allowed, so a crafted file cannot run code. DeepSpeed loads them natively on the same number of processes; on
another number medfound converts the checkpoint once with DeepSpeed's `ds_to_universal` (into
`zero_universal/` beside it) and loads that universal checkpoint (`checkpoint.load_universal`): weights and
optimizer state exact (tested 2 -> 4). Evaluation and export read
them on one process through DeepSpeed's fp32 consolidation (`load_zero_plain`).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from medfound.train.checkpoint import (ZERO_DIR, ZERO_TAG, import_deepspeed, read_trainer_state, weights_only_loads,
                                       with_rng)
from medfound.train.strategy import DDPStrategy, meta_shell, report_shards, set_activation_checkpointing
from medfound.io import atomic_dir

UNIVERSAL_DIR = "zero_universal"  # ds_to_universal's conversion of a zero checkpoint, made when the world size changes
_RECIPE_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping", "bf16", "fp16", "optimizer", "scheduler")


def deepspeed_config(trainer, stage: int) -> dict[str, Any]:
    """The DeepSpeed config of a run: the recipe's numerics, plus `trainer.deepspeed_config`'s ZeRO tuning."""
    extra: dict[str, Any] = {}
    if trainer.deepspeed_config is not None:
        path = Path(trainer.deepspeed_config)
        try:
            extra = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"trainer.deepspeed_config={path} is not a readable JSON file ({e})") from None
        clash = [k for k in _RECIPE_KEYS if k in extra]
        if clash:
            raise ValueError(f"{path} sets {clash}, which the recipe controls (data.batch_size, "
                             "trainer.grad_accum_steps, trainer.clip_grad_norm, trainer.precision, optim.*); "
                             "remove them from the file")
        file_stage = extra.get("zero_optimization", {}).get("stage")
        if file_stage is not None and file_stage != stage:
            raise ValueError(f"{path} says zero_optimization.stage={file_stage} but trainer.strategy=zero{stage}; "
                             f"use launch/deepspeed/zero{stage}.json or change trainer.strategy")
    zero = {**extra.get("zero_optimization", {}), "stage": stage}
    return {**extra, "zero_optimization": zero,
            "train_micro_batch_size_per_gpu": 1,  # DeepSpeed's throughput counters only; the loader sets batches
            "gradient_accumulation_steps": trainer.grad_accum_steps,
            "gradient_clipping": trainer.clip_grad_norm or 0.0,
            "bf16": {"enabled": trainer.precision == "bf16"},
            "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 12, "wall_clock_breakdown": False}


class ZeroStrategy(DDPStrategy):
    """DeepSpeed ZeRO stage 1/2/3 through `deepspeed.initialize` with medfound's AdamW groups."""

    checkpoint_format = "zero"

    def __init__(self, accelerator, trainer, stage: int) -> None:
        super().__init__(accelerator, trainer)
        self.stage = stage
        self.name = f"zero{stage}"
        self.engine = None

    def setup(self, module, make_optimizer, resume_from):
        deepspeed = import_deepspeed()
        if self.trainer.compile:
            raise ValueError(f"trainer.compile=true is not supported with trainer.strategy={self.name}; set "
                             "trainer.compile=false")
        if getattr(module, "touches_gradients", False):
            raise ValueError(f"trainer.strategy={self.name}: this objective cancels some gradients before the "
                             "optimizer step (DINOv2 objective.freeze_last_layer_steps > 0), which DeepSpeed's flat "
                             "ZeRO partitions cannot do; set objective.freeze_last_layer_steps=0 or use "
                             "trainer.strategy=fsdp")
        if self.trainer.activation_checkpointing:
            set_activation_checkpointing(module)
        saved = None
        written = read_trainer_state(resume_from) if resume_from is not None else {}
        if resume_from is not None and written.get("format", "full") != "zero":
            raise ValueError(
                f"{resume_from} was written under trainer.strategy={written.get('strategy', 'ddp')}: DeepSpeed builds "
                f"its optimizer partitions itself, so it cannot continue that run under {self.name}. Resume it "
                "under trainer.strategy=ddp or fsdp (they read each other's checkpoints), or start a new run from "
                "its weights (backbone.weights=RUN/export)")
        universal = resume_from is not None and written.get("world_size") != self.world
        if universal:
            n = written.get("world_size")
            self.accelerator.print(
                f"{resume_from} is a DeepSpeed ZeRO checkpoint written by {n} processes and this run has {self.world}: "
                "converting it to a DeepSpeed universal checkpoint (ds_to_universal) to load it here; weights and "
                "optimizer resume exactly, the data order and RNG do not")
            if self.main:
                to_universal(Path(resume_from))
            self.accelerator.wait_for_everyone()
        optimizer = make_optimizer(module)

        self._shell = meta_shell(module) if self.main else None  # the plain module export fills in
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   auto_mpi_discovery=False)
        config = deepspeed_config(self.trainer, self.stage)
        if universal:
            config["checkpoint"] = {**config.get("checkpoint", {}), "load_universal": True}
        engine, ds_optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config,
                                                          dist_init_required=False)
        self.engine = engine
        params = list(engine.module.parameters())
        held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
        report_shards(self.name, self.accelerator.process_index, self.world, held,
                      sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params))
        if resume_from is not None:
            folder = Path(resume_from) / (UNIVERSAL_DIR if universal else ZERO_DIR)
            with weights_only_loads():
                path, _ = engine.load_checkpoint(str(folder), tag=ZERO_TAG, load_module_strict=True,
                                                 load_optimizer_states=True, load_lr_scheduler_states=False)
            if path is None:
                raise FileNotFoundError(f"{resume_from}/{ZERO_DIR} holds no DeepSpeed checkpoint")
            saved = with_rng(resume_from, read_trainer_state(resume_from))
        return engine, ds_optimizer, engine.module, saved

    def gradient_sync(self, model, sync):
        self.engine.set_gradient_accumulation_boundary(sync)
        return contextlib.nullcontext()

    def backward(self, loss):
        # the loop divides by the accumulation steps; DeepSpeed would divide again
        self.engine.backward(loss, scale_wrt_gas=False)

    def clip_grad_norm(self, model, max_norm):
        return None  # DeepSpeed clips inside step (gradient_clipping) and reports the norm after it

    def grad_norm(self) -> Optional[float]:
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def step(self, optimizer) -> bool:
        self.engine.step()
        return bool(self.engine.was_step_applied())

    def skip(self, optimizer) -> None:
        """A non-finite loss on some rank: its gradients are non-finite after the reduction, so DeepSpeed's
        step finds the norm non-finite and applies nothing; the step is still called to close the cycle."""
        self.engine.step()
        if self.engine.was_step_applied():
            print(f"warning: rank {self.accelerator.process_index}: the loss was non-finite but DeepSpeed found the "
                  "reduced gradients finite and applied this step", flush=True)

    def zero_grad(self, optimizer) -> None:
        pass  # the engine clears gradients in its step

    def write_weights(self, folder, inner, optimizer):
        self.engine.save_checkpoint(str(folder / ZERO_DIR), tag=ZERO_TAG, save_latest=False)

    def export_module(self, inner):
        """All ranks gather the fp32 weights (stage 3: parameter by parameter); the main process loads them into
        the plain copy of the module taken before DeepSpeed wrapped it."""
        from deepspeed.utils import safe_get_full_fp32_param

        full = {}
        for name, p in inner.named_parameters():
            value = safe_get_full_fp32_param(p) if p.requires_grad else None
            if value is None:
                value = _gathered(p, self.stage)
            if self.main:
                full[name] = value.detach().cpu().clone()
        if not self.main:
            return None
        buffers = {k: v.detach().cpu().clone() for k, v in inner.state_dict().items() if k not in full}
        self._shell.load_state_dict({**buffers, **full}, strict=True, assign=True)
        return self._shell

    def close(self) -> None:
        """DeepSpeed's own teardown (its hooks and partition buffers), while the interpreter and the process group
        are alive rather than at exit."""
        if self.engine is not None:
            self.engine.destroy()
            self.engine = None


def to_universal(checkpoint: Path) -> Path:
    """DeepSpeed's `ds_to_universal` of a zero checkpoint, into `checkpoint/zero_universal` (once; atomic), read
    weights-only. A universal checkpoint loads on any number of processes (`checkpoint.load_universal`)."""
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    target = Path(checkpoint) / UNIVERSAL_DIR
    if (target / "latest_universal").is_file():
        return target
    with atomic_dir(target, overwrite=True) as tmp:
        args = argparse.Namespace(input_folder=str(Path(checkpoint) / ZERO_DIR / ZERO_TAG),
                                  output_folder=str(tmp / ZERO_TAG), num_extract_workers=1, num_merge_workers=1,
                                  keep_temp_folder=False, strict=True, inject_missing_state=False)
        with weights_only_loads():
            ds_to_universal.main(args)
    return target


def _gathered(p: nn.Parameter, stage: int) -> torch.Tensor:
    if stage < 3 or not hasattr(p, "ds_id"):
        return p.data
    import deepspeed

    with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
        return p.data.detach().clone()
