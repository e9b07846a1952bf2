"""TransUNet (Chen et al. 2021, arXiv:2102.04306): CNN skips + ViT encoder + cascaded upsampler (CUP).

The paper's hybrid feeds a ResNet-50's 1/16 feature map to the ViT. To put *any* pretrained medfound or
timm ViT behind it (whose patch embedding expects pixels), the CNN here runs beside the ViT instead: a timm
CNN (`head.cnn`, `features_only`) gives the skips at 1/2, 1/4 and 1/8 (every scale finer than the patch),
the ViT encodes the image at 1/p, and the cascaded upsampler goes from 1/p to full resolution, one 2x step per
level, concatenating the CNN skip wherever one exists at that scale: for p = 16 this is exactly the paper's
decoder (1/16 -> 1/8 + skip -> 1/4 + skip -> 1/2 + skip -> 1/1). The CNN trains with the decoder; the ViT
is tuned by the recipe's strategy.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from medfound.adapt.heads.segment import Segmenter
from medfound.adapt.heads.unetr import ViTEncoder, vit_segmenter


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _Up(nn.Module):
    """Bilinear 2x upsampling, concatenation with the skip (if any), two 3x3 conv-BN-ReLU (TransUNet's DecoderBlock)."""

    def __init__(self, cin: int, cout: int, skip: int):
        super().__init__()
        self.conv = nn.Sequential(_conv(cin + skip, cout), _conv(cout, cout))

    def forward(self, x: torch.Tensor, skip: Optional[torch.Tensor]) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv(x)


class TransUNet(nn.Module):
    """`[B, 3, H, W]` -> logits `[B, K, H, W]` (H, W multiples of the ViT patch).

    Args:
        encoder: the ViT encoder (2-D).
        out_channels: classes K.
        cnn: timm CNN name for the skip features (built from scratch; no download).
        decoder_channels: upsampler widths, coarse to fine; the last log2(patch) entries are used.
    """

    def __init__(self, encoder: ViTEncoder, out_channels: int, cnn: str = "resnet18",
                 decoder_channels: Sequence[int] = (256, 128, 64, 16)):
        super().__init__()
        import timm

        if encoder.spatial_dims != 2:
            raise ValueError("TransUNet is 2-D here; use head.type=unetr for volumes")
        self.encoder = encoder
        p = encoder.patch_size[-1]
        self.levels = n = max(1, round(math.log2(p)))
        if len(decoder_channels) < n:
            raise ValueError(f"head.decoder_channels={list(decoder_channels)} has {len(decoder_channels)} entries; a "
                             f"patch-{p} backbone needs {n} (one per 2x step)")
        widths = list(decoder_channels)[-n:]
        in_ch = encoder.vit.patch_embed.proj.in_channels
        probe = timm.create_model(cnn, features_only=True, pretrained=False, in_chans=in_ch)
        scales = {r: i for i, r in enumerate(probe.feature_info.reduction()) if r < 2 ** n}
        if not scales:
            raise ValueError(f"head.cnn={cnn} gives no feature map finer than 1/{2 ** n}")
        self.cnn = timm.create_model(cnn, features_only=True, pretrained=False, in_chans=in_ch,
                                     out_indices=tuple(sorted(scales.values())))
        self.skip_scales = [int(r) for r in self.cnn.feature_info.reduction()]
        skip_ch = dict(zip(self.skip_scales, self.cnn.feature_info.channels()))
        self.neck = _conv(encoder.embed_dim, 2 * widths[0])
        self.ups = nn.ModuleList()
        cin = 2 * widths[0]
        for step, cout in enumerate(widths):
            scale = 2 ** (n - step - 1)  # resolution after this step
            self.ups.append(_Up(cin, cout, skip_ch.get(scale, 0)))
            cin = cout
        self.out = nn.Conv2d(cin, out_channels, 3, padding=1)

    @property
    def divisor(self) -> tuple[int, ...]:
        return tuple(self.encoder.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        skips = dict(zip(self.skip_scales, self.cnn(x)))
        d = self.encoder(x, [self.encoder.depth - 1])[0]
        coarse = [s // 2 ** self.levels for s in size]
        if list(d.shape[2:]) != coarse:  # patch not a power of two
            d = F.interpolate(d, size=coarse, mode="bilinear", align_corners=False)
        d = self.neck(d)
        for step, up in enumerate(self.ups):
            scale = 2 ** (self.levels - step - 1)
            skip = skips.get(scale)
            if skip is not None and skip.shape[2:] != (d.shape[2] * 2, d.shape[3] * 2):
                skip = F.interpolate(skip, size=(d.shape[2] * 2, d.shape[3] * 2), mode="bilinear", align_corners=False)
            d = up(d, skip)
        logits = self.out(d)
        return logits if logits.shape[2:] == size else F.interpolate(logits, size=size, mode="bilinear",
                                                                     align_corners=False)


def build_transunet(recipe) -> Segmenter:
    """head.type=transunet: TransUNet over the recipe's ViT backbone (medfound.registry.HEADS)."""
    h = recipe.head
    return vit_segmenter(recipe, lambda enc, k: TransUNet(enc, k, cnn=h.cnn, decoder_channels=h.decoder_channels))
