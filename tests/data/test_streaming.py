"""Streaming at scale: exactly-once evaluation across ranks x workers, weighted resampled mixing,
undecodable samples skipped/counted/limited, and the transform presets."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from medfound.config.data import MultiCropConfig
from medfound.data.pipeline import Decoding, TrainOrder, make_loader, mixed_samples, shard_sets, shard_urls
from medfound.data.transforms import HEDJitter, build_transform, to_unit_image

T_EVAL = build_transform("none", 32, (0.5,) * 3, (0.5,) * 3, train=False)


def test_two_ranks_times_two_workers_see_each_key_once(shards, monkeypatch):
    urls, (m,) = shard_urls([shards["retina"]], "test")
    seen = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        loader = make_loader(urls, Decoding(T_EVAL, labelled=True), batch_size=32, num_workers=2)
        keys = [k for b in loader for k in b["key"]]
        assert keys, f"rank {rank} read nothing"
        seen += keys
    assert len(seen) == len(set(seen)) == m.counts["by_split"]["test"]


def _source(key: str) -> str:
    return "he" if key.startswith("CMU") else "retina" if key.startswith("retinamnist") else "pneumonia"


def test_weighted_mixing_meets_the_target_ratio(shards):
    sets, _ = shard_sets([shards["retina"], shards["pneumonia"], shards["he"]], "train")
    target = {"retina": 0.4, "pneumonia": 0.3, "he": 0.3}
    raw = mixed_samples(sets, [0.4, 0.3, 0.3], samples=10_000, seed=7, epoch=0)
    counts = Counter(_source(s["__key__"]) for s in raw())
    assert sum(counts.values()) == 10_000
    for k, p in target.items():
        assert abs(counts[k] / 10_000 - p) < 0.02, counts
    # the H&E set has 122 samples but is drawn 3,000 times: resampled with replacement
    again = Counter(_source(s["__key__"]) for s in mixed_samples(sets, [0.4, 0.3, 0.3], 10_000, 7, 0)())
    assert again == counts  # a pure function of (seed, epoch, rank, worker)


def test_resampled_loader_end_to_end(shards):
    sets, _ = shard_sets([shards["retina"], shards["he"]], "train")
    decoding = Decoding(build_transform("mae", 32, (0.5,) * 3, (0.5,) * 3))
    order = dict(seed=1, resampled=True, weights=[0.5, 0.5], samples_per_epoch=1000, shuffle_buffer=100)

    def keys(epoch: int) -> list[str]:
        return [k for b in make_loader(sets, decoding, batch_size=50, order=TrainOrder(epoch=epoch, **order))
                for k in b["key"]]

    first = keys(0)
    assert len(first) == 1000 and 400 < sum(k.startswith("CMU") for k in first) < 600
    assert first == keys(0) and first != keys(1)
    with pytest.raises(ValueError, match="need a resampled stream"):
        make_loader(sets, decoding, batch_size=50, order=TrainOrder(**{**order, "resampled": False}))


def _corrupt_set(tmp_path: Path, good: int, bad: int) -> str:
    """A shard of real fundus PNGs in which `bad` samples, spread evenly, hold truncated PNG bytes."""
    z = np.load(Path(__file__).resolve().parents[2] / "data" / "medmnist" / "retinamnist_demo.npz")
    n = good + bad
    broken = set(range(0, n, n // bad)[:bad])
    url = str(tmp_path / "mixed.tar")
    with wds.TarWriter(url) as w:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(z["train_images"][i]).save(buf, format="PNG")
            png = buf.getvalue()[:40] if i in broken else buf.getvalue()
            w.write({"__key__": f"s{i:04d}", "png": png, "cls": b"0"})
    return url


def test_undecodable_samples_are_skipped_counted_and_limited(tmp_path):
    url = _corrupt_set(tmp_path, good=195, bad=5)
    loader = make_loader([url], Decoding(T_EVAL, labelled=True, max_bad_fraction=0.05), batch_size=20)
    batches = list(loader)
    keys = [k for b in batches for k in b["key"]]
    reports = [r for b in batches for r in b.get("_bad", [])]
    assert len(keys) == 195 and len(reports) == 5
    assert all("mixed.tar" in r and r.startswith("s0") for r in reports)  # key and shard named
    strict = make_loader([url], Decoding(T_EVAL, labelled=True, max_bad_fraction=0.01), batch_size=20)
    with pytest.raises(ValueError, match=r"5 of 200 samples could not be decoded .*shard .*mixed.tar"):
        list(strict)
    with pytest.raises(ValueError, match=r"1 of 1 samples"):
        list(make_loader([url], Decoding(T_EVAL, labelled=True, max_bad_fraction=0.0), batch_size=20))


def test_presets_shapes_and_determinism(shards):
    urls, _ = shard_urls([shards["he"]], "train")
    tile = next(iter(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples())))
    sample = {"image": Image.open(io.BytesIO(tile["png"])), "meta": {}, "masks": {}}
    dino = build_transform("dino", 64, (0.5,) * 3, (0.5,) * 3,
                           multicrop=MultiCropConfig(global_crops=2, local_crops=4, local_size=24))
    out = dino(sample)
    assert [tuple(c.shape) for c in out["crops"]] == [(3, 64, 64)] * 2 + [(3, 24, 24)] * 4
    assert torch.equal(out["image"], out["crops"][0])
    he = build_transform("he", 48, (0.5,) * 3, (0.5,) * 3, hed_sigma=0.05)
    torch.manual_seed(0)
    a = he(sample)["image"]
    torch.manual_seed(0)
    assert torch.equal(a, he(sample)["image"]) and a.shape == (3, 48, 48)


def test_hed_jitter_keeps_structure_and_moves_stain(shards):
    urls, _ = shard_urls([shards["he"]], "train")
    tile = next(iter(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples())))
    x = to_unit_image(Image.open(io.BytesIO(tile["png"])))
    assert torch.allclose(HEDJitter(0.0)(x), x, atol=2e-3)  # the stain round trip is exact up to clipping
    torch.manual_seed(3)
    y = HEDJitter(0.1)(x)
    assert 0.002 < float((y - x).abs().mean()) < 0.2
    corr = np.corrcoef(x.mean(0).ravel().numpy(), y.mean(0).ravel().numpy())[0, 1]
    assert corr > 0.9  # colour moves, morphology stays


def test_fundus_crop_uses_the_stored_fov_mask():
    img = np.zeros((40, 60, 3), np.uint8)
    img[5:35, 15:45] = 180
    fov = np.zeros((40, 60), np.uint8)
    fov[5:35, 15:45] = 255
    t = build_transform("none", 16, (0.0,) * 3, (1.0,) * 3, train=False, fundus_crop=True)
    out = t({"image": Image.fromarray(img), "meta": {}, "masks": {"fov": fov}})["image"]
    assert out.shape == (3, 16, 16) and float(out.min()) > 0.6  # the dark border is gone
    detected = t({"image": Image.fromarray(img), "meta": {}, "masks": {}})["image"]
    assert torch.allclose(detected, out, atol=1e-5)


def test_uint8_batches_are_normalised_on_the_device_like_the_float_path(shards):
    from medfound.config import DataConfig
    from medfound.data.loaders import eval_image_transform, normalizer
    from medfound.data.pipeline import collate

    d = DataConfig(shards=[shards["retina"]], img_size=32, batch_size=8)
    urls, _ = shard_urls([shards["retina"]], "test")
    raw = next(iter(make_loader(urls, Decoding(eval_image_transform(d), labelled=True), batch_size=8)))
    ref = next(iter(make_loader(urls, Decoding(build_transform("none", 32, d.mean, d.std, train=False), labelled=True),
                                batch_size=8)))
    assert raw["image"].dtype == torch.uint8  # 4x less to move between processes and to the GPU
    assert torch.allclose(normalizer(d)(raw["image"]), ref["image"], atol=1e-5)
    mixed = collate([{"image": torch.full((3, 2, 2), 255, dtype=torch.uint8), "key": "a"},
                     {"image": torch.full((3, 2, 2), 0.5), "key": "b"}])
    assert mixed["image"].dtype == torch.float32 and mixed["image"][0].max() == 1.0  # 8-bit brought to [0, 1]


def test_masks_are_decoded_only_when_a_transform_reads_them(tmp_path, monkeypatch):
    import medfound.data.pipeline as pipeline
    from medfound.data.shards import write_shard_set
    from medfound.data.manifest import LabelSchema

    img = np.full((16, 16, 3), 200, np.uint8)
    fov = np.zeros((16, 16), np.uint8)
    fov[2:14, 2:14] = 255
    write_shard_set([{"key": f"s{i}", "image": img, "split": "train", "masks": {"fov": fov, "vessel": fov}}
                     for i in range(4)], tmp_path / "s", name="t", modality="fundus",
                    label_schema=LabelSchema(type="none"), source={}, ingest={})
    urls, _ = shard_urls([tmp_path / "s"], "train")
    calls = Counter()
    real = pipeline.decode_member
    monkeypatch.setattr(pipeline, "decode_member", lambda name, data: calls.update([name]) or real(name, data))
    list(make_loader(urls, Decoding(T_EVAL), batch_size=2))
    assert calls == Counter({"png": 4})  # masks untouched
    crop = build_transform("none", 8, (0.5,) * 3, (0.5,) * 3, train=False, fundus_crop=True)
    list(make_loader(urls, Decoding(crop), batch_size=2))
    assert calls["fov.png"] == 4 and calls["vessel.png"] == 0
