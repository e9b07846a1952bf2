"""Multi-site training: site-balanced sampling evens out sites on real shards; Macenko stain normalisation
(the documented domain-adaptation option) brings differently stained copies of a real H&E tile together."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import DATA


@pytest.fixture(scope="module")
def two_sites(tmp_path_factory):
    from medfound.workflows import shard

    root = tmp_path_factory.mktemp("sites")
    shard("npz", DATA / "medmnist" / "retinamnist_demo.npz", root / "a", name="site_a", modality="fundus",
          site="hospital-A")
    shard("npz", DATA / "medmnist" / "pneumoniamnist_demo.npz", root / "b", name="site_b", modality="cxr",
          site="hospital-B")
    return [root / "a", root / "b"]


def test_site_balanced_sampling_evens_out_two_real_sites(two_sites):
    from collections import Counter

    from medfound.data.pipeline import Decoding, TrainOrder, make_loader, shard_sets, site_balanced_keep

    sets, manifests = shard_sets(two_sites, "train")
    counts = Counter()
    for m in manifests:
        counts.update(m.counts["by_site"])
    keep = site_balanced_keep(dict(counts))
    assert keep["hospital-A"] == 1.0 and keep["hospital-B"] == pytest.approx(1120 / 1724)

    def draw(site_keep):
        seen = Counter()
        for epoch in range(3):
            for batch in make_loader(sets, Decoding(lambda s: {"image": torch.zeros(3, 2, 2)}), batch_size=64,
                                     order=TrainOrder(epoch=epoch, site_keep=site_keep), drop_last=False):
                seen.update(batch["site"])
        return seen["hospital-A"] / (seen["hospital-A"] + seen["hospital-B"])

    assert draw(None) == pytest.approx(600 / 1600, abs=0.01)  # the raw stream: 600 vs 1,000 training images
    assert abs(draw(keep) - 0.5) < 0.04
    with pytest.raises(ValueError, match="at least two sites"):
        site_balanced_keep({"only": 10})


def test_recipe_switches(two_sites):
    from medfound.config import DataConfig

    d = DataConfig(shards=two_sites, batch_size=4, balanced_sampling="class+site")
    assert d.balance_classes and d.balance_sites
    assert DataConfig(shards=two_sites, batch_size=4, balanced_sampling=True).balance_classes
    assert not DataConfig(shards=two_sites, batch_size=4, balanced_sampling="site").balance_classes


def _od_distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(float) - b.astype(float)).mean())


def test_stain_normalisation_brings_differently_stained_tiles_together(shards):
    """Two copies of the same real H&E tile, one re-stained (optical densities scaled per channel, as a different
    lab's haematoxylin/eosin uptake would), differ much less after normalisation than before."""
    from medfound.data.pipeline import Decoding, make_loader, shard_urls
    from medfound.data.stain import StainNormalized

    urls, _ = shard_urls([shards["he"]], "train")
    batch = next(iter(make_loader(urls, Decoding(lambda s: {"image": torch.from_numpy(np.asarray(s["image"]).copy())}),
                                  batch_size=4)))
    tile = batch["image"][int(np.argmin([float(t.float().mean()) for t in batch["image"]]))].numpy()  # most tissue
    od = -np.log((tile.astype(float) + 1) / 256)
    restained = np.clip(256 * np.exp(-od * np.array([1.35, 0.8, 1.1])) - 1, 0, 255).astype(np.uint8)
    seen = []
    norm = StainNormalized(lambda s: seen.append(s["image"]) or s["image"])
    a = np.asarray(norm({"image": Image.fromarray(tile), "key": "a"}))
    b = np.asarray(norm({"image": Image.fromarray(restained), "key": "b"}))
    before, after = _od_distance(tile, restained), _od_distance(a, b)
    assert after < 0.6 * before, (before, after)
    again = np.asarray(norm({"image": Image.fromarray(restained), "key": "b"}))
    assert (again == b).all() and len(norm._cache) == 2  # deterministic and cached per key
    with pytest.raises(ValueError, match="8-bit RGB"):
        norm({"image": np.zeros((8, 8), np.float32), "key": "c"})
