"""MAE: patch geometry, masking, the loss's golden values, visible-only encoding, any timm ViT layout."""

from __future__ import annotations

import pytest
import timm
import torch

from medfound.pretrain.mae import MAE, patchify, unpatchify
from medfound.pretrain.masking import random_masking

from helpers import TINY_VIT


def _mae(**vit) -> MAE:
    enc = timm.create_model("vit_tiny_patch16_224", num_classes=0, **{**TINY_VIT, **vit})
    return MAE(enc, decoder_dim=32, decoder_depth=1, decoder_heads=2)


def test_patchify_layout_and_inverse():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    p = patchify(x, (4, 4))
    assert p.shape == (2, 4, 48)
    # first patch, first pixel: channels 0,1,2 of pixel (0,0); then pixel (0,1)
    assert p[0, 0, :6].tolist() == [0.0, 64.0, 128.0, 1.0, 65.0, 129.0]
    # second patch starts at column 4 of row 0
    assert p[0, 1, 0].item() == 4.0
    assert torch.equal(unpatchify(p, (4, 4), (2, 2), 3), x)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        patchify(torch.zeros(1, 3, 10, 8), (4, 4))


def test_random_masking_counts_and_restore():
    g = torch.Generator().manual_seed(0)
    keep, mask, restore = random_masking(5, 64, 0.75, generator=g)
    assert keep.shape == (5, 16) and mask.shape == (5, 64)
    assert torch.all(mask.sum(1) == 48)
    assert torch.all(torch.gather(mask, 1, keep) == 0)
    masked = torch.stack([torch.nonzero(m).squeeze(1) for m in mask])
    shuffled = torch.cat([keep, masked], 1)
    assert torch.equal(torch.gather(shuffled, 1, restore), torch.arange(64).expand(5, 64))
    assert not torch.equal(keep[0], keep[1])  # each image draws its own mask


def test_loss_golden_values():
    mae = _mae()
    mae.norm_pix_loss = True
    torch.manual_seed(0)
    images = torch.randn(3, 3, 32, 32)
    mask = torch.zeros(3, 16)
    mask[:, ::2] = 1
    target = patchify(images, (8, 8))
    normed = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    assert mae.loss(images, normed, mask).item() == pytest.approx(0.0, abs=1e-10)
    # predicting zeros against unit-variance patches (unbiased var): mean square = (n - 1) / n
    n = 8 * 8 * 3
    assert mae.loss(images, torch.zeros_like(normed), mask).item() == pytest.approx((n - 1) / n, rel=1e-4)
    # only masked patches count: garbage on visible patches changes nothing
    junk = normed.clone()
    junk[:, 1::2] = 1e3
    assert mae.loss(images, junk, mask).item() == pytest.approx(0.0, abs=1e-10)
    mae.norm_pix_loss = False
    assert mae.loss(images, target, mask).item() == pytest.approx(0.0, abs=1e-10)


def test_encoder_sees_only_visible_tokens():
    mae = _mae()
    seen = []
    mae.encoder.blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    out = mae({"image": torch.randn(4, 3, 32, 32)})
    assert seen == [torch.Size([4, 1 + 4, 64])]  # class token + 25% of 16 patches
    assert out["pred"].shape == (4, 16, 192) and out["mask"].sum().item() == 4 * 12
    out["loss"].backward()
    assert mae.encoder.patch_embed.proj.weight.grad is not None
    assert mae.mask_token.grad is not None and mae.mask_token.grad.abs().sum() > 0


@pytest.mark.parametrize("vit", [{"reg_tokens": 4}, {"class_token": False, "global_pool": "avg"},
                                 {"patch_size": 4}, {"img_size": 48, "patch_size": 16}])
def test_geometry_comes_from_the_backbone(vit):
    mae = _mae(**vit)
    g = mae.geometry
    size = vit.get("img_size", 32)
    assert g.num_patches == (size // vit.get("patch_size", 8)) ** 2
    assert g.num_prefix_tokens == (0 if vit.get("class_token") is False else 1) + vit.get("reg_tokens", 0)
    out = mae({"image": torch.randn(2, 3, size, size)})
    assert out["pred"].shape == (2, g.num_patches, g.patch_size[0] * g.patch_size[1] * 3)
    assert torch.isfinite(out["loss"])


def test_non_vit_backbone_is_refused_clearly():
    with pytest.raises(TypeError, match="not a timm VisionTransformer"):
        MAE(timm.create_model("resnet18", num_classes=0))


def test_decoder_warmup_keeps_the_encoder_frozen():
    mae = MAE(timm.create_model("vit_tiny_patch16_224", num_classes=0, **TINY_VIT), decoder_dim=32, decoder_depth=1,
              decoder_heads=2, head_warmup_steps=1)
    assert mae.touches_gradients
    for step, frozen in ((0, True), (1, False)):
        mae.zero_grad(set_to_none=True)
        mae({"image": torch.randn(2, 3, 32, 32)})["loss"].backward()
        mae.before_optimizer_step(step, 5)
        assert all(p.grad is None for p in mae.encoder.parameters()) == frozen
        assert mae.decoder_pred.weight.grad is not None
