"""RunContext: what every training run sets up before its first step, in one object (was a 4-tuple)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import medfound
from medfound.config import ConfigError, FinetuneRecipe, PretrainRecipe, derive, dump_recipe
from medfound.io import atomic_write_text, lock_dir
from medfound.process import stop_when_launcher_dies

# Loaded by torch-free commands (`medfound ls`, `validate`, `--help`): medfound modules that bring in torch or
# numpy are imported inside the functions that need them (tests/test_layering.py keeps it so).


@dataclass
class RunContext:
    """The accelerator, the run directory, the checkpoint to resume from and the resolved config text of one run."""

    recipe: PretrainRecipe | FinetuneRecipe
    accelerator: Any
    run_dir: Path
    resume: Optional[Path]
    config_text: str

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    def seed_per_rank(self) -> None:
        """After the model is built from the shared seed: give each process its own stream for masks, crops and
        dropout (otherwise every rank draws the same MAE masks and crop boxes for different images)."""
        from accelerate.utils import set_seed

        set_seed(self.recipe.trainer.seed + self.rank)

    def fit(self, module: Any, loader: Callable[[int], Any], normalize: Any, selection: Any = None):
        """The one training loop (medfound.train.loop.fit) with this run's settings -> its TrainState."""
        from medfound.train.loop import fit

        r = self.recipe
        return fit(module, loader, trainer=r.trainer, optim=r.optim, lr=r.derived.lr, run_dir=self.run_dir,
                   accelerator=self.accelerator, config_text=self.config_text, resume_from=self.resume,
                   normalize=normalize, selection=selection)

    def summary(self, state) -> dict[str, Any]:
        """What every training verb returns (and the CLI prints); stages add export and eval keys."""
        return {"run_dir": str(self.run_dir), "step": state.step, "preempted": state.preempted, "main": self.is_main}


def has_accelerator() -> bool:
    """True when a GPU-like device exists. Without one, accelerate must be told cpu=True, or processes started
    by torchrun / accelerate launch would each train alone instead of forming a gloo process group."""
    import torch
    from accelerate.utils import is_mps_available, is_npu_available, is_xpu_available

    return torch.cuda.is_available() or is_mps_available() or is_xpu_available() or is_npu_available()


# Keys whose change does not alter what a resumed run computes (logging, checkpoint cadence, evaluation after
# training, the card, the process count itself: global batch and lr are compared through `derived`).
HARMLESS = ("trainer.resume", "trainer.resume_changes", "trainer.log_every", "trainer.progress", "trainer.loggers",
            "trainer.wandb_mode", "trainer.wandb_project", "trainer.checkpoint_every", "trainer.keep_checkpoints",
            "trainer.visualize_every", "trainer.max_bad_steps", "data.eval_batch_size", "data.eval_split",
            "data.verify", "data.max_bad_fraction", "eval.", "card.", "derived.medfound_version",
            "derived.world_size")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def _same_location(a: Any, b: Any) -> bool:
    """Two spellings of the same local path (`runs/x` and `/home/me/runs/x`, `./runs/x/`), or lists of them."""
    import os

    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(x == y or _same_location(x, y) for x, y in zip(a, b))
    if not (isinstance(a, str) and isinstance(b, str) and a and b) or "://" in a + b or os.sep not in a + b:
        return False
    return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))


def resume_changes(old_text: str, new_text: str, recipe: Any = None) -> list[tuple[str, Any, Any, bool]]:
    """(key, checkpoint's value, new value, breaks exactness) for every key that differs. A key the checkpoint's
    recipe does not have (written by an earlier medfound) at its default in `recipe` is an upgrade, not a change:
    a new key's default keeps the earlier behaviour."""
    import yaml

    old, new = _flat(yaml.safe_load(old_text) or {}), _flat(yaml.safe_load(new_text) or {})
    missing = object()
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, missing), new.get(key, missing)
        if a is missing and recipe is not None and _is_default(recipe, key, b):
            continue
        if a != b and not _same_location(a, b):
            harmless = any(key == h or (h.endswith(".") and key.startswith(h)) for h in HARMLESS)
            out.append((key, None if a is missing else a, None if b is missing else b, not harmless))
    return out


def _is_default(recipe: Any, key: str, value: Any) -> bool:
    """Whether `value` is the default of the recipe field at dotted `key` (False where the key is not a field)."""
    node, *_, name = [recipe, *key.split(".")]
    for part in key.split(".")[:-1]:
        node = getattr(node, part, None)
        if node is None:
            return False
    field = getattr(type(node), "model_fields", {}).get(name)
    if field is None or field.is_required():
        return False
    default = field.get_default(call_default_factory=True)
    default = default.model_dump(mode="json") if hasattr(default, "model_dump") else default
    return default == value or (isinstance(default, tuple) and list(default) == value)


def check_resume_changes(checkpoint: Path, new_text: str, policy: str, main: bool, recipe: Any = None) -> None:
    """Print what changed since the checkpoint's recipe (its config.yaml) and refuse changes that break exact
    continuation unless `policy` is "allow"."""
    path = Path(checkpoint) / "config.yaml"
    if not path.is_file():
        return
    changes = resume_changes(path.read_text(), new_text, recipe)
    if not changes:
        return
    lines = [f"  {k}: {a!r} -> {b!r}" + ("" if not breaking else "  (changes what the run computes)")
             for k, a, b, breaking in changes]
    breaking = [k for k, _, _, b in changes if b]
    if main:
        print(f"resuming {checkpoint} with a recipe that differs from the checkpoint's:\n" + "\n".join(lines),
              flush=True)
    if breaking and policy != "allow":
        raise ConfigError(f"resuming {checkpoint} with changed {', '.join(breaking)}: the resumed run would not "
                          "equal an uninterrupted one (e.g. another max_steps reshapes the learning-rate schedule). "
                          "Undo the change, start a new trainer.output_dir, or set trainer.resume_changes=allow")


def start_run(recipe: PretrainRecipe | FinetuneRecipe, command: str) -> RunContext:
    """Accelerator, seeds, derived values (world size, global batch, lr), the run lock and RUN_DIR/config.yaml."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from medfound.train.loop import resolve_resume

    t = recipe.trainer
    accelerator = Accelerator(mixed_precision="bf16" if t.precision == "bf16" else "no", cpu=not has_accelerator())
    if accelerator.distributed_type.value in ("FSDP", "DEEPSPEED"):  # an accelerate config with its own plugin
        raise ValueError(f"the accelerate config asks for {accelerator.distributed_type.value}; medfound shards with "
                         "trainer.strategy (fsdp, zero1, zero2, zero3) in the recipe instead: launch with "
                         "launch/accelerate/fsdp.yaml (or multi_gpu.yaml) and set trainer.strategy")
    set_seed(t.seed)

    stop_when_launcher_dies()  # under torchrun: the launcher's death checkpoints and stops this process
    recipe.derived = derive(recipe, accelerator.num_processes, medfound.__version__)
    run_dir = Path(t.output_dir)
    if accelerator.is_main_process:
        lock_dir(run_dir)  # one writer per run directory; held until this process exits
    resume = resolve_resume(t, run_dir)
    text = dump_recipe(recipe, header=f"resolved by medfound {medfound.__version__} on "
                                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\ncommand: {command}")
    if resume is not None:  # before config.yaml is rewritten: a refused resume leaves the run as it was
        check_resume_changes(resume, text, t.resume_changes, accelerator.is_main_process, recipe)
    if accelerator.is_main_process:
        atomic_write_text(run_dir / "config.yaml", text)
    return RunContext(recipe, accelerator, run_dir, resume, text)
