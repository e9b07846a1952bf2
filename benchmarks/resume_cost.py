"""What an exact mid-epoch resume costs: reaching batch k by skipping (medfound) versus by decoding k batches.

The bundled archive (RetinaMNIST, PneumoniaMNIST, the CC0 H&E slide as 224-px tiles) is sharded once and read
as the pretraining recipes read it: a resampled, weighted mix of the three sets through a shuffle buffer, MAE
augmentation at 224 px, `--batch-size` images a batch, `--workers` DataLoader workers. Two ways to stand at
batch k of the epoch, each timed from building the loader to holding batch k+1 (the first new one):

- replay:  iterate the first k batches (decode + augment every sample): what a resume did before, and what a
           plain WebDataset loop does;
- skip:    `ResumableLoader.resume_at(position)` with the position the training loop saves in its checkpoint:
           the workers read and drop the tar members of the consumed samples, decode nothing, and stand in
           placeholder batches so the worker order is unchanged.

Batch k+1 must be identical both ways (checked: keys and tensors). Repeats alternate replay/skip.

    python benchmarks/resume_cost.py [--k 200] [--batch-size 16] [--workers 2] [--repeats 3]

Prints seconds for each, `ratio=` (skip / replay; the issue's target is <= 0.1) and writes
benchmarks/results/resume_cost.json. Measurements of this machine, not assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def prepare(work: Path) -> list[list[str]]:
    from medfound.data.pipeline import shard_sets
    from medfound.workflows import shard

    data = ROOT / "data"
    shard("npz", data / "medmnist" / "retinamnist_demo.npz", work / "retina", modality="fundus", max_count=256)
    shard("npz", data / "medmnist" / "pneumoniamnist_demo.npz", work / "pneumonia", modality="cxr", max_count=256)
    shard("wsi", data / "wsi" / "CMU-1-Small-Region.svs", work / "he", modality="pathology", mpp=0.5, tile_size=224,
          min_tissue=0.0, keep_names=True, max_count=64)
    sets, _ = shard_sets([work / "retina", work / "pneumonia", work / "he"], "train")
    return sets


def loader(sets, args):
    from medfound.data.pipeline import Decoding, TrainOrder, make_loader
    from medfound.data.transforms import build_transform

    t = build_transform("mae", 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), train=True)
    return make_loader(sets, Decoding(t), batch_size=args.batch_size, order=TrainOrder(seed=1, epoch=0,
                                                                                       shuffle_buffer=500,
                                                                                       resampled=True,
                                                                                       weights=[0.4, 0.3, 0.3],
                                                                                       samples_per_epoch=args.batch_size * (args.k + 50)),
                       num_workers=args.workers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "resume_cost.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        sets = prepare(Path(tmp))
        # the position the loop would have saved after batch k: the last `_pos` seen per worker
        position, reference = {}, None
        for i, b in enumerate(loader(sets, args)):
            if i < args.k:
                position[str(b["_pos"][0])] = list(b["_pos"][1:])
            else:
                reference = b
                break
        times = {"replay": [], "skip": []}
        for _ in range(args.repeats):
            for how in ("replay", "skip"):
                start = time.perf_counter()
                dl = loader(sets, args)
                if how == "skip":
                    dl.resume_at(position)
                it = iter(dl)
                for _ in range(args.k):
                    next(it)
                nxt = next(it)
                times[how].append(time.perf_counter() - start)
                assert nxt["key"] == reference["key"] and torch.equal(nxt["image"], reference["image"]), how
                del it, dl
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["skip"] / med["replay"]
    result = {"k": args.k, "batch_size": args.batch_size, "workers": args.workers, "repeats": args.repeats,
              "images_skipped": args.k * args.batch_size, "seconds": med, "all_seconds": times,
              "ratio_skip_over_replay": round(ratio, 4), "cpu": platform.processor() or platform.machine(),
              "cores": os.cpu_count(), "torch": torch.__version__,
              "command": "python benchmarks/resume_cost.py " + " ".join(sys.argv[1:])}
    print(f"reach batch {args.k} ({args.k * args.batch_size} images, {args.workers} workers): "
          f"replay {med['replay']:.2f} s, skip {med['skip']:.2f} s; ratio={ratio:.3f} (skip/replay)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
