"""Checkpoints: atomic, complete for exact resume, and loadable without unpickling code.

Layout of `RUN_DIR/checkpoints/step_NNNNNNNN/`, the weights in one of three formats (trainer_state.json's
"format"; train/strategy.py):
- "full" (ddp, one process; every checkpoint before strategies existed):
  `model.safetensors` the module's state dict, `optimizer.pt` the optimizer state dict (tensors and numbers
  only: `torch.load(weights_only=True)`)
- "dcp" (fsdp): `dcp/` torch.distributed.checkpoint shards, one file per rank, + `optimizer_groups.json`
- "zero" (zero1/2/3): `zero/state/` DeepSpeed's per-rank partitions
and in every format:
- `rng.safetensors`    every process's torch CPU (and CUDA) generator states (`rank{r}.torch_cpu`, ...)
- `trainer_state.json` step, images seen, time, skipped steps; and per process ("ranks") its data position
                       (epoch, batch in epoch) and Python/NumPy RNG
- `config.yaml`        the resolved recipe the run was started with
`RUN_DIR/checkpoints/last` is a text file naming the newest complete checkpoint. Each checkpoint is
written under a temporary name (every rank writing its part there) and renamed by the main process once all
ranks succeeded; `last` is replaced atomically after it, so a kill at any moment leaves `last` pointing at a
complete checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, load_model, save_file, save_model

from medfound.io import atomic_dir, atomic_write_text, write_failure

LAST = "last"
DCP_DIR = "dcp"                         # fsdp: the DCP checkpoint inside a checkpoint folder
OPTIM_GROUPS = "optimizer_groups.json"  # fsdp: the optimizer's non-tensor state (param_groups hyperparameters)


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def capture_rng() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    scalars = {"python": [py_state[0], list(py_state[1]), py_state[2]],
               "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    return scalars, tensors


def restore_rng(scalars: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    v, state, gauss = scalars["python"]
    random.setstate((v, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = scalars["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)


def write_full_weights(folder: Path, module: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> None:
    """The full-state weights of a checkpoint (ddp, one process): `model.safetensors` + `optimizer.pt`."""
    save_model(module, str(folder / "model.safetensors"))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), folder / "optimizer.pt")


class _OneProcess:
    """The coordination a checkpoint needs, for a single process (the loop passes its accelerator-backed one)."""

    main = True

    def broadcast(self, obj: Any) -> Any:
        return obj

    def any(self, flag: bool) -> bool:
        return flag


def save_checkpoint(root: Path, module: nn.Module, optimizer: Optional[torch.optim.Optimizer], state: dict[str, Any],
                    ranks: list[dict[str, Any]], config_text: str, keep: int = 2,
                    protect: Optional[Path] = None, *, write_weights: Optional[Callable[..., None]] = None,
                    fmt: str = "full", coordinator: Any = None) -> Path:
    """Write `root/step_NNNNNNNN` atomically, point `root/last` at it, prune to the `keep` newest written.

    Called by every process. The main process creates a temporary folder and tells the others its name; each
    process writes its part of the weights there (`write_weights(folder, module, optimizer)`: the full state
    from the main process for ddp, every rank's shards for fsdp / zero); only when every rank succeeded does
    the main process add trainer_state.json, rng.safetensors and config.yaml and rename the folder, then
    replace `last`. A kill at any moment leaves `last` naming a complete checkpoint.
    `ranks`: per process {"epoch", "batch_in_epoch", "rng" (capture_rng scalars), "rng_tensors"}, and optionally
    "data_position" (per DataLoader worker, where its stream stands: `medfound.data.pipeline.ResumableLoader`).
    `protect`: a checkpoint never pruned (the one this run resumed from).
    `coordinator`: .main, .broadcast(obj) (main's object to all), .any(flag) (True on all if any rank's flag).
    """
    root = Path(root)
    coord = coordinator or _OneProcess()
    write_weights = write_weights or write_full_weights
    target = root / step_dir_name(state["step"])
    tensors = {f"rank{r}.{k}": v for r, d in enumerate(ranks) for k, v in d["rng_tensors"].items()}
    per_rank = [{"epoch": d["epoch"], "batch_in_epoch": d["batch_in_epoch"], "rng": d["rng"],
                 **({"data_position": d["data_position"]} if d.get("data_position") else {})} for d in ranks]
    error: Optional[BaseException] = None
    ctx, tmp = None, None
    if coord.main:
        try:
            ctx = atomic_dir(target, overwrite=True)
            tmp = ctx.__enter__()
        except Exception as e:
            ctx, error = None, e
    tmp = coord.broadcast(str(tmp) if tmp is not None else None)
    if tmp is not None:
        try:
            write_weights(Path(tmp), module, optimizer)
        except Exception as e:  # OSError, torch's RuntimeError, safetensors' SafetensorError, DCP's wrapper
            error = e
    if not coord.any(error is not None or tmp is None) and ctx is not None:
        try:
            folder = Path(tmp)
            save_file(tensors, str(folder / "rng.safetensors"))
            (folder / "config.yaml").write_text(config_text)
            (folder / "trainer_state.json").write_text(json.dumps(
                {**state, "format": fmt, "world_size": len(ranks), "ranks": per_rank}, indent=1))
        except Exception as e:
            error = e
    if ctx is not None:  # complete (rename into place) or abandon (the temporary folder is removed)
        try:
            if error is None:
                ctx.__exit__(None, None, None)
                atomic_write_text(root / LAST, target.name + "\n")
            else:
                ctx.__exit__(type(error), error, error.__traceback__)
        except Exception as e:
            error = error or e
    if coord.any(error is not None):
        _raise_write_failure(root, target, error or OSError(28, "another process could not write its part"))
    if coord.main:
        prune(root, keep, keep_also=[target] + ([Path(protect)] if protect is not None else []))
    return target


def _raise_write_failure(root: Path, target: Path, e: BaseException) -> None:
    reason = write_failure(e)
    if reason is None:
        raise e
    previous = (root / LAST).read_text().strip() if (root / LAST).is_file() else None
    raise OSError(e.errno if isinstance(e, OSError) and e.errno else 28,
                  f"writing checkpoint {target} failed: {reason}. Free space or point trainer.output_dir at a "
                  f"larger disk, then resume with trainer.resume=auto; "
                  + (f"{root / previous} (the last complete checkpoint) is intact" if previous else
                     "no earlier checkpoint exists")) from None


def _written(path: Path) -> tuple[float, str]:
    state = path / "trainer_state.json"
    return (state.stat().st_mtime if state.is_file() else 0.0, path.name)


def prune(root: Path, keep: int, keep_also: list[Path]) -> list[Path]:
    """Delete all but the `keep` most recently written checkpoints of `root` (by write time, not step number: after
    resuming an older checkpoint the newest are the resumed branch), never one in `keep_also`, nor the one `last`
    names. Only `step_*` directories holding a trainer_state.json are touched. Returns what was deleted."""
    root = Path(root)
    named = (root / LAST).read_text().strip() if (root / LAST).is_file() else None
    spared = {p.resolve() for p in keep_also}
    ckpts = sorted((p for p in root.glob("step_*") if p.is_dir() and (p / "trainer_state.json").is_file()),
                   key=_written, reverse=True)
    deleted = []
    for old in ckpts[keep:]:
        if old.resolve() in spared or old.name == named:
            continue
        shutil.rmtree(old, ignore_errors=True)
        deleted.append(old)
    return deleted


def latest_checkpoint(root: Path) -> Optional[Path]:
    """The checkpoint `root/last` names, or None when the run has none yet."""
    last = Path(root) / LAST
    if not last.is_file():
        return None
    name = last.read_text().strip()
    target = Path(root) / name
    # `last` names a folder of this run's checkpoints/: never a path out of it (an edited pointer would resume, and
    # then prune, another run's checkpoint), never a link
    if not re.fullmatch(r"step_\d{8,}", name) or target.is_symlink() or last.is_symlink():
        raise ValueError(f"{last} names {name!r}, which is not a checkpoint folder of {root} (step_NNNNNNNN, no "
                         f"path, no link): set trainer.resume to the checkpoint you mean, or fix {last}")
    if not (target / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{last} names {target.name}, which is missing or incomplete; "
                                f"point trainer.resume at another checkpoint in {root}")
    return target


def read_trainer_state(path: Path) -> dict[str, Any]:
    """A checkpoint's trainer_state.json ("format" is "full" for checkpoints written before strategies)."""
    try:
        state = json.loads((Path(path) / "trainer_state.json").read_text())
    except Exception as e:
        raise ValueError(f"checkpoint {path} is damaged ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                         "resume from another checkpoint") from None
    problem = _state_problem(state, Path(path))
    if problem:
        raise ValueError(f"checkpoint {path} is damaged: trainer_state.json {problem}; resume from another "
                         "checkpoint")
    return state


def _state_problem(state: Any, path: Path) -> Optional[str]:
    """What is wrong with a checkpoint's trainer_state (a hand edit, a damaged file), or None."""
    if not isinstance(state, dict):
        return "is not a JSON object"
    for key in ("step", "images_seen", "skipped_steps"):
        value = state.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return f"has {key}={value!r} (a count: an integer >= 0)"
    if re.fullmatch(r"step_\d+", path.name) and int(path.name[5:]) != state.get("step", 0):
        return f"says step {state.get('step')} in the folder of step {int(path.name[5:])}"
    ranks = state.get("ranks", [])
    if not isinstance(ranks, list) or not all(isinstance(r, dict) and isinstance(r.get("epoch", 0), int) and
                                              isinstance(r.get("batch_in_epoch", 0), int) and
                                              r.get("epoch", 0) >= 0 and r.get("batch_in_epoch", 0) >= 0
                                              for r in ranks):
        return "has a rank whose epoch or batch position is not an integer >= 0"
    return None


def load_checkpoint(path: Path, module: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None, *,
                    distributed: bool = False) -> dict[str, Any]:
    """Load weights (strict: any missing or unexpected key is an error) and optimizer; return trainer state.

    Reads every format medfound writes: "full" (model.safetensors + optimizer.pt), "dcp" (fsdp: sharded,
    into a sharded or a plain module on any number of processes; `distributed=True` when `module` is sharded
    and every process calls this). "zero" checkpoints are read by the zero strategy (train/zero.py), and here
    too when `module` is a plain module (evaluation, export)."""
    path = Path(path)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{path} is not a medfound checkpoint (no trainer_state.json)")
    state = read_trainer_state(path)
    fmt = state.get("format", "full")
    if fmt == "dcp":
        load_dcp(path, module, optimizer, distributed=distributed)
    elif fmt == "zero":
        load_zero_plain(path, module, optimizer)
    else:
        _load_full(path, module, optimizer)
    return with_rng(path, state)


def with_rng(path: Path, state: dict[str, Any]) -> dict[str, Any]:
    """`state` (a checkpoint's trainer_state) with every rank's RNG tensors from rng.safetensors."""
    try:
        tensors = load_file(str(Path(path) / "rng.safetensors"))
    except Exception as e:
        raise ValueError(f"checkpoint {path} is damaged ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                         "resume from another checkpoint") from None
    state["_rng_tensors"] = [{k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"rank{r}.")}
                             for r in range(len(state["ranks"]))]
    for r, d in enumerate(state["ranks"]):
        d["rng_index"] = r
    return state


def _load_full(path: Path, module: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> None:
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path} is not a medfound checkpoint (no model.safetensors)")
    # strict=False only to collect both key lists for one readable error; any difference raises below
    try:
        missing, unexpected = load_model(module, str(path / "model.safetensors"), strict=False)
    except Exception as e:  # safetensors' header errors, truncation
        if isinstance(e, RuntimeError) and "size mismatch" in str(e):
            raise RuntimeError(f"checkpoint {path} does not fit the model built from the recipe ({str(e).splitlines()[0]}). "
                               "Was the recipe changed since the checkpoint was written?") from None
        raise ValueError(f"checkpoint file {path / 'model.safetensors'} is unreadable ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]}): corrupt or truncated. Resume from another checkpoint "
                         f"(trainer.resume={path.parent}/step_NNNNNNNN)") from None
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {path} does not fit the model built from the recipe: "
                           f"missing {sorted(missing)[:8]}{'...' if len(missing) > 8 else ''}, "
                           f"unexpected {sorted(unexpected)[:8]}{'...' if len(unexpected) > 8 else ''}. "
                           "Was the recipe changed since the checkpoint was written?")
    if optimizer is not None:
        try:
            saved = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        except Exception as e:  # an UnpicklingError for anything but tensors and numbers; a truncated zip
            raise ValueError(f"checkpoint file {path / 'optimizer.pt'} cannot be loaded safely ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200]}): corrupt, truncated or not written by medfound. "
                             f"Resume from another checkpoint") from None
        optimizer.load_state_dict(saved)


# ------------------------------------------------------------------------------------------------
# DCP (fsdp), read without unpickling code
# ------------------------------------------------------------------------------------------------
class _MetadataUnpickler(pickle.Unpickler):
    """DCP's `.metadata` is a pickle. Only its own plain data classes, torch.Size, dtypes, layouts and paths
    are allowed; anything else (a callable a crafted file would run) is refused."""

    ALLOWED_MODULES = ("torch.distributed.checkpoint.",)
    # torch.serialization._get_layout maps a layout's name ("torch.strided") to the layout object, nothing else
    ALLOWED = {("torch", "Size"), ("collections", "OrderedDict"), ("builtins", "slice"), ("builtins", "set"),
               ("builtins", "frozenset"), ("torch", "device"), ("torch.serialization", "_get_layout"),
               ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
               ("pathlib", "PureWindowsPath")}  # the checkpoint's own path, recorded by DCP

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith(self.ALLOWED_MODULES) and not name.startswith("__"):
            obj = super().find_class(module, name)
            if isinstance(obj, type):
                return obj
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        if module == "torch":
            obj = getattr(torch, name, None)
            if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
                return obj
        raise pickle.UnpicklingError(f"refusing {module}.{name} in a checkpoint's DCP metadata")


def _reader(path: Path):
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        """FileSystemReader whose metadata is read by a restricted unpickler (tensors are read by DCP with
        `torch.load(weights_only=True)`; this checkpoint format stores no other objects)."""

        def read_metadata(self, *args: Any, **kwargs: Any):
            from torch.distributed.checkpoint.metadata import StorageMeta

            rank = kwargs.get("rank")
            name = ".metadata" if rank is None else f"__{rank}.metadata"
            try:
                with open(Path(self.path) / name, "rb") as f:
                    metadata = _MetadataUnpickler(f).load()
            except FileNotFoundError:
                raise FileNotFoundError(f"{self.path} has no {name}: the checkpoint was not completed") from None
            except Exception as e:
                raise ValueError(f"checkpoint metadata {Path(self.path) / name} cannot be read safely "
                                 f"({type(e).__name__}: {str(e)[:200]}): damaged or not written by medfound; "
                                 "resume from another checkpoint") from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def dcp_options(**kw: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True, **kw)


def save_dcp(folder: Path, module: nn.Module, optimizer: Optional[torch.optim.Optimizer], *, main: bool,
             distributed: bool) -> None:
    """Write `module` (and `optimizer`) into `folder/dcp` (tensors: each rank its shards, in parallel) and
    `folder/optimizer_groups.json` (the optimizer's hyperparameters, by the main process)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is not None:
        msd, osd = get_state_dict(module, optimizer, options=dcp_options())
    else:
        msd, osd = get_model_state_dict(module, options=dcp_options()), {}
    target = {"model": msd, "optim": {k: v for k, v in osd.items() if torch.is_tensor(v)}}
    dcp.save(target, storage_writer=dcp.FileSystemWriter(str(folder / DCP_DIR), single_file_per_rank=True),
             no_dist=not distributed)
    if main:
        groups = {k: list(v) if isinstance(v, tuple) else v for k, v in osd.items() if not torch.is_tensor(v)}
        (folder / OPTIM_GROUPS).write_text(json.dumps(groups, indent=0))


def load_dcp(folder: Path, module: nn.Module, optimizer: Optional[torch.optim.Optimizer], *,
             distributed: bool) -> None:
    """Load a `save_dcp` checkpoint into `module` (sharded or plain, any number of processes: DCP reshards)
    and `optimizer`. Strict: a missing or unexpected weight is an error naming both lists."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                         set_state_dict)

    reader = _reader(folder / DCP_DIR)
    saved = reader.read_metadata().state_dict_metadata
    if optimizer is not None:
        msd, osd = get_state_dict(module, optimizer, options=dcp_options())
    else:
        msd, osd = get_model_state_dict(module, options=dcp_options()), {}
    have = {f"model.{k}" for k in msd}
    stored = {k for k in saved if k.startswith("model.")}
    if have != stored:
        missing, unexpected = sorted(have - stored), sorted(stored - have)
        raise RuntimeError(f"checkpoint {folder} does not fit the model built from the recipe: missing "
                           f"{[k[6:] for k in missing[:8]]}, unexpected {[k[6:] for k in unexpected[:8]]}. "
                           "Was the recipe changed since the checkpoint was written?")
    target = {"model": msd, "optim": {k: v for k, v in osd.items() if torch.is_tensor(v)}}
    if optimizer is not None:
        absent = sorted(k for k in target["optim"] if f"optim.{k}" not in saved)
        if absent:
            raise RuntimeError(f"checkpoint {folder} holds no optimizer state for {absent[:4]}: it was written "
                               "for other trainable parameters (another tuning strategy?)")
    else:
        target.pop("optim")
    dcp.load(target, storage_reader=reader, no_dist=not distributed)
    if optimizer is None:
        set_model_state_dict(module, target["model"], options=dcp_options())
        return
    groups = json.loads((folder / OPTIM_GROUPS).read_text())
    osd = {**{k: v for k, v in osd.items() if not torch.is_tensor(v)}, **groups, **target["optim"]}
    set_state_dict(module, optimizer, model_state_dict=target["model"], optim_state_dict=osd, options=dcp_options())


# ------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO checkpoints (zero*), loaded weights-only
# ------------------------------------------------------------------------------------------------
ZERO_DIR = "zero"   # DeepSpeed's checkpoint inside a checkpoint folder
ZERO_TAG = "state"


def import_deepspeed():
    """deepspeed, on CPU with DS_ACCELERATOR=cpu; a clear error naming the extra when it is not installed."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError:
        raise ImportError("trainer.strategy=zero1/zero2/zero3 needs DeepSpeed: pip install 'medfound[deepspeed]' "
                          "(or choose trainer.strategy=fsdp, which needs nothing more)") from None
    return deepspeed


def _safe_globals() -> list[Any]:
    """The classes a DeepSpeed ZeRO checkpoint pickles besides tensors and containers (found by saving one
    with every stage): plain data, none of them callable on load."""
    import collections

    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address, collections.OrderedDict]


@contextlib.contextmanager
def weights_only_loads():
    """Every torch.load inside (DeepSpeed's own included) reads with weights_only=True: tensors, containers
    and the allow-listed DeepSpeed data classes only, never code from a file."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            yield
    except pickle.UnpicklingError as e:
        raise ValueError(f"a DeepSpeed checkpoint file cannot be loaded safely ({str(e).splitlines()[0][:300]}): "
                         "damaged or not written by medfound. Resume from another checkpoint") from None
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def load_zero_plain(path: Path, module: nn.Module, optimizer=None) -> None:
    """A zero checkpoint into a plain module on one process (evaluation, rebuilding the trained model): the
    fp32 weights consolidated from every rank's partition by DeepSpeed, loaded strictly. Optimizer state is
    not carried into a plain module (resume a zero run under a zero strategy, on any number of processes)."""
    if optimizer is not None:
        raise ValueError(f"{path} is a DeepSpeed ZeRO checkpoint: resume it under trainer.strategy=zero1/zero2/zero3 "
                         "(any number of processes), or start a new run from its export (backbone.weights=RUN/export)")
    import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with weights_only_loads():
        full = get_fp32_state_dict_from_zero_checkpoint(str(Path(path) / ZERO_DIR), tag=ZERO_TAG)
    buffers = {k: v for k, v in module.state_dict().items() if k not in full}
    missing = [k for k in buffers if k in dict(module.named_parameters())]
    if missing:
        raise RuntimeError(f"checkpoint {path} does not fit the model built from the recipe: missing {missing[:8]}")
    module.load_state_dict({**buffers, **full}, strict=True)

