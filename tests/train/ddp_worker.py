"""Run by tests/train/test_distributed.py and test_sharded.py under torch.distributed.run: train a tiny classifier
for a few steps on real fundus images under a `trainer.strategy` and save the final weights. Each process takes
its slice of every global batch, so N processes with per-process batch B see exactly what one process with batch
N * B sees. With `nan_at` = g, one image of global batch g is NaN: every rank must skip that step.

    ddp_worker.py OUT GLOBAL_BATCH STEPS ACCUM [STRATEGY [NAN_AT]]"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import timm
import torch
from accelerate import Accelerator
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from medfound.adapt.heads import attach_classifier  # noqa: E402
from medfound.adapt.tasks import ClassificationTask  # noqa: E402
from medfound.adapt.tuning import apply_tuning  # noqa: E402
from medfound.process import end_group  # noqa: E402
from medfound.config import OptimConfig, TrainerConfig  # noqa: E402
from medfound.data.manifest import LabelSchema  # noqa: E402
from medfound.train.loop import fit  # noqa: E402


def main(out: str, global_batch: int, steps: int, accum: int, strategy: str = "ddp", nan_at: int = -1) -> None:
    acc = Accelerator(cpu=True)
    world, rank = acc.num_processes, acc.process_index
    z = np.load(ROOT / "data" / "medmnist" / "retinamnist_demo.npz")
    images = torch.from_numpy(z["train_images"][: global_batch * steps]).permute(0, 3, 1, 2).float() / 255.0
    images = torch.nn.functional.interpolate(images, size=32, mode="bilinear", align_corners=False)
    if nan_at >= 0:
        images[nan_at * global_batch + global_batch - 1] = float("nan")
    labels = torch.from_numpy(z["train_labels"][: global_batch * steps, 0].astype(np.int64))
    per_rank = global_batch // world // accum

    def loader(epoch: int):
        for g in range(steps):  # global batch g, cut into accum micro-batches per rank
            for a in range(accum):
                start = g * global_batch + a * world * per_rank + rank * per_rank
                idx = slice(start, start + per_rank)
                yield {"image": (images[idx] - 0.5) / 0.5, "label": labels[idx], "key": [str(i) for i in range(per_rank)]}

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8, depth=2, embed_dim=64,
                              num_heads=2)
    head = attach_classifier(model, 5)
    task = ClassificationTask(apply_tuning(model, "full", head), head, LabelSchema(type="ordinal", names=list("01234")))
    trainer = TrainerConfig(output_dir=Path(out).parent / f"run{world}", max_steps=steps, checkpoint_every=1000,
                            log_every=1, progress=False, loggers=[], grad_accum_steps=accum, strategy=strategy)
    state = fit(task, loader, trainer=trainer, optim=OptimConfig(lr=2e-3, weight_decay=0.05, warmup_steps=1), lr=2e-3,
        run_dir=trainer.output_dir, accelerator=acc, config_text="test\n")
    if acc.is_main_process:
        print(f"skipped_steps={state.skipped_steps}", flush=True)
        save_file({k: v.contiguous() for k, v in state.module.state_dict().items()}, out)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), *sys.argv[5:6],
         *(int(a) for a in sys.argv[6:7]))
    end_group()
