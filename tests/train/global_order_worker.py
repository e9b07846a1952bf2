"""Run by tests/train/test_global_order.py under torch.distributed.run: fine-tune a tiny classifier with `fit` on a
real shard set read in global order (`data.global_order`), each rank appending the keys of every batch its module
receives, tagged with the epoch, to RUN_DIR/keys_w{WORLD}_rank{R}.jsonl. Stops at MAX_STEPS (with a checkpoint there);
with RESUME it continues from the run's last checkpoint, written by any number of processes.

    global_order_worker.py RUN_DIR SHARDS MAX_STEPS RESUME(0|1)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import timm
import torch
from accelerate import Accelerator

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from medfound.adapt.heads import attach_classifier  # noqa: E402
from medfound.adapt.tasks import ClassificationTask  # noqa: E402
from medfound.adapt.tuning import apply_tuning  # noqa: E402
from medfound.process import end_group  # noqa: E402
from medfound.config import OptimConfig, TrainerConfig  # noqa: E402
from medfound.data.pipeline import Decoding, TrainOrder, make_loader, shard_sets  # noqa: E402
from medfound.data.transforms import Normalize, build_transform  # noqa: E402
from medfound.train.checkpoint import latest_checkpoint  # noqa: E402
from medfound.train.loop import fit  # noqa: E402

ORDER = dict(seed=3, shuffle_buffer=100, global_order=True)


def global_loader(urls: list[str], epoch: int):
    """The test's global-order training stream of `urls` for `epoch` (the same in the test and in each worker)."""
    t = build_transform("none", 32, (0.5,) * 3, (0.5,) * 3, train=False, normalize=False)
    return make_loader(urls, Decoding(t, labelled=True, num_classes=2), batch_size=16,
                       order=TrainOrder(epoch=epoch, **ORDER), num_workers=2)


class Tagged:
    """The epoch's DataLoader, its batches tagged with the epoch (the loop's resume hooks pass through)."""

    def __init__(self, inner, epoch: int):
        self.inner, self.epoch = inner, epoch

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __iter__(self):
        for batch in self.inner:
            batch["epoch_tag"] = self.epoch
            yield batch


class Recording(ClassificationTask):
    def __init__(self, *args, log: Path, **kw):
        super().__init__(*args, **kw)
        self.log = log

    def forward(self, batch: dict) -> dict:
        with open(self.log, "a") as f:
            f.write(json.dumps([batch["epoch_tag"], list(batch["key"])]) + "\n")
        return super().forward(batch)


def main(run_dir: str, shards: str, max_steps: int, resume: int) -> None:
    acc = Accelerator(cpu=True)
    run = Path(run_dir)
    sets, manifests = shard_sets([shards], "train")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8, depth=2, embed_dim=64,
                              num_heads=2)
    head = attach_classifier(model, 2)
    task = Recording(apply_tuning(model, "full", head), head, manifests[0].label_schema,
                     log=run / f"keys_w{acc.num_processes}_rank{acc.process_index}.jsonl")
    trainer = TrainerConfig(output_dir=run, max_steps=max_steps, checkpoint_every=max_steps, log_every=1,
                            progress=False, loggers=[])
    fit(task, lambda epoch: Tagged(global_loader(sets[0], epoch), epoch), trainer=trainer,
        optim=OptimConfig(lr=1e-3, warmup_steps=1), lr=1e-3, run_dir=run, accelerator=acc, config_text="test\n",
        resume_from=latest_checkpoint(run / "checkpoints") if resume else None,
        normalize=Normalize((0.5,) * 3, (0.5,) * 3))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    end_group()
