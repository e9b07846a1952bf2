"""How the one loop's module and optimizer are spread over processes (`trainer.strategy`).

- `ddp`: accelerate's DistributedDataParallel (or one process). Every rank holds all weights and optimizer
  state; checkpoints are one full-state folder written by the main process (`model.safetensors` +
  `optimizer.pt`, checkpoint.py).
- `fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`) on every transformer block and on the root, over a
  1-D device mesh of all processes (gloo on CPU, nccl on GPUs), with a bf16 `MixedPrecisionPolicy` (fp32
  reduce) under `trainer.precision=bf16`. Parameters, gradients and AdamW state are DTensor shards (1/N per
  rank). Checkpoints go through torch.distributed.checkpoint (DCP): every rank writes its own shard in parallel
  and a checkpoint written by N processes loads on M (DCP reshards).
- `zero1|zero2|zero3`: DeepSpeed ZeRO stage 1/2/3 (zero.py).

The DINOv2 teacher is sharded exactly like the student (the same units), so the EMA update
`teacher = m * teacher + (1 - m) * student` is a local operation on each rank's shards, as in DINOv2.

A strategy is chosen once per run (`train.loop.build_strategy`) and asked by the loop to set up the module and optimizer
(loading a checkpoint of any format first), to run backward, clip and step, to write and read checkpoints,
and at the end to hand back a plain (unsharded) module on the main process for export.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from medfound.train.checkpoint import dcp_options, load_checkpoint, read_trainer_state, save_dcp, write_full_weights

def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor (a DTensor's local shard; any other tensor itself)."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def first_nonfinite(module: nn.Module) -> Optional[str]:
    """The name of the first floating-point weight or buffer with a NaN/Inf in this rank's part, or None."""
    for name, t in module.state_dict().items():
        if torch.is_tensor(t) and t.is_floating_point():
            t = local(t)
            if t.numel() and not torch.isfinite(t).all():
                return name
    return None


def report_shards(strategy: str, rank: int, world: int, held: int, total: int) -> None:
    """One line per process: how much of the model this rank holds (the check that sharding happened)."""
    print(f"{strategy}: rank {rank}/{world} holds {held:,} of {total:,} parameter elements "
          f"({held / max(total, 1):.1%})", flush=True)


def transformer_blocks(module: nn.Module) -> list[nn.Module]:
    """FSDP units: every transformer block (a module whose class name ends in `Block`, held in an
    nn.Sequential / nn.ModuleList: timm ViT `blocks`, the MAE decoder's `decoder_blocks`, the DINOv2
    teacher's and student's blocks alike), plus whatever the module's optional `fsdp_units()` hook adds
    (DINOv2: its projection heads). Nested blocks are not sharded twice (the outermost is the unit)."""
    units, seen = [], set()
    for container in module.modules():
        if isinstance(container, (nn.Sequential, nn.ModuleList)):
            for child in container:
                if type(child).__name__.endswith("Block") and id(child) not in seen:
                    units.append(child)
                    seen.update(id(m) for m in child.modules())
    extra = getattr(module, "fsdp_units", None)
    for m in (extra() if callable(extra) else []):
        if id(m) not in seen:
            units.append(m)
            seen.update(id(x) for x in m.modules())
    return units


def set_activation_checkpointing(module: nn.Module) -> int:
    """Turn on timm's per-block activation checkpointing in every timm model inside `module` (the MAE
    encoder, the DINOv2 student and teacher backbones, a fine-tuned backbone). Returns how many models."""
    n = 0
    for m in module.modules():
        if hasattr(m, "set_grad_checkpointing") and hasattr(m, "blocks"):
            m.set_grad_checkpointing(True)
            n += 1
    if n == 0:
        raise ValueError("trainer.activation_checkpointing=true but the model holds no timm backbone with "
                         "set_grad_checkpointing (a CNN segmenter); set it to false")
    return n


# ------------------------------------------------------------------------------------------------
# strategies
# ------------------------------------------------------------------------------------------------
class DDPStrategy:
    """accelerate's DDP; one process is the same with world size 1."""

    name = "ddp"
    checkpoint_format = "full"

    def __init__(self, accelerator, trainer) -> None:
        self.accelerator = accelerator
        self.trainer = trainer
        self.world = accelerator.num_processes
        self.main = accelerator.is_main_process

    # -- setup
    def setup(self, module: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
              resume_from: Optional[Path]) -> tuple[nn.Module, Any, nn.Module, Optional[dict]]:
        """(model to call, optimizer, the unwrapped module for hooks and state, saved trainer state or None)."""
        if self.trainer.activation_checkpointing:
            set_activation_checkpointing(module)
        optimizer = make_optimizer(module)
        saved = load_checkpoint(resume_from, module, optimizer) if resume_from is not None else None
        if self.trainer.compile:
            module = torch.compile(module)
        model, optimizer = self.accelerator.prepare(module, optimizer)
        inner = self.accelerator.unwrap_model(model, keep_torch_compile=False) if self.trainer.compile else \
            self.accelerator.unwrap_model(model)
        return model, optimizer, inner, saved

    # -- one micro-batch / one step
    def gradient_sync(self, model: nn.Module, sync: bool):
        return self.accelerator.no_sync(model) if not sync and self.world > 1 else contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        return float(self.accelerator.clip_grad_norm_(model.parameters(), max_norm))

    def grad_norm(self) -> Optional[float]:
        """The gradient norm measured inside `step` by strategies that clip there (zero*); None here."""
        return None

    def step(self, optimizer) -> bool:
        """Apply the update; False when the strategy itself found the gradients non-finite and skipped it."""
        optimizer.step()
        return True

    def skip(self, optimizer) -> None:
        """Drop this cycle's gradients without touching the weights (a non-finite loss or gradient)."""
        optimizer.zero_grad(set_to_none=True)

    def zero_grad(self, optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)

    # -- checkpoints
    def write_weights(self, folder: Path, inner: nn.Module, optimizer) -> None:
        """Called on every rank inside the checkpoint's temporary folder."""
        if self.main:
            write_full_weights(folder, inner, optimizer)

    def export_module(self, inner: nn.Module) -> Optional[nn.Module]:
        """Called on every rank after training: the trained module with plain tensors on the main process."""
        return inner if self.main else None

    def close(self) -> None:
        """Called on every rank once training and the export are done: release what the strategy holds."""


class FSDPStrategy(DDPStrategy):
    """FSDP2 per transformer block + root; DCP checkpoints."""

    name = "fsdp"
    checkpoint_format = "dcp"

    def setup(self, module, make_optimizer, resume_from):
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                             set_optimizer_state_dict)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if self.trainer.compile:
            raise ValueError("trainer.compile=true is not supported with trainer.strategy=fsdp yet; set "
                             "trainer.compile=false (or use trainer.strategy=ddp)")
        if self.trainer.activation_checkpointing:
            set_activation_checkpointing(module)
        device = self.accelerator.device
        module.to(device)
        # one process shards too when it is in a process group (a 1-GPU benchmark of the fsdp path)
        self.distributed = dist.is_available() and dist.is_initialized()
        self._shell = meta_shell(module) if self.main and self.distributed else None  # export's plain module
        saved, full_optim = None, None
        if resume_from is not None and read_trainer_state(resume_from).get("format", "full") == "full":
            # a full-state checkpoint (ddp, or medfound before the strategies): load it into the plain module and
            # an optimizer over it, then hand the optimizer state over by parameter name after sharding
            plain_optimizer = make_optimizer(module)
            saved = load_checkpoint(resume_from, module, plain_optimizer)
            full_optim = get_optimizer_state_dict(module, plain_optimizer, options=StateDictOptions(full_state_dict=True))
            del plain_optimizer
        if self.distributed:
            mesh = init_device_mesh(device.type, (self.world,))
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
                if self.trainer.precision == "bf16" else MixedPrecisionPolicy()
            for unit in transformer_blocks(module):
                fully_shard(unit, mesh=mesh, mp_policy=mp)
            fully_shard(module, mesh=mesh, mp_policy=mp)
        optimizer = make_optimizer(module)
        report_shards(self.name, self.accelerator.process_index, self.world,
                      sum(local(p).numel() for p in module.parameters()), sum(p.numel() for p in module.parameters()))
        if full_optim is not None:
            set_optimizer_state_dict(module, optimizer, full_optim, options=StateDictOptions(full_state_dict=True))
        elif resume_from is not None:
            saved = load_checkpoint(resume_from, module, optimizer, distributed=self.distributed)
        return module, optimizer, module, saved

    def gradient_sync(self, model, sync):
        if self.distributed:
            model.set_requires_gradient_sync(sync)  # reduce-scatter only on the last micro-batch
        return contextlib.nullcontext()

    def backward(self, loss):
        loss.backward()

    def clip_grad_norm(self, model, max_norm):
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        full = getattr(norm, "full_tensor", None)
        return float(full() if callable(full) else norm)

    def write_weights(self, folder, inner, optimizer):
        save_dcp(folder, inner, optimizer, main=self.main, distributed=self.distributed)

    def export_module(self, inner):
        """Consolidate: all ranks gather the full state dict to the main process's CPU, which loads it into a
        plain copy of the module (kept since setup with its parameters on the meta device: no memory)."""
        if not self.distributed:
            return inner
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        full = get_model_state_dict(inner, options=dcp_options(full_state_dict=True, cpu_offload=True))
        if not self.main:
            return None
        shell = self._shell
        shell.load_state_dict(full, strict=True, assign=True)
        return shell


def meta_shell(module: nn.Module) -> nn.Module:
    """A copy of `module` whose parameters live on the meta device (no memory), buffers and submodule
    settings kept: `load_state_dict(full, assign=True)` later makes it the trained plain module."""
    params = {id(p): p for p in module.parameters()}
    memo = {pid: nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for pid, p in params.items()}
    return copy.deepcopy(module, memo)
