"""Resume without replay: a training stream restarted at a saved position gives the same batches as the
uninterrupted one, in the same worker order, without decoding the samples consumed before it."""

from __future__ import annotations

import pytest
import torch

from medfound.data.pipeline import Decoding, TrainOrder, make_loader, shard_sets
from medfound.data.transforms import build_transform


class Counting:
    """A transform that counts its calls (the decode of a sample) and can give several crops per image."""

    def __init__(self, crops: int = 1):
        self.inner = build_transform("light", 32, (0.5,) * 3, (0.5,) * 3, train=True)
        self.crops, self.calls = crops, 0

    def __call__(self, sample):
        self.calls += 1
        if self.crops == 1:
            return self.inner(sample)
        return [self.inner(sample) for _ in range(self.crops)]


def _batches(loader, resume=None):
    if resume is not None:
        loader.resume_at(resume)
    return list(loader)


def _same(a: dict, b: dict) -> bool:
    return a["key"] == b["key"] and torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


@pytest.mark.parametrize("workers,crops,balanced", [(0, 1, False), (2, 1, True), (2, 3, False)])
def test_a_resumed_epoch_equals_the_uninterrupted_one_without_decoding_the_past(shards, workers, crops, balanced):
    sets, (m,) = shard_sets([shards["retina"]], "train")
    order = TrainOrder(seed=3, epoch=1, shuffle_buffer=64, class_keep=[1.0, 0.5, 0.5, 1.0, 1.0] if balanced else None)
    kw = dict(batch_size=8, order=order, num_workers=workers)
    full = _batches(make_loader(sets[0], Decoding(Counting(crops), labelled=True, num_classes=5), **kw))
    k = 13  # consumed before the "checkpoint"; with 3 crops per image batch 13 ends inside an image
    position = {}
    for b in full[:k]:
        w, *rest = b["_pos"]
        position[str(w)] = rest
    t = Counting(crops)
    resumed = _batches(make_loader(sets[0], Decoding(t, labelled=True, num_classes=5), **kw), resume=position)
    assert all(b == {"_skipped": 8} for b in resumed[:k])
    assert len(resumed) == len(full)
    # the same samples in the same order, augmented identically (each sample draws from its own seed)
    for a, b in zip(full[k:], resumed[k:]):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])
        assert "label" not in a or torch.equal(a["label"], b["label"])
    if workers == 0:  # only what comes after the position is decoded (plus the image the position stopped inside)
        decoded_before = sum(len(b["key"]) for b in full[:k]) // crops
        assert t.calls <= sum(len(b["key"]) for b in full) // crops - decoded_before + 1


def test_skipping_restores_the_rng_free_stream_bit_for_bit(shards):
    sets, _ = shard_sets([shards["pneumonia"]], "train")
    t = build_transform("none", 32, (0.5,) * 3, (0.5,) * 3, train=False)  # no random draws: tensors must match
    kw = dict(batch_size=16, order=TrainOrder(seed=5, shuffle_buffer=100), num_workers=2)
    full = list(make_loader(sets[0], Decoding(t, labelled=True), **kw))
    position = {str(b["_pos"][0]): b["_pos"][1:] for b in full[:5]}
    loader = make_loader(sets[0], Decoding(t, labelled=True), **kw)
    loader.resume_at(position)
    resumed = list(loader)
    assert resumed[:5] == [{"_skipped": 16}] * 5
    assert len(resumed) == len(full) and all(_same(a, b) for a, b in zip(full[5:], resumed[5:]))


def test_a_position_that_does_not_fit_the_loader_is_refused(shards):
    sets, _ = shard_sets([shards["pneumonia"]], "train")
    t = build_transform("none", 32, (0.5,) * 3, (0.5,) * 3, train=False)
    loader = make_loader(sets[0], Decoding(t, labelled=True), batch_size=16, order=TrainOrder(seed=5))
    loader.resume_at({"0": [20, 0, 21]})  # 21 outputs: not a whole number of batches of 16
    with pytest.raises(RuntimeError, match="mixes skipped and new samples"):
        list(loader)


def _ranked(monkeypatch, rank: int, world: int) -> None:
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))


@pytest.mark.parametrize("after", [1, 4])
def test_global_order_resumes_on_another_number_of_processes_with_each_key_once(shards, monkeypatch, after):
    sets, _ = shard_sets([shards["pneumonia"]], "train")
    t = build_transform("none", 32, (0.5,) * 3, (0.5,) * 3, train=False)
    kw = dict(batch_size=16, order=TrainOrder(seed=3, epoch=2, shuffle_buffer=100, global_order=True), num_workers=2)
    _ranked(monkeypatch, 0, 1)
    whole = [k for b in make_loader(sets[0], Decoding(t, labelled=True), **kw) for k in b["key"]]  # the epoch on one process
    before, position = [], 0
    for rank in (0, 1):  # two processes consume 10 batches each, then the run is "killed"
        _ranked(monkeypatch, rank, 2)
        for i, b in enumerate(make_loader(sets[0], Decoding(t, labelled=True), **kw)):
            if i == 10:
                break
            before += b["key"]
            position = max(position, b["_gpos"])
    assert position == 10 * 2 * 16
    after_keys = []
    for rank in range(after):  # resumed on `after` processes at the saved global position
        _ranked(monkeypatch, rank, after)
        loader = make_loader(sets[0], Decoding(t, labelled=True), **kw)
        loader.resume_global(position)
        after_keys += [k for b in loader for k in b["key"]]
    consumed = before + after_keys
    assert len(consumed) == len(set(consumed))  # no sample twice
    # and none skipped: the same samples as the uninterrupted epoch (whose last partial batch is dropped too)
    assert set(consumed) == set(whole) and len(consumed) == len(whole)


def test_global_order_is_refused_where_it_has_no_meaning(shards):
    from medfound.config import ConfigError, load_recipe

    from helpers import ROOT

    sets, _ = shard_sets([shards["pneumonia"]], "train")
    t = build_transform("none", 32, (0.5,) * 3, (0.5,) * 3, train=False)
    with pytest.raises(ValueError, match="finite training streams"):
        make_loader(sets[0], Decoding(t), batch_size=8, order=TrainOrder(global_order=True, weights=[1.0]))
    with pytest.raises(ConfigError, match="global_order orders a finite epoch"):
        load_recipe(ROOT / "pretrain" / "demo_mae_tiny.yaml", ["data.global_order=true"])
