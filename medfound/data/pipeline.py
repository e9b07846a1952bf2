"""Stream shard sets back as batches of dicts, split by node and by DataLoader worker.

Batches are dicts: `image` float `[B, 3, H, W]`, `label` long `[B]` (labelled sets), `key` list.
Order is a pure function of (seed, epoch, rank, worker): the shard list is shuffled with
`seed + epoch`, split across ranks then workers, and samples pass a shuffle buffer seeded per
(seed, epoch, rank, worker). The training loop therefore resumes exactly by rebuilding the epoch's
loader and skipping the batches it had already consumed.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from medfound.data.manifest import Manifest, read_manifest


def shard_urls(dirs: Sequence[str | Path], split: str) -> tuple[list[str], list[Manifest]]:
    """Paths of every `split` shard in the given shard sets, and their manifests."""
    urls, manifests = [], []
    for d in dirs:
        m = read_manifest(d)
        shards = m.split_shards(split)
        if not shards:
            raise ValueError(f"shard set {d} has no '{split}' split (it has {', '.join(m.splits)}); "
                             f"set data.train_split / data.eval_split / eval.split to one of those")
        urls += [str(Path(d) / s.path) for s in shards]
        manifests.append(m)
    return urls, manifests


def _decode(transform: Callable, labelled: bool) -> Callable[[dict], dict]:
    def decode(sample: dict) -> dict:
        key = sample.get("__key__")
        try:
            with Image.open(io.BytesIO(sample["png"])) as im:
                im.load()
                image = transform(im)
        except Exception as e:  # name the sample: the user needs to find it
            raise ValueError(f"cannot decode sample {key!r} in {sample.get('__url__')}: {e}") from e
        out = {"image": image, "key": key}
        if labelled:
            if "cls" not in sample:
                raise ValueError(f"sample {key!r} in {sample.get('__url__')} has no label (.cls); "
                                 "fine-tuning needs a labelled shard set")
            out["label"] = int(sample["cls"])
        if "json" in sample:
            meta = json.loads(sample["json"])
            if meta.get("site"):
                out["site"] = meta["site"]
        return out
    return decode


def _shard_order(urls: list[str], shuffle: bool, seed: int, epoch: int) -> Callable[[], Iterator[dict]]:
    def gen() -> Iterator[dict]:
        order = list(urls)
        if shuffle:
            random.Random(seed * 1_000_003 + epoch).shuffle(order)
        for u in order:
            yield {"url": u}
    return gen


def _seeded_shuffle(bufsize: int, seed: int, epoch: int) -> Callable[[Iterator[Any]], Iterator[Any]]:
    def stage(src: Iterator[Any]) -> Iterator[Any]:
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        rng = random.Random(hash((seed, epoch, rank, worker)))
        return wds.shuffle(bufsize, initial=bufsize, rng=rng)(src)
    return stage


def collate(samples: list[dict]) -> dict:
    batch: dict[str, Any] = {"image": torch.stack([s["image"] for s in samples]), "key": [s["key"] for s in samples]}
    if "label" in samples[0]:
        batch["label"] = torch.tensor([s["label"] for s in samples], dtype=torch.long)
    if any("site" in s for s in samples):
        batch["site"] = [s.get("site") for s in samples]
    return batch


def make_loader(urls: list[str], *, transform: Callable, batch_size: int, labelled: bool, train: bool,
                seed: int = 0, epoch: int = 0, shuffle_buffer: int = 1000, num_workers: int = 0,
                drop_last: Optional[bool] = None) -> DataLoader:
    """A DataLoader over `urls` for one epoch.

    train=True shuffles shards and samples (seeded) and drops the last partial batch; train=False
    reads every sample exactly once in shard order (per rank and worker).
    """
    stages: list = [
        _shard_order(urls, train, seed, epoch),
        wds.split_by_node,
        wds.split_by_worker,
        wds.tarfile_to_samples(),
    ]
    if train and shuffle_buffer > 1:
        stages.append(_seeded_shuffle(shuffle_buffer, seed, epoch))
    stages.append(wds.map(_decode(transform, labelled)))
    dataset = wds.DataPipeline(*stages)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate,
                      drop_last=train if drop_last is None else drop_last, generator=generator,
                      persistent_workers=False)
