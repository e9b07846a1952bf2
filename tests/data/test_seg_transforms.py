"""Segmentation transforms: image and mask move together; foreground oversampling; masks become class
indices; resampling to a target spacing; clear errors for missing or out-of-range masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medfound.config import SegmentConfig
from medfound.data.seg_transforms import build_seg_transform, class_indices, resample


def sample_2d(h: int = 50, w: int = 70) -> dict:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    mask = np.where(image[..., 0] > 128, 255, 0).astype(np.uint8)  # the mask is a function of the image
    return {"image": image, "masks": {"mask": mask, "fov": np.full((h, w), 255, np.uint8)}, "meta": {}, "key": "s0"}


def test_crops_flips_and_rotations_keep_image_and_mask_aligned():
    torch.manual_seed(0)
    seg = SegmentConfig(patch_size=[32, 32], intensity="imagenet", roi="fov", crops_per_image=8,
                        intensity_jitter=0.0)
    crops = build_seg_transform(seg, train=True)(sample_2d())
    assert len(crops) == 8
    for c in crops:
        assert c["image"].dtype == torch.uint8 and c["image"].shape == (3, 32, 32)
        assert c["mask"].shape == (1, 32, 32) and c["roi"].all()
        assert torch.equal(c["mask"][0] == 1, c["image"][0] > 128)


def test_foreground_oversampling_finds_a_small_structure():
    torch.manual_seed(0)
    s = sample_2d(200, 200)
    s["masks"]["mask"] = np.zeros((200, 200), np.uint8)
    s["masks"]["mask"][150:153, 20:23] = 1
    hit = build_seg_transform(SegmentConfig(patch_size=[32, 32], foreground_fraction=1.0, crops_per_image=10),
                              train=True)(s)
    assert all(bool((c["mask"] > 0).any()) for c in hit)
    miss = build_seg_transform(SegmentConfig(patch_size=[32, 32], foreground_fraction=0.0, crops_per_image=10),
                               train=True)(s)
    assert sum(bool((c["mask"] > 0).any()) for c in miss) < 5


def test_small_images_are_padded_and_evaluation_keeps_the_whole_image():
    seg = SegmentConfig(patch_size=[64, 64], intensity="zscore")
    crop = build_seg_transform(seg, train=True)(sample_2d(40, 30))
    assert crop["image"].shape == (3, 64, 64) and crop["image"].dtype == torch.float32
    whole = build_seg_transform(seg, train=False)(sample_2d(40, 30))
    assert whole["image"].shape == (3, 40, 30)
    assert abs(float(whole["image"].mean())) < 1e-5 and float(whole["image"][0].std()) == pytest.approx(1, abs=0.02)


def test_volumes_ct_normalisation_and_resampling():
    vol = np.linspace(-1000, 1000, 8 * 10 * 12, dtype=np.float32).reshape(8, 10, 12)
    label = np.zeros((8, 10, 12), np.uint8)
    label[2:4, 3:6, 4:8] = 2
    seg = SegmentConfig(mask="label", spatial_dims=3, patch_size=[4, 8, 8], intensity="ct", clip=[-100, 100], stats=[0, 50],
                        num_classes=3, spacing=[1.0, 1.0, 2.0])
    out = build_seg_transform(seg, train=False)({"image": vol, "masks": {"label": label}, "meta":
                                                 {"spacing_mm": [2.0, 1.0, 1.0]}, "key": "v"})
    assert out["image"].shape == (1, 16, 10, 6) and out["mask"].shape == (1, 16, 10, 6)
    assert float(out["image"].min()) == pytest.approx(-2.0) and float(out["image"].max()) == pytest.approx(2.0)
    assert set(out["mask"].unique().tolist()) == {0, 2}
    # scored on the volume's own grid at its own spacing (the prediction is mapped back), as nnU-Net scores
    assert out["native_mask"].shape == (1, 8, 10, 12) and out["spacing"].tolist() == [2.0, 1.0, 1.0]
    assert torch.equal(out["native_mask"][0], torch.from_numpy(label.astype(np.int64)))
    same = build_seg_transform(seg, train=False)({"image": vol, "masks": {"label": label}, "meta":
                                                  {"spacing_mm": [1.0, 1.0, 2.0]}, "key": "v"})
    assert "native_mask" not in same and same["spacing"].tolist() == [1.0, 1.0, 2.0]
    img, (m,) = resample(torch.zeros(1, 4, 4), [torch.ones(1, 4, 4, dtype=torch.long)], [1, 1], [0.5, 2])
    assert img.shape == (1, 8, 2) and m.dtype == torch.long


def test_mask_errors_name_the_sample_and_the_fix():
    with pytest.raises(ValueError, match="num_classes=4"):
        class_indices(np.array([[0, 3]]), 3, "k1")
    assert class_indices(np.array([[0, 255]], np.uint8), 2, "k").tolist() == [[0, 1]]
    s = sample_2d()
    del s["masks"]["mask"]
    with pytest.raises(ValueError, match="s0 has no 'mask' mask .*fov"):
        build_seg_transform(SegmentConfig(patch_size=[32, 32]), train=True)(s)
    with pytest.raises(ValueError, match="needs volumes"):
        build_seg_transform(SegmentConfig(spatial_dims=3, patch_size=[4, 4, 4]), train=True)(sample_2d())
