"""Checkpoints: atomic, complete for exact resume, and loadable without unpickling code.

Layout of `RUN_DIR/checkpoints/step_NNNNNNNN/`:
- `model.safetensors`  the training module's state dict (safetensors)
- `optimizer.pt`       the optimizer state dict (tensors and numbers only: `torch.load(weights_only=True)`)
- `rng.safetensors`    every process's torch CPU (and CUDA) generator states (`rank{r}.torch_cpu`, ...)
- `trainer_state.json` step, images seen, time, skipped steps; and per process ("ranks") its data position
                       (epoch, batch in epoch) and Python/NumPy RNG
- `config.yaml`        the resolved recipe the run was started with
`RUN_DIR/checkpoints/last` is a text file naming the newest complete checkpoint. Each checkpoint is
written under a temporary name and renamed; `last` is replaced atomically after it, so a kill at any
moment leaves `last` pointing at a complete checkpoint.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, load_model, save_file, save_model

from medfound.io import atomic_dir, atomic_write_text, write_failure

LAST = "last"


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


def save_checkpoint(root: Path, module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                    ranks: list[dict[str, Any]], config_text: str, keep: int = 2,
                    protect: Optional[Path] = None) -> Path:
    """Write `root/step_NNNNNNNN` atomically, point `root/last` at it, prune to the `keep` newest written.

    `ranks`: per process {"epoch", "batch_in_epoch", "rng" (capture_rng scalars), "rng_tensors"}.
    `protect`: a checkpoint never pruned (the one this run resumed from).
    """
    root = Path(root)
    target = root / step_dir_name(state["step"])
    tensors = {f"rank{r}.{k}": v for r, d in enumerate(ranks) for k, v in d["rng_tensors"].items()}
    per_rank = [{"epoch": d["epoch"], "batch_in_epoch": d["batch_in_epoch"], "rng": d["rng"]} for d in ranks]
    try:
        with atomic_dir(target, overwrite=True) as tmp:
            save_model(module, str(tmp / "model.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            save_file(tensors, str(tmp / "rng.safetensors"))
            (tmp / "trainer_state.json").write_text(json.dumps({**state, "ranks": per_rank}, indent=1))
            (tmp / "config.yaml").write_text(config_text)
        atomic_write_text(root / LAST, target.name + "\n")
    except Exception as e:  # OSError, torch's RuntimeError, safetensors' SafetensorError
        reason = write_failure(e)
        if reason is None:
            raise
        previous = (root / LAST).read_text().strip() if (root / LAST).is_file() else None
        raise OSError(e.errno if isinstance(e, OSError) else 28,
                      f"writing checkpoint {target} failed: {reason}. Free space or point trainer.output_dir at a "
                      f"larger disk, then resume with trainer.resume=auto; "
                      + (f"{root / previous} (the last complete checkpoint) is intact" if previous else
                         "no earlier checkpoint exists")) from None
    prune(root, keep, keep_also=[target] + ([Path(protect)] if protect is not None else []))
    return target


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
    target = Path(root) / last.read_text().strip()
    if not (target / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{last} names {target.name}, which is missing or incomplete; "
                                f"point trainer.resume at another checkpoint in {root}")
    return target


def load_checkpoint(path: Path, module: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> dict[str, Any]:
    """Load weights (strict: any missing or unexpected key is an error) and optimizer; return trainer state."""
    path = Path(path)
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
    try:
        state = json.loads((path / "trainer_state.json").read_text())
        tensors = load_file(str(path / "rng.safetensors"))
    except Exception as e:
        raise ValueError(f"checkpoint {path} is damaged ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                         "resume from another checkpoint") from None
    state["_rng_tensors"] = [{k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"rank{r}.")}
                             for r in range(len(state["ranks"]))]
    for r, d in enumerate(state["ranks"]):
        d["rng_index"] = r
    return state
