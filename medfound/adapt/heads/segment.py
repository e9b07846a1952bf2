"""Segmentation networks from a recipe: ViT heads (UNETR, TransUNet) over a backbone, or MONAI's CNNs.

Every network is wrapped in `Segmenter`, which takes any input size: it pads each spatial edge up to the
network's divisor (the ViT patch, or 2^levels for a U-Net; zeros, i.e. the normalised mean) and crops the
logits back, so `[B, C, *S]` -> `[B, K, *S]` for every S. The CNN baselines come from MONAI:
- `unet`: `monai.networks.nets.UNet` (residual units; with segment.spatial_dims=3 this is the 3-D U-Net),
- `attention_unet`: `monai.networks.nets.AttentionUnet` (Oktay et al. 2018),
- `vnet`: `monai.networks.nets.VNet` (Milletari et al. 2016; volumes).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from medfound.config import FinetuneRecipe
from medfound.registry import HEADS


class Segmenter(nn.Module):
    """Pads input to `divisor` per spatial axis, runs `net`, crops the logits back to the input size.

    `net.encoder` (when present) is the ViT encoder the tuning strategies act on.
    """

    def __init__(self, net: nn.Module, divisor: tuple[int, ...]):
        super().__init__()
        self.net = net
        self.divisor = tuple(int(d) for d in divisor)

    @property
    def encoder(self) -> Optional[nn.Module]:
        return getattr(self.net, "encoder", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x `[B, C, *S]` -> logits `[B, K, *S]`."""
        size = x.shape[2:]
        if len(size) != len(self.divisor):
            raise ValueError(f"this network segments {len(self.divisor)}-D input [B, C, *S]; got shape {tuple(x.shape)}")
        pad = [(-s) % d for s, d in zip(size, self.divisor)]
        if any(pad):
            x = F.pad(x, [v for p in reversed(pad) for v in (p // 2, p - p // 2)])
        logits = self.net(x)
        if any(pad):
            logits = logits[(slice(None), slice(None)) + tuple(slice(p // 2, p // 2 + s) for p, s in zip(pad, size))]
        return logits


def in_channels(spatial_dims: int) -> int:
    """2-D images reach the networks as 3 channels (every modality, as for classification); volumes as 1."""
    return 3 if spatial_dims == 2 else 1


def build_segmenter(recipe: FinetuneRecipe) -> Segmenter:
    """The recipe's segmentation network: the builder registered for `head.type` (medfound.registry.HEADS)."""
    entry = HEADS.get(recipe.head.type)
    if not entry.config.needs_segment:
        raise ValueError(f"head.type={recipe.head.type} is a {entry.config.task} head, not a segmentation network")
    return entry.load()(recipe)


def build_unet(recipe: FinetuneRecipe) -> Segmenter:
    """MONAI's residual U-Net (`unet`) or Attention U-Net (`attention_unet`), from scratch."""
    from monai.networks.nets import AttentionUnet, UNet

    head, seg = recipe.head, recipe.segment
    sd, k = seg.spatial_dims, seg.num_classes
    cin = in_channels(sd)
    strides = getattr(head, "strides", None) or [2] * (len(head.channels) - 1)
    per_axis = [[s] * sd if isinstance(s, int) else list(s) for s in strides]
    if any(len(s) != sd for s in per_axis):
        raise ValueError(f"head.strides={strides}: give one stride per axis ({sd}) or a single number per level")
    if head.type == "unet":
        net = UNet(sd, cin, k, channels=head.channels, strides=per_axis, num_res_units=head.num_res_units,
                   dropout=head.dropout)
    elif head.type == "attention_unet":
        net = AttentionUnet(sd, cin, k, channels=head.channels, strides=strides, dropout=head.dropout)
    else:
        raise ValueError(f"build_unet builds head.type unet or attention_unet, not {head.type}")
    return Segmenter(net, tuple(math.prod(s[a] for s in per_axis) for a in range(sd)))


def build_vnet(recipe: FinetuneRecipe) -> Segmenter:
    """MONAI's V-Net for volumes, from scratch; input edges are padded to multiples of 16."""
    from monai.networks.nets import VNet

    head, seg = recipe.head, recipe.segment
    net = VNet(spatial_dims=3, in_channels=in_channels(3), out_channels=seg.num_classes,
               dropout_prob_down=head.dropout or None, dropout_prob_up=(head.dropout or None, head.dropout))
    return Segmenter(net, (16,) * 3)
