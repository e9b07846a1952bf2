"""Streaming: evaluation sees every sample once (also with workers); training order is a pure
function of (seed, epoch); transforms give 3-channel tensors for grey and colour images."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import GaussianBlur

from medfound.config.data import MultiCropConfig
from medfound.data.manifest import read_manifest
from medfound.data.pipeline import Decoding, TrainOrder, make_loader, shard_urls
from medfound.data.transforms import DINO_BLUR_SIGMA, build_transform, dino_blur_sigma

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


def test_dino_blur_is_scaled_to_small_images_and_unchanged_at_224():
    """DINO's blur (sigma 0.1-2 px) was set for 224-px views; on a 32-px image the same sigma would blur away 7x the
    share of detail on every first global view, so below 224 px its range shrinks with the image (global and local
    views alike); at 224 px and above it stays DINO's."""
    def sigmas(img_size: int, local_size: int) -> set[tuple[float, float]]:
        t = build_transform("dino", img_size, (0.5,) * 3, (0.5,) * 3,
                            multicrop=MultiCropConfig(global_crops=2, local_crops=3, local_size=local_size))
        def walk(m):  # Compose and RandomApply hold their transforms in `.transforms`
            return [m] + [x for c in getattr(m, "transforms", []) for x in walk(c)]
        return {tuple(m.sigma) for v in t.views for m in walk(v) if isinstance(m, GaussianBlur)}

    assert sigmas(224, 96) == sigmas(518, 224) == {DINO_BLUR_SIGMA} == {(0.1, 2.0)}
    (lo, hi), = sigmas(32, 16)
    assert lo == pytest.approx(0.1 * 32 / 224) and hi == pytest.approx(2.0 * 32 / 224)
    assert dino_blur_sigma(32) == (lo, hi)
    x = build_transform("dino", 32, (0.5,) * 3, (0.5,) * 3, multicrop=MultiCropConfig(local_crops=2, local_size=16))(
        Image.new("L", (28, 28), 9))
    assert x.shape == (3, 32, 32) and torch.isfinite(x).all()


def test_dino_photometric_strength_zero_keeps_intensity_and_one_is_dinos_pipeline():
    """`data.multicrop.photometric`: 1 keeps DINO's view pipeline step for step (the same random draws); 0 drops
    colour jitter, greyscale and solarisation, so a view keeps the image's intensity (chest X-ray opacity, fundus
    colour), while geometric changes and blur stay."""
    def kinds(photometric: float) -> list[list[str]]:
        t = build_transform("dino", 32, (0.5,) * 3, (0.5,) * 3, multicrop=MultiCropConfig(
            global_crops=2, local_crops=1, local_size=16, photometric=photometric))
        return [[type(m).__name__ for m in v.transforms[0].transforms] for v in t.views]

    dino = ["RandomResizedCrop", "RandomHorizontalFlip", "RandomApply", "RandomGrayscale", "RandomApply",
            "RandomSolarize"]
    assert kinds(1.0) == kinds(0.5) == [dino] * 3
    assert kinds(0.0) == [["RandomResizedCrop", "RandomHorizontalFlip", "RandomApply"]] * 3
    grey = Image.new("RGB", (28, 28), (90, 140, 200))
    shifts = {}
    for strength in (0.0, 1.0):
        t = build_transform("dino", 32, (0.0,) * 3, (1.0,) * 3,
                            multicrop=MultiCropConfig(local_crops=0, photometric=strength))
        shifts[strength] = []
        for seed in range(8):
            torch.manual_seed(seed)
            x = t(grey)  # normalised with mean 0, std 1: intensities in [0, 1]
            shifts[strength].append(float((x.mean((1, 2)) - torch.tensor([90, 140, 200]) / 255).abs().max()))
    assert max(shifts[0.0]) < 2 / 255 and max(shifts[1.0]) > 0.05
