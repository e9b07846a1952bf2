"""Streaming: evaluation sees every sample once (also with workers); training order is a pure
function of (seed, epoch); transforms give 3-channel tensors for grey and colour images."""

from __future__ import annotations

import torch
from PIL import Image

from medfound.data.manifest import read_manifest
from medfound.data.pipeline import Decoding, TrainOrder, make_loader, shard_urls
from medfound.data.transforms import build_transform

T_EVAL = build_transform("none", 32, (0.5,) * 3, (0.5,) * 3, train=False)
T_TRAIN = build_transform("mae", 32, (0.5,) * 3, (0.5,) * 3, train=True)


def _keys(loader):
    return [k for b in loader for k in b["key"]]


def test_eval_reads_every_sample_once(shards):
    urls, (m,) = shard_urls([shards["retina"]], "test")
    for workers in (0, 2):
        loader = make_loader(urls, Decoding(T_EVAL, labelled=True), batch_size=64, num_workers=workers)
        keys = _keys(loader)
        assert len(keys) == len(set(keys)) == m.counts["by_split"]["test"] == 400
    batch = next(iter(loader))
    assert batch["image"].shape == (64, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["label"].dtype == torch.long and int(batch["label"].max()) <= 4


def test_training_order_is_seeded_by_epoch(shards):
    urls, _ = shard_urls([shards["retina"], shards["he"]], "train")

    def order(seed, epoch):
        return _keys(make_loader(urls, Decoding(T_EVAL), batch_size=50,
                                 order=TrainOrder(seed=seed, epoch=epoch, shuffle_buffer=200)))
    a = order(0, 0)
    assert a == order(0, 0)
    assert a != order(0, 1) and a != order(1, 0)
    n = read_manifest(shards["retina"]).counts["by_split"]["train"] + read_manifest(shards["he"]).counts["total"]
    assert len(a) == (n // 50) * 50  # full batches only in training
    assert any(k.startswith("CMU") for k in a) and any(k.startswith("retinamnist") for k in a)
    retina = [int(k.rsplit("_", 1)[1]) for k in a[:100] if k.startswith("retinamnist")]
    assert retina != sorted(retina)  # samples are shuffled, not read in shard order


def test_missing_split_is_explained(shards):
    import pytest
    with pytest.raises(ValueError, match="has no 'test' split .*train"):
        shard_urls([shards["he"]], "test")


def test_transforms_make_three_channel_tensors():
    grey = Image.new("L", (28, 28), 128)
    rgb = Image.new("RGB", (64, 64), (200, 100, 50))
    deep = Image.fromarray((torch.arange(784).reshape(28, 28) * 50).numpy().astype("uint16"))
    assert deep.mode == "I;16"
    for img in (grey, rgb, deep):
        for t in (T_EVAL, T_TRAIN):
            x = t(img)
            assert x.shape == (3, 32, 32) and torch.isfinite(x).all()
    x = T_EVAL(grey)
    assert torch.allclose(x[0], x[1]) and torch.allclose(x[1], x[2])
    assert abs(float(x.mean()) - (128 / 255 - 0.5) / 0.5) < 0.02
