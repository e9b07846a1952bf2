"""From a recipe's `data.*` section to what the loop consumes: the image transforms, the per-image preparation
(stain normalisation), the device-side normaliser, and the one training-loader builder every image task uses
(pretraining, classification, segmentation, box prompts), with class and site balancing.

These builders used to be methods of `DataConfig`; they live here so that the config stays torch-free.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Optional

from medfound.config import DataConfig
from medfound.data.manifest import Manifest
from medfound.data.pipeline import Decoding, Reading, TrainOrder, balanced_keep, make_loader, site_balanced_keep
from medfound.data.scale import require_spacing
from medfound.data.stain import StainNormalized
from medfound.data.transforms import Normalize, build_transform


def train_image_transform(d: DataConfig) -> Callable:
    """The training transform of `data.augment` at `data.img_size`, unnormalised (medfound.data.transforms)."""
    return _transform(d, train=True)


def eval_image_transform(d: DataConfig) -> Callable:
    """The evaluation transform (resize only), unnormalised."""
    return _transform(d, train=False)


def _transform(d: DataConfig, train: bool) -> Callable:
    return build_transform(d.augment, d.img_size, d.mean, d.std, train=train, window=d.window,
                           fundus_crop=d.fundus_crop, hed_sigma=d.hed_sigma, crop_scale=d.crop_scale,
                           multicrop=d.multicrop, normalize=False,
                           spacing_mm=d.spacing_mm)


def prepare(d: DataConfig, transform: Callable) -> Callable:
    """`transform` preceded by the per-image steps `d` asks for (stain normalisation)."""
    if not d.stain_normalize:
        return transform

    return StainNormalized(transform)


def normalizer(d: DataConfig):
    """Finishes a batch on the device: uint8 or [0, 1] images -> (x - mean) / std."""

    return Normalize(d.mean, d.std)


def site_keep_rates(d: DataConfig, manifests: list[Manifest]) -> Optional[dict[str, float]]:
    """data.balanced_sampling=site: the keep probability per site that makes sites arrive equally often."""
    if not d.balance_sites:
        return None

    by_site: Counter = Counter()
    for m in manifests:
        by_site.update(m.counts.get("by_site") or ({m.site: m.counts["by_split"].get(d.train_split, 0)}
                                                   if m.site else {}))
    return site_balanced_keep(dict(by_site))


def class_keep_rates(d: DataConfig, manifest: Manifest, binary_threshold: Optional[int] = None,
                     counts: Optional[list[int]] = None) -> Optional[list[float]]:
    """data.balanced_sampling=class: the keep probability per class (single-label), or per side of a binary
    endpoint `grade >= binary_threshold` (every grade of one side shares that side's rate). `counts`: the training
    samples per class when they are not the manifest's (a labelled subset)."""
    if not d.balance_classes:
        return None
    if manifest.label_schema.type in ("none", "multilabel"):
        raise ValueError("data.balanced_sampling draws single-label classes equally often; for multi-label "
                         "findings use head.class_weights=balanced (a pos_weight per finding) instead")

    counts = counts if counts is not None else manifest.class_counts(d.train_split)
    if binary_threshold is None:
        return balanced_keep(counts)
    k = binary_threshold
    neg, pos = balanced_keep([sum(counts[:k]), sum(counts[k:])])
    return [neg] * k + [pos] * (len(counts) - k)


def image_train_loader(d: DataConfig, seed: int, sets: list[list[str]], manifests: list[Manifest],
                       transform: Callable, labelled: bool, class_keep: Optional[list[float]] = None,
                       keys: Optional[frozenset[str]] = None) -> Callable[[int], Any]:
    """epoch -> the training DataLoader over `sets` (shard paths per set) with `transform` after `prepare`, every
    `data.*` stream setting (shuffle, resampling and mixing weights, global order, verification, bad-sample budget)
    and site balancing; `class_keep` from `class_keep_rates` where the task balances classes; `keys`: a labelled
    training subset (TrainData.keys) or None for the whole split."""

    if d.spacing_mm is not None:
        for location, m in zip(d.shards, manifests):
            require_spacing(location, f"shard set {m.name} ({location})")
    transform = prepare(d, transform)
    schema = manifests[0].label_schema
    samples = d.samples_per_epoch or (len(keys) if keys is not None else
                                      sum(m.counts["by_split"].get(d.train_split, 0) for m in manifests))
    site_keep = site_keep_rates(d, manifests)

    def loader(epoch: int):
        order = TrainOrder(seed=seed, epoch=epoch, shuffle_buffer=d.shuffle_buffer, resampled=d.resampled,
                           weights=d.weights, samples_per_epoch=samples, class_keep=class_keep, site_keep=site_keep,
                           global_order=d.global_order)
        return make_loader(sets, Decoding(transform, labelled=labelled, num_classes=schema.num_classes,
                                          multilabel=schema.type == "multilabel", max_bad_fraction=d.max_bad_fraction),
                           batch_size=d.batch_size, order=order, reading=Reading(verify=d.verify, keys=keys),
                           num_workers=d.num_workers)
    return loader
