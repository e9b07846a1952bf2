"""Frozen features for the benchmark's probes, computed once per backbone x shard set x split x preprocessing and
cached under the sha256 of all four (eva's offline mode): a rerun reads them back bit for bit, and a changed backbone
(other weights, another architecture) or another preprocessing misses the cache and is computed again.

A feature is the backbone's pooled embedding (`timm.create_model(..., num_classes=0)(x)`: the class token or the mean
of the patch tokens, as the model's own `global_pool` says), for the evaluation transform at the task's input size
(resize, no augmentation) normalised with the backbone's mean and std, exactly as `medfound evaluate` feeds images.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medfound.config import DataConfig
from medfound.data.loaders import eval_image_transform, normalizer, prepare
from medfound.data.manifest import read_manifest
from medfound.data.pipeline import Decoding, Reading, make_loader, shard_urls
from medfound.io import atomic_write_bytes

FEATURE_VERSION = 1


@dataclass
class Features:
    keys: list[str]
    x: np.ndarray  # [N, D] float32
    y: np.ndarray  # [N] int64


def cache_key(backbone_identity: str, manifest_digest: str, split: str, prep: dict[str, Any]) -> str:
    body = json.dumps({"backbone": backbone_identity, "manifest": manifest_digest, "split": split, "prep": prep,
                       "version": FEATURE_VERSION}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def load_cached(path: Path) -> Features:
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        keys = json.loads(f.metadata()["keys"])
        return Features(keys, f.get_tensor("x"), f.get_tensor("y"))


def compute(model: Any, shards: str, split: str, prep: dict[str, Any], num_classes: int, batch_size: int = 128,
            progress: bool = True) -> Features:
    """The features of every sample of `split` (in shard order), on the GPU when there is one."""
    import torch
    from tqdm.auto import tqdm

    d = DataConfig(shards=[shards], batch_size=batch_size, img_size=prep["img_size"], mean=tuple(prep["mean"]),
                   std=tuple(prep["std"]), augment="none")
    urls, (manifest,) = shard_urls([shards], split)
    loader = make_loader(urls, Decoding(prepare(d, eval_image_transform(d)), labelled=True, num_classes=num_classes),
                         batch_size=batch_size, reading=Reading(verify="sha256", split_by_node=False))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    norm = normalizer(d).to(device)
    keys, xs, ys = [], [], []
    total = manifest.counts["by_split"].get(split, 0)
    with torch.no_grad(), tqdm(total=total, desc=f"features {manifest.name}/{split}", disable=not progress,
                               unit="img", leave=False) as bar:
        for batch in loader:
            out = model(norm(batch["image"].to(device)))
            if out.ndim != 2:
                raise ValueError(f"the backbone returns {tuple(out.shape)} per batch, not [batch, features]: give a "
                                 "timm backbone built with num_classes=0")
            xs.append(out.float().cpu().numpy())
            ys.append(batch["label"].numpy())
            keys += list(batch["key"])
            bar.update(len(batch["key"]))
    if not keys:
        raise ValueError(f"split '{split}' of {shards} holds no samples")
    return Features(keys, np.concatenate(xs).astype(np.float32), np.concatenate(ys).astype(np.int64))


def cached_features(backbone, model_fn, shards: str, split: str, prep: dict[str, Any], cache: Path,
                    num_classes: int, progress: bool = True) -> tuple[Features, bool]:
    """(features, read from the cache) for `backbone` (medfound.bench.backbones.Backbone) on `split` of `shards`;
    `model_fn()` builds the model only when the cache misses."""
    from safetensors.numpy import save

    digest = read_manifest(shards).digest
    path = Path(cache) / f"{cache_key(backbone.identity(), digest, split, prep)}.safetensors"
    if path.is_file():
        return load_cached(path), True
    feats = compute(model_fn(), shards, split, prep, num_classes, progress=progress)
    meta = {"keys": json.dumps(feats.keys), "backbone": backbone.label, "spec": backbone.spec, "split": split,
            "manifest_digest": digest, "prep": json.dumps(prep)}
    atomic_write_bytes(path, save({"x": feats.x, "y": feats.y}, metadata=meta))
    return feats, False


def in_order(feats: Features, keys: list[str]) -> Features:
    """`feats` re-ordered to `keys` (the split's label index order); every key must have a feature."""
    if feats.keys == keys:
        return feats
    where = {k: i for i, k in enumerate(feats.keys)}
    missing = [k for k in keys if k not in where]
    if missing:
        raise ValueError(f"{len(missing)} samples have no cached feature (e.g. {missing[0]}): the shard set changed?")
    rows = np.array([where[k] for k in keys])
    return Features(list(keys), feats.x[rows], feats.y[rows])
