"""Run by tests/train/test_sharded.py under torch.distributed.run (or in the test's own process): load a
pretraining run's checkpoint under a strategy on this many processes and write it back out as a checkpoint under
the same strategy. The test compares both checkpoints tensor by tensor: resharding N -> M (and one format ->
another) must keep weights and optimizer exact.

    sharded_worker.py RUN_DIR STRATEGY CHECKPOINT OUT_ROOT [STRATEGY CHECKPOINT OUT_ROOT ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

from accelerate import Accelerator

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from medfound.process import end_group  # noqa: E402
from medfound.run import load_run_recipe  # noqa: E402
from medfound.train.checkpoint import capture_rng, save_checkpoint  # noqa: E402
from medfound.train.loop import Coordinator, build_strategy  # noqa: E402
from medfound.train.optim import build_optimizer  # noqa: E402
from medfound.workflows import build_objective  # noqa: E402


def reshard(acc: Accelerator, run_dir: str, strategy: str, checkpoint: str, out_root: str) -> Path:
    recipe = load_run_recipe(Path(run_dir))
    trainer = recipe.trainer.model_copy(update={"strategy": strategy})
    module = build_objective(recipe)
    lr = recipe.derived.lr
    chosen = build_strategy(acc, trainer)
    _, optimizer, inner, saved = chosen.setup(module, lambda m: build_optimizer(m, recipe.optim, lr), Path(checkpoint))
    scalars, tensors = capture_rng()
    ranks = [{"epoch": 0, "batch_in_epoch": 0, "rng": scalars, "rng_tensors": {k: v.clone() for k, v in tensors.items()}}
             for _ in range(acc.num_processes)]
    state = {"step": saved["step"], "images_seen": saved["images_seen"], "train_seconds": 0.0, "skipped_steps": 0,
             "strategy": strategy}
    path = save_checkpoint(Path(out_root), inner, optimizer, state, ranks, "resharded\n",
                           write_weights=chosen.write_weights, fmt=chosen.checkpoint_format,
                           coordinator=Coordinator(acc))
    return path


if __name__ == "__main__":
    accelerator = Accelerator(cpu=True)
    run, *jobs = sys.argv[1:]
    for i in range(0, len(jobs), 3):
        written = reshard(accelerator, run, *jobs[i:i + 3])
        if accelerator.is_main_process:
            print(f"wrote {written}", flush=True)
    end_group()
