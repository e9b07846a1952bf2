"""Stream shard sets back as batches of dicts, split by node and by DataLoader worker.

Batches are dicts: `image` `[B, 3, H, W]` as the transform left it (uint8, or float in [0, 1]: normalise
on the device with `DataConfig.normalizer()`); `crops` (multi-crop: a list of `[B, 3, h, w]`);
`label` long `[B]` (single-label) or float multi-hot `[B, K]` (multi-label); `mask` long `[B, 1, *S]` and
`roi` bool `[B, 1, *S]` (segmentation); `key` list; `site` list
when samples carry one; `_bad` list of "key (shard): reason" for samples skipped since the last batch.

Two ways to read:
- finite (evaluation, fine-tuning): every sample of the listed shards once per epoch, shards split
  across ranks then workers (`webdataset.split_by_node` / `split_by_worker`), so across ranks x
  workers each sample is read exactly once; training shuffles shard order and samples (seeded).
- resampled (pretraining, `resampled=True`): every (rank, worker) draws shards at random with
  replacement from each shard set and mixes the sets with `weights` (e.g. 40% fundus, 30% chest X-ray,
  30% pathology), for `samples_per_epoch` samples in all (a virtual epoch), through a shuffle buffer.
Order is a pure function of (seed, epoch, rank, worker), so the loop resumes exactly by rebuilding the
epoch's loader and skipping the batches already consumed. Skipping does not decode them: every training batch
carries `_pos` (worker, raw sample index, output index within that sample, outputs so far), the loop keeps the
last one per worker in its checkpoint, and `ResumableLoader.resume_at` makes each worker read and drop the raw tar
samples before that position (no image decode, no transform) and stand in cheap placeholder batches for the
consumed ones, so the DataLoader's worker round-robin, and with it the batch order, is unchanged.

Undecodable samples are skipped, logged with their key and shard, and counted; when more than
`max_bad_fraction` of the samples seen fail (judged once 10 have failed, or at the end of the stream)
the worker stops with an error naming the shard with the most failures.
"""

from __future__ import annotations

import io
import json
import logging
import math
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from medfound.data import location
from medfound.data.manifest import Manifest, read_manifest
from medfound.data.tario import Verify, shard_stage, tar_samples
from medfound.io import drop_inherited_locks

log = logging.getLogger("medfound.data")
MIN_BAD_TO_JUDGE = 10


def shard_urls(dirs: Sequence[str | Path], split: str) -> tuple[list[str], list[Manifest]]:
    """Paths of every `split` shard in the given shard sets, and their manifests."""
    sets, manifests = shard_sets(dirs, split)
    return [u for s in sets for u in s], manifests


def shard_sets(dirs: Sequence[str | Path], split: str) -> tuple[list[list[str]], list[Manifest]]:
    """Per shard set (a local folder or a remote location), the paths or URLs of its `split` shards; and the
    manifests."""
    sets, manifests = [], []
    for d in dirs:
        m = read_manifest(d)
        shards = m.split_shards(split)
        if not shards:
            raise ValueError(f"shard set {d} has no '{split}' split (it has {', '.join(m.splits)}); "
                             f"set data.train_split / data.eval_split / eval.split to one of those")
        sets.append([location.join(d, s.path) for s in shards])
        manifests.append(m)
    return sets, manifests


def decode_member(name: str, data: bytes) -> Any:
    if name.endswith("npy"):
        return np.load(io.BytesIO(data), allow_pickle=False)
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im


def _check_finite(sample: dict) -> None:
    """A few NaN voxels would turn a whole batch's loss NaN: such a sample is refused (skipped and counted)."""
    for name in ("image", "crops"):
        value = sample.get(name)
        for t in (value if isinstance(value, list) else [value]):
            if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all():
                raise ValueError(f"non-finite values (NaN/Inf) in the {name} after the transform: "
                                 f"{int((~torch.isfinite(t)).sum())} of {t.numel()}")


def _seed(*parts: int) -> int:
    return hash(tuple(parts)) & 0x7FFFFFFF



class MissingMember(ValueError):
    """A sample lacks a member the run needs (a mask, a field of view): raised at once, never counted as an
    undecodable sample, since it means the shard set was made without it."""

class _LazyMasks(dict):
    """name -> mask array, decoded on first access: a transform that ignores masks pays nothing for them."""

    def __getitem__(self, name: str) -> np.ndarray:
        value = super().__getitem__(name)
        if isinstance(value, tuple):
            value = np.asarray(decode_member(*value))
            super().__setitem__(name, value)
        return value

    def get(self, name: str, default: Any = None) -> Any:
        return self[name] if name in self else default

    def values(self):  # pragma: no cover - not used by the transforms; decode all if someone iterates
        return [self[k] for k in self]

    def items(self):  # pragma: no cover
        return [(k, self[k]) for k in self]


SKIPPED = {"_skipped": True}  # stands in, in a resumed epoch, for an output consumed before the checkpoint


class _SampleRNG:
    """Python's, NumPy's and torch's CPU generators seeded for one sample, and given back as they were after it.

    A training sample's augmentation is then a function of (seed, epoch, rank, worker, its index in the stream)
    alone: it does not depend on what was decoded before it, so a resumed stream that skips the consumed samples
    without decoding them augments the rest exactly as the uninterrupted one; and with `num_workers=0` the data's
    draws no longer move the model's random stream (dropout, masking)."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self) -> None:
        self.saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        random.seed(self.seed)
        np.random.seed(self.seed)
        # the CPU generator only (the one transforms draw from, and the one saved above): torch.manual_seed also
        # queues a lazy CUDA seeding, which formats the Python stack on every call while CUDA is not initialised
        # (every worker on a CPU-only machine), about half of a 32-px MAE sample's loading time (the same batches,
        # bit for bit, at 1.9x the samples/s; DINO's six views 1.25x)
        torch.default_generator.manual_seed(self.seed)

    def __exit__(self, *exc: Any) -> None:
        py, npy, pt = self.saved
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(pt)


class _Decoder:
    """Decode + transform inside the worker; skip, log and count what fails. With `track` (training), each sample is
    augmented under its own seed (`_SampleRNG`) and each output carries `_pos` = (worker, raw index, output index
    within the sample, outputs so far); `resume` (worker -> the last `_pos[1:]` consumed) makes the stream start
    right after it without decoding what came before."""

    def __init__(self, transform: Callable, labelled: bool, num_classes: int, multilabel: bool,
                 max_bad_fraction: float, keep_meta: Sequence[str] = (), track: bool = False, seed: int = 0,
                 epoch: int = 0):
        self.transform, self.labelled, self.num_classes = transform, labelled, num_classes
        self.multilabel, self.max_bad_fraction, self.keep_meta = multilabel, max_bad_fraction, tuple(keep_meta)
        self.track, self.resume, self.seed, self.epoch = track, {}, seed, epoch

    def decode(self, sample: dict) -> dict:
        key = sample.get("__key__")
        image_member = "png" if "png" in sample else "npy" if "npy" in sample else None
        if image_member is None:
            raise ValueError("no image (.png or .npy) in the sample")
        masks = _LazyMasks({k.rsplit(".", 1)[0]: (k, v) for k, v in sample.items()
                            if k.endswith((".png", ".npy")) and "." in k})
        meta = json.loads(sample["json"]) if "json" in sample else {}
        out = self.transform({"image": decode_member(image_member, sample[image_member]), "meta": meta,
                              "masks": masks, "key": key})
        for o in (out if isinstance(out, list) else [out]):
            _check_finite(o)
        if isinstance(out, list):  # several training crops from one decoded image (segmentation)
            return [dict(o, key=key, **({"site": meta["site"]} if meta.get("site") else {})) for o in out]
        out = dict(out, key=key)
        if meta.get("site"):
            out["site"] = meta["site"]
        if self.keep_meta:
            missing = [f for f in self.keep_meta if meta.get(f) in (None, "")]
            if missing:
                raise ValueError(f"no {missing} in the sample's meta (it has {sorted(meta)}); the shards need them "
                                 "(DICOM: ImageLaterality/ViewPosition; images table: patient_id, laterality, view)")
            out["meta"] = {f: meta[f] for f in self.keep_meta}
        if self.labelled:
            if self.multilabel:
                if "labels.json" not in sample:
                    raise ValueError("no multi-label labels (.labels.json)")
                hot = torch.zeros(self.num_classes)
                hot[[self._in_range(int(i)) for i in json.loads(sample["labels.json"])]] = 1.0
                out["label"] = hot
            else:
                if "cls" not in sample:
                    raise ValueError("no label (.cls); fine-tuning needs a labelled shard set")
                out["label"] = self._in_range(int(sample["cls"]))
        return out

    def _in_range(self, label: int) -> int:
        if self.num_classes and not 0 <= label < self.num_classes:
            raise ValueError(f"label {label} outside the manifest's classes 0..{self.num_classes - 1} (a corrupt or "
                             "edited shard)")
        return label

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        total, bad, by_url, pending = 0, 0, Counter(), []
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        base = _seed(self.seed, self.epoch, rank, worker, 11)
        start_raw, start_sub, outputs = self.resume.get(worker, (-1, -1, 0))
        for _ in range(outputs):
            yield SKIPPED
        for raw, sample in enumerate(src):
            if raw < start_raw:  # consumed before the checkpoint: the tar members were read, nothing is decoded
                continue
            total += 1
            try:
                if self.track:
                    gpos = sample.get("__gpos__")  # global order: seeded by the epoch position, not the process
                    with _SampleRNG(_seed(base, raw) if gpos is None else _seed(self.seed, self.epoch, 13, gpos)):
                        out = self.decode(sample)
                else:
                    out = self.decode(sample)
            except MissingMember:  # a layout error of the set (a mask it was never given), not a damaged sample
                raise
            except Exception as e:  # one bad sample must not stop a run; too many must
                bad += 1
                url = sample.get("__url__")
                by_url[url] += 1
                report = f"{sample.get('__key__')} ({url}): {type(e).__name__}: {e}"
                log.warning("skipped undecodable sample %s", report)
                pending.append(report)
                self._judge(total, bad, by_url, end=False)
                continue
            outs = out if isinstance(out, list) else [out]
            if raw == start_raw:  # the sample the checkpoint stopped inside (several crops per image): its last
                outs = outs[start_sub + 1:]  # crops, augmented as before thanks to the per-sample seed
                if not outs:
                    continue
            if pending:
                outs[0]["_bad"], pending = pending, []
            if self.track:
                first = 0 if raw != start_raw else start_sub + 1
                for j, o in enumerate(outs):
                    outputs += 1
                    o["_pos"] = (worker, raw, first + j, outputs)
                    if "__gpos__" in sample:
                        o["_gpos"] = sample["__gpos__"]
            yield from outs
        self._judge(total, bad, by_url, end=True)

    def _judge(self, total: int, bad: int, by_url: Counter, end: bool) -> None:
        if bad <= self.max_bad_fraction * total:
            return
        if not end and bad < MIN_BAD_TO_JUDGE and self.max_bad_fraction > 0:
            return
        url, n = by_url.most_common(1)[0]
        raise ValueError(f"{bad} of {total} samples could not be decoded (more than data.max_bad_fraction="
                         f"{self.max_bad_fraction}); most ({n}) from shard {url}. Check it with `medfound inspect "
                         f"{location.split(str(url))[0]}` and re-create it, or raise data.max_bad_fraction")


def _shard_order(urls: list[str], shuffle: bool, seed: int, epoch: int) -> Callable[[], Iterator[dict]]:
    def gen() -> Iterator[dict]:
        order = list(urls)
        if shuffle:
            random.Random(_seed(seed, epoch)).shuffle(order)
        for u in order:
            yield {"url": u}
    return gen


def _seeded_shuffle(bufsize: int, seed: int, epoch: int) -> Callable[[Iterator[Any]], Iterator[Any]]:
    def stage(src: Iterator[Any]) -> Iterator[Any]:
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        return wds.shuffle(bufsize, initial=bufsize, rng=random.Random(_seed(seed, epoch, rank, worker)))(src)
    return stage


def _endless(urls: list[str], rng: random.Random) -> Iterator[dict]:
    """Shards of one set drawn with replacement, forever."""
    while True:
        yield {"url": rng.choice(urls)}


def mixed_samples(sets: list[list[str]], weights: Sequence[float], samples: int, seed: int, epoch: int,
                  verify: Verify = "size") -> Callable[[], Iterator[dict]]:
    """Resampled, weighted mixing of shard sets for this (rank, worker): `samples` raw samples in all
    across ranks x workers; each set is an endless stream of shards drawn with replacement."""
    if len(weights) != len(sets):
        raise ValueError(f"{len(weights)} mixing weights for {len(sets)} shard sets")
    if min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"mixing weights must be non-negative with a positive sum, got {list(weights)}")

    def gen() -> Iterator[dict]:
        rank, world, worker, workers = wds.utils.pytorch_worker_info()
        base = _seed(seed, epoch, rank, worker)
        streams = [iter(tar_samples(_endless(urls, random.Random(_seed(base, k))), verify))
                   for k, urls in enumerate(sets)]
        pick = random.Random(base)
        for _ in range(math.ceil(samples / (world * workers))):
            k = pick.choices(range(len(sets)), weights=weights)[0]
            yield next(streams[k])
    return gen


def balanced_keep(counts: Sequence[int]) -> list[float]:
    """Per class, the probability of keeping a sample so that every class arrives equally often: n_rarest / n_c
    (rejection sampling on the stream; `counts` = training samples per class, `Manifest.class_counts`)."""
    n = [int(v) for v in counts]
    present = [v for v in n if v > 0]
    if len(present) < 2:
        raise ValueError(f"balanced sampling needs at least two classes in the training split, got counts {counts}")
    return [min(present) / v if v else 0.0 for v in n]


def site_balanced_keep(site_counts: dict[str, int]) -> dict[str, float]:
    """Per site, the probability of keeping a sample so that every site arrives equally often: n_smallest / n_site
    (`site_counts`: samples per site, e.g. the manifests' `counts.by_site`)."""
    present = {k: int(v) for k, v in site_counts.items() if v}
    if len(present) < 2:
        raise ValueError(f"site-balanced sampling needs samples from at least two sites, got {site_counts or 'none'} "
                         "(samples carry a site when sharded with --site or a table's site column)")
    low = min(present.values())
    return {k: low / v for k, v in present.items()}


def _balanced(keep: Optional[Sequence[float]], seed: int, epoch: int, site_keep: Optional[dict[str, float]] = None,
              global_rng: bool = False) -> Callable[[Iterator[dict]], Iterator[dict]]:
    """Drop raw samples of frequent classes and/or sites (before decoding, so dropped samples cost nothing; the
    site is read from the sample's JSON meta; samples without a class or site are kept)."""
    def stage(src: Iterator[dict]) -> Iterator[dict]:
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        rng = random.Random(_seed(seed, epoch, 7) if global_rng else _seed(seed, epoch, rank, worker, 7))
        for sample in src:
            p = 1.0
            if keep is not None and "cls" in sample:
                c = int(sample["cls"])
                p = keep[c] if c < len(keep) else 1.0
            if site_keep is not None and "json" in sample:
                p *= site_keep.get(json.loads(sample["json"]).get("site"), 1.0)
            if p >= 1.0 or rng.random() < p:
                yield sample
    return stage


def _stack(images: list[torch.Tensor]) -> torch.Tensor:
    """Stack uint8 as uint8; if a batch mixes uint8 and float [0, 1] images (a mix of 8-bit and windowed
    sources), bring all to float [0, 1]."""
    if len({t.dtype for t in images}) > 1:
        images = [t.float() / 255.0 if t.dtype == torch.uint8 else t for t in images]
    return torch.stack(images)


def collate(samples: list[dict]) -> dict:
    batch: dict[str, Any] = {"image": _stack([s["image"] for s in samples]), "key": [s["key"] for s in samples]}
    for name in ("mask", "roi", "spacing", "box", "native_mask", "native_roi", "native_size"):  # segmentation
        # targets (native: the image's own grid, when segment.fov_diameter / scale resampled it; native_size: that
        # grid's size, for predictions on new images), prompts, transformed with the image
        if name in samples[0]:
            batch[name] = torch.stack([s[name] for s in samples])
    if "crops" in samples[0]:
        batch["crops"] = [_stack([s["crops"][i] for s in samples]) for i in range(len(samples[0]["crops"]))]
    if "label" in samples[0]:
        first = samples[0]["label"]
        batch["label"] = torch.stack([s["label"] for s in samples]) if torch.is_tensor(first) else \
            torch.tensor([s["label"] for s in samples], dtype=torch.long)
    if any("site" in s for s in samples):
        batch["site"] = [s.get("site") for s in samples]
    if "meta" in samples[0]:
        batch["meta"] = [s["meta"] for s in samples]
    bad = [r for s in samples for r in s.get("_bad", [])]
    if bad:
        batch["_bad"] = bad
    return batch


class _Tracked:
    """A collate function that turns placeholder outputs into `{"_skipped": n}` batches and hands the last sample's
    `_pos` on as the batch's."""

    def __init__(self, collate_fn: Callable[[list[dict]], dict]):
        self.collate_fn = collate_fn

    def __call__(self, samples: list[dict]) -> dict:
        skipped = sum(s is SKIPPED or s.get("_skipped") is True for s in samples)
        if skipped:
            if skipped != len(samples):
                raise RuntimeError("a resumed batch mixes skipped and new samples: the saved data position does "
                                   "not fit this loader (another data.batch_size?); resume with the same data settings")
            return {"_skipped": skipped}
        pos = samples[-1]["_pos"]
        batch = self.collate_fn([{k: v for k, v in s.items() if k not in ("_pos", "_gpos")} for s in samples])
        batch["_pos"] = pos
        if "_gpos" in samples[-1]:
            batch["_gpos"] = samples[-1]["_gpos"] + 1  # the global position after this batch
        return batch


class ResumableLoader(DataLoader):
    """A training DataLoader whose batches carry `_pos`, and which can start an epoch after a saved position without
    decoding what came before it (`resume_at`)."""

    def resume_at(self, positions: dict) -> None:
        """`positions`: worker -> (raw index, output index, outputs so far) of the last sample consumed, as the
        batches' `_pos[1:]`; call before iterating. The first batches are then `{"_skipped": n}` placeholders, one
        per batch consumed before, in the same worker order."""
        decoder = self.dataset.pipeline[-1]
        decoder.resume = {int(w): tuple(int(x) for x in p) for w, p in positions.items()}

    def resume_global(self, position: int) -> None:
        """Global order (`global_order=True`): start this epoch at global sample position `position` (every sample
        before it was consumed by some process of the run that saved it, on any number of processes)."""
        for stage in self.dataset.pipeline:
            if isinstance(stage, _GlobalTake):
                stage.start = int(position)
                return
        raise ValueError("resume_global needs a loader made with global_order=True")


def _global_shuffle(bufsize: int, seed: int, epoch: int) -> Callable[[Iterator[Any]], Iterator[Any]]:
    """A shuffle buffer seeded by (seed, epoch) only: the same global order in every process."""
    def stage(src: Iterator[Any]) -> Iterator[Any]:
        return wds.shuffle(bufsize, initial=bufsize, rng=random.Random(_seed(seed, epoch, 17)))(src)
    return stage


class _GlobalTake:
    """Global order: every process reads the whole epoch's stream (tar members only), numbers its samples from 0,
    and keeps, from `start` on, the batches it owns: global batch g (of `batch_size` samples) goes to rank
    g % world, and that rank's h-th batch to DataLoader worker h % workers (the DataLoader's own round-robin). A
    run resumed at position P on any number of processes therefore reads every sample from P on exactly once."""

    def __init__(self, batch_size: int, start: int = 0):
        self.batch_size, self.start = batch_size, start

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        rank, world, worker, workers = wds.utils.pytorch_worker_info()
        for p, sample in enumerate(src):
            if p < self.start:
                continue
            g = (p - self.start) // self.batch_size
            if g % world == rank and (g // world) % workers == worker:
                yield dict(sample, __gpos__=p)


class _InKeys:
    """A picklable sample filter (DataLoader workers): the sample's key is one of `keys`."""

    def __init__(self, keys: frozenset[str]):
        self.keys = keys

    def __call__(self, sample: dict) -> bool:
        return sample["__key__"] in self.keys


@dataclass(frozen=True)
class Decoding:
    """How each raw sample becomes a dict of tensors. `transform`: the sample dict (decoded image, mask...) -> the
    model's input; `labelled`: attach `label` (a shard set without labels is an error); `num_classes` /
    `multilabel`: how the label is read (class index or multi-hot); `max_bad_fraction`: the undecodable share a
    stream tolerates before it stops naming the worst shard; `keep_meta`: JSON meta fields every sample must have,
    passed on as `batch["meta"]` (a list of dicts)."""

    transform: Callable
    labelled: bool = False
    num_classes: int = 0
    multilabel: bool = False
    max_bad_fraction: float = 0.01
    keep_meta: Sequence[str] = ()


@dataclass(frozen=True)
class TrainOrder:
    """How a training stream orders, mixes and balances its samples; a loader without one is an evaluation stream
    (every sample exactly once, in shard order, per rank and worker). Shards and samples are shuffled (seeded by
    `seed` and `epoch`, `shuffle_buffer` samples deep). `resampled`: mix the shard sets by `weights` (default:
    proportional to their shard counts) for `samples_per_epoch`. `class_keep`: per class, the probability of keeping
    a sample (`balanced_keep`); `site_keep` the same per site (`site_balanced_keep`). `global_order` (finite
    streams): one sample order per (seed, epoch), the same on any number of processes (`_GlobalTake`); every process
    reads every shard's bytes and decodes only its own samples, so a run resumed on another number of processes
    (`ResumableLoader.resume_global`) neither repeats nor skips a sample."""

    seed: int = 0
    epoch: int = 0
    shuffle_buffer: int = 1000
    resampled: bool = False
    weights: Optional[Sequence[float]] = None
    samples_per_epoch: Optional[int] = None
    class_keep: Optional[Sequence[float]] = None
    site_keep: Optional[dict[str, float]] = None
    global_order: bool = False


@dataclass(frozen=True)
class Reading:
    """Which shard bytes a stream reads and trusts. `verify`: each shard's size and sample count against its manifest
    (`size`), or also its sha256 (`sha256`); see `medfound.data.tario`. `split_by_node=False` (finite streams): every
    rank reads every shard (a caller that splits the samples itself, e.g. by slide). `keys`: only these samples (a
    labelled training subset, medfound.data.fractions), kept right after the shards are read, before shuffling,
    balancing and decoding. `sample_filter`: raw sample (tar members as bytes) -> keep?, applied before decoding."""

    verify: Verify = "size"
    split_by_node: bool = True
    keys: Optional[frozenset[str]] = None
    sample_filter: Optional[Callable[[dict], bool]] = None


def make_loader(urls: list[str] | list[list[str]], decoding: Decoding, *, batch_size: int,
                order: Optional[TrainOrder] = None, reading: Reading = Reading(), num_workers: int = 0,
                drop_last: Optional[bool] = None, collate_fn: Callable[[list[dict]], dict] = collate) -> DataLoader:
    """A DataLoader over shard `urls` (a flat list, or one list per shard set) for one epoch, each sample made by
    `decoding`. With `order` (a `TrainOrder`) it is a training stream: shuffled, mixed and balanced as that says,
    the last partial batch dropped, resumable (`ResumableLoader`); without, an evaluation stream that reads every
    sample exactly once in shard order (per rank and worker). `reading` picks and verifies the shard bytes."""
    train, o, r, d = order is not None, order or TrainOrder(), reading, decoding
    sets = [list(s) for s in urls] if urls and isinstance(urls[0], (list, tuple)) else [list(urls)]
    if o.weights is not None and not o.resampled:
        raise ValueError("mixing weights need a resampled stream (data.resampled=true)" +
                         ("; global_order is for finite training streams" if o.global_order else ""))
    if o.resampled:
        w = list(o.weights) if o.weights is not None else [float(len(s)) for s in sets]
        total = o.samples_per_epoch or sum(len(s) for s in sets) * 1000
        stages: list = [mixed_samples(sets, w, total, o.seed, o.epoch, r.verify)]
    elif o.global_order:
        stages = [_shard_order([u for s in sets for u in s], True, o.seed, o.epoch), shard_stage(r.verify)]
    else:
        stages = [_shard_order([u for s in sets for u in s], train, o.seed, o.epoch)] + \
            ([wds.split_by_node] if r.split_by_node else []) + [wds.split_by_worker, shard_stage(r.verify)]
    if r.keys is not None:
        stages.append(wds.select(_InKeys(r.keys)))
    if train and o.shuffle_buffer > 1:
        stages.append((_global_shuffle if o.global_order else _seeded_shuffle)(o.shuffle_buffer, o.seed, o.epoch))
    if o.class_keep is not None or o.site_keep is not None:
        stages.append(_balanced(o.class_keep, o.seed, o.epoch, o.site_keep, global_rng=o.global_order))
    if o.global_order:
        stages.append(_GlobalTake(batch_size))
    if r.sample_filter is not None:
        stages.append(wds.select(r.sample_filter))
    stages.append(_Decoder(d.transform, d.labelled, d.num_classes, d.multilabel, d.max_bad_fraction, d.keep_meta,
                           track=train, seed=o.seed, epoch=o.epoch))
    dataset = wds.DataPipeline(*stages)
    generator = torch.Generator().manual_seed(_seed(o.seed, o.epoch))
    return (ResumableLoader if train else DataLoader)(
        dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=_Tracked(collate_fn) if train else collate_fn,
        drop_last=train if drop_last is None else drop_last, generator=generator, persistent_workers=False,
        worker_init_fn=drop_inherited_locks if num_workers else None)
