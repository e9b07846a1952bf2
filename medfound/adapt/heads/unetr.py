"""UNETR-style decoder over a timm ViT (Hatamizadeh et al., WACV 2022), for 2-D images and 3-D volumes.

`ViTEncoder` reads the geometry from the backbone (embedding width, patch size, prefix tokens, depth) and
returns feature maps of chosen blocks, `[B, D, *grid]`, each through the backbone's final norm (the scale its
pretraining objective saw at the output):
- 2-D: timm's own `forward_intermediates` (prefix tokens dropped, any image size with `dynamic_img_size`).
- 3-D: a Conv3d patch embedding inflated from the 2-D one (the RGB filters summed to one channel and spread
  over `depth_patch` slices, as I3D inflates 2-D filters; Carreira & Zisserman 2017) and a 3-D position
  embedding initialised from the 2-D grid, then the same timm blocks. The blocks keep their pretrained
  weights; only the embedding is new.

`UNETR` then builds, for a patch size p = 2^n, the decoder UNETR describes for p = 16: the deepest tapped
block is the bottleneck at 1/p; each shallower tap is brought by transposed convolutions to 1/2^l
(l = n-1 .. 1) and joined on the way up; a convolutional stem on the input gives the full-resolution skip.
Non-power-of-two patches (DINOv2's 14) decode on the nearest power-of-two grid and are resized at the end.
The decoder blocks are MONAI's (`UnetrBasicBlock`, `UnetrPrUpBlock`, `UnetrUpBlock`), not a copy.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from medfound.adapt.heads.segment import Segmenter, in_channels
from medfound.backbones import vit_geometry
from medfound.backbones import create_backbone


def default_indices(depth: int, taps: int) -> list[int]:
    """`taps` block indices evenly spaced over `depth` blocks, the last one the final block (12, 4 -> 2, 5, 8, 11);
    a backbone with fewer blocks than taps repeats some (2, 3 -> 0, 1, 1)."""
    step = depth / taps
    return [math.ceil(step * (i + 1) - 1e-9) - 1 for i in range(taps)]


class ViTEncoder(nn.Module):
    """Feature maps of a timm ViT's blocks, for 2-D images or (with a 3-D patch embedding) volumes.

    Args:
        vit: a timm VisionTransformer (the module LoRA and the tuning strategies act on: `self.vit`).
        spatial_dims: 2 or 3.
        in_channels: image channels for 3-D input (2-D uses the backbone's own patch embedding).
        depth_patch: 3-D patch extent along the first (slice) axis; default: the in-plane patch size.
    """

    def __init__(self, vit: nn.Module, spatial_dims: int = 2, in_channels: int = 1, depth_patch: Optional[int] = None):
        super().__init__()
        g = vit_geometry(vit)
        self.vit, self.spatial_dims = vit, spatial_dims
        self.embed_dim, self.num_prefix_tokens = g.embed_dim, g.num_prefix_tokens
        self.depth = len(vit.blocks)
        p = g.patch_size[0]
        self.patch_size = (depth_patch or p, p, p) if spatial_dims == 3 else tuple(g.patch_size)
        if spatial_dims == 3:
            w2 = vit.patch_embed.proj.weight.detach()                      # [D, 3, p, p]
            w3 = w2.sum(1, keepdim=True).unsqueeze(2).repeat(1, in_channels, self.patch_size[0], 1, 1)
            self.patch_embed3d = nn.Conv3d(in_channels, g.embed_dim, self.patch_size, self.patch_size)
            with torch.no_grad():
                self.patch_embed3d.weight.copy_(w3 / (self.patch_size[0] * in_channels))
                if vit.patch_embed.proj.bias is not None:
                    self.patch_embed3d.bias.copy_(vit.patch_embed.proj.bias.detach())
            pos = vit.pos_embed.detach()[:, vit.num_prefix_tokens if not getattr(vit, "no_embed_class", False) else 0:]
            self.pos_embed3d = nn.Parameter(pos.reshape(1, *g.grid_size, -1).permute(0, 3, 1, 2).contiguous())
            # the in-plane embedding is shared by all slices; a learnt slice-position embedding (zeros at the
            # start, resized to the number of slices) tells the blocks which slab a token comes from
            self.depth_embed = nn.Parameter(torch.zeros(1, g.embed_dim, 16))

    def forward(self, x: torch.Tensor, indices: Sequence[int]) -> list[torch.Tensor]:
        """x `[B, C, H, W]` or `[B, C, D, H, W]` -> one `[B, E, *grid]` map per index in `indices`."""
        unique = sorted(set(indices))
        if self.spatial_dims == 2:
            maps = self.vit.forward_intermediates(x, indices=unique, norm=True, intermediates_only=True,
                                                  output_fmt="NCHW")
            return [maps[unique.index(i)] for i in indices]
        t = self.patch_embed3d(x)                                           # [B, E, d, h, w]
        b, e, *grid = t.shape
        pos = F.interpolate(self.pos_embed3d, size=grid[1:], mode="bicubic", align_corners=False) \
            if list(self.pos_embed3d.shape[-2:]) != grid[1:] else self.pos_embed3d
        depth = F.interpolate(self.depth_embed, size=grid[0], mode="linear", align_corners=False)
        t = (t + pos.unsqueeze(2) + depth[..., None, None]).flatten(2).transpose(1, 2)  # [B, N, E]
        vit = self.vit
        prefix = []
        if getattr(vit, "cls_token", None) is not None:
            prefix.append(vit.cls_token.expand(b, -1, -1))
        if getattr(vit, "reg_token", None) is not None:
            prefix.append(vit.reg_token.expand(b, -1, -1))
        if prefix:
            t = torch.cat([*prefix, t], dim=1)
        t = vit.norm_pre(vit.patch_drop(vit.pos_drop(t)))
        maps = {}
        for i, blk in enumerate(vit.blocks):
            t = blk(t)
            if i in unique:
                maps[i] = vit.norm(t)[:, self.num_prefix_tokens:].transpose(1, 2).reshape(b, e, *grid)
            if i >= unique[-1]:
                break
        return [maps[i] for i in indices]


class UNETR(nn.Module):
    """UNETR decoder over `ViTEncoder` features: `[B, C, *S]` -> logits `[B, K, *S]` (S a multiple of the patch).

    Args:
        encoder: the ViT encoder.
        out_channels: classes K.
        feature_size: decoder width at full resolution (doubles per level; UNETR: 16).
        indices: blocks to tap, shallow to deep, one per 2x level (log2(patch) of them); default evenly spaced.
    """

    def __init__(self, encoder: ViTEncoder, out_channels: int, feature_size: int = 16,
                 indices: Optional[Sequence[int]] = None):
        super().__init__()
        from monai.networks.blocks import UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
        from monai.networks.blocks.dynunet_block import UnetOutBlock

        self.encoder = encoder
        sd, e, fs = encoder.spatial_dims, encoder.embed_dim, feature_size
        p = encoder.patch_size[-1]
        self.levels = n = max(1, round(math.log2(p)))
        self.indices = list(indices) if indices is not None else default_indices(encoder.depth, n)
        if len(self.indices) != n or not all(0 <= i < encoder.depth for i in self.indices):
            raise ValueError(f"head.indices={list(self.indices)}: a patch-{p} backbone needs {n} block indices in "
                             f"0..{encoder.depth - 1} (one per 2x level), shallow to deep")
        in_ch = encoder.patch_embed3d.in_channels if sd == 3 else encoder.vit.patch_embed.proj.in_channels
        norm = "instance"
        self.stem = UnetrBasicBlock(sd, in_ch, fs, kernel_size=3, stride=1, norm_name=norm, res_block=True)
        self.skips = nn.ModuleList(
            UnetrPrUpBlock(sd, e, fs * 2 ** level, num_layer=n - level - 1, kernel_size=3, stride=1,
                           upsample_kernel_size=2, norm_name=norm, conv_block=True, res_block=True)
            for level in range(1, n))
        self.ups = nn.ModuleList(
            UnetrUpBlock(sd, e if level == n - 1 else fs * 2 ** (level + 1), fs * 2 ** level, kernel_size=3,
                         upsample_kernel_size=2, norm_name=norm, res_block=True)
            for level in range(n))
        self.out = UnetOutBlock(sd, fs, out_channels)

    @property
    def divisor(self) -> tuple[int, ...]:
        return tuple(self.encoder.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        feats = self.encoder(x, self.indices)
        grid = feats[-1].shape[2:]
        fine = [g * 2 ** self.levels for g in grid]
        mode = "trilinear" if x.ndim == 5 else "bilinear"
        x_in = x if list(size) == fine else F.interpolate(x, size=fine, mode=mode, align_corners=False)
        skips = [self.stem(x_in)] + [blk(f) for blk, f in zip(self.skips, feats[:-1])]
        d = feats[-1]
        for level in reversed(range(self.levels)):
            d = self.ups[level](d, skips[level])
        logits = self.out(d)
        return logits if list(size) == fine else F.interpolate(logits, size=size, mode=mode, align_corners=False)


def build_unetr(recipe) -> Segmenter:
    """head.type=unetr: UNETR over the recipe's ViT backbone (medfound.registry.HEADS)."""
    h = recipe.head
    return vit_segmenter(recipe, lambda enc, k: UNETR(enc, k, feature_size=h.feature_size, indices=h.indices))


def vit_segmenter(recipe, decoder) -> Segmenter:
    """A ViT head: the recipe's backbone (built and loaded by `create_backbone`) as an encoder of 2-D or 3-D input,
    `decoder(encoder, num_classes)` on top; the divisor is the patch (at least 2 per level of upsampling)."""
    seg = recipe.segment
    sd = seg.spatial_dims
    args = {"dynamic_img_size": True}
    if sd == 2:
        args["img_size"] = tuple(seg.patch_size)  # the position embedding is resampled to the crop on load
    vit = create_backbone(recipe.backbone, num_classes=0, **args)
    encoder = ViTEncoder(vit, spatial_dims=sd, in_channels=in_channels(sd))
    net = decoder(encoder, seg.num_classes)
    p = encoder.patch_size
    return Segmenter(net, tuple(math.lcm(pi, 2 ** max(1, round(math.log2(pi)))) for pi in p))
