"""Promptable segmentation over any timm ViT: a SAM-style prompt encoder and two-way mask decoder (MedSAM).

Implemented from the papers (Kirillov et al., "Segment Anything", ICCV 2023; Ma et al., "Segment anything in
medical images", Nature Communications 2024), not from their code:

- image encoder: the backbone's last block as a feature map `[B, E, h, w]` (`ViTEncoder`), then SAM's neck
  (1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d) to the decoder width C;
- prompt encoder: box corners and points as random Fourier features of their normalised coordinates (Tancik et
  al. 2020) plus a learnt embedding per role (top-left, bottom-right, foreground point, background point);
  a learnt "no mask" embedding is added to every image position (no dense prompt);
- mask decoder: output tokens (one mask token + the prompt tokens) and the image embedding attend to each other
  in `depth` two-way blocks (token self-attention; tokens -> image; MLP; image -> tokens), then a final
  tokens -> image attention; the image embedding is upsampled 4x by two transposed convolutions and the mask
  token, through a hypernetwork MLP, gives the per-pixel mask logits (dot product); bilinear upsampling to the
  input resolution.

One mask per box: `B` boxes over one image share one image encoding (`PromptSegmenter.embed` then `decode`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from medfound.adapt.heads.unetr import ViTEncoder
from medfound.backbones import create_backbone


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of `[B, C, H, W]`."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class FourierPositions(nn.Module):
    """Random Fourier features of (x, y) in [0, 1]: `[..., 2]` -> `[..., C]` (a fixed Gaussian matrix buffer)."""

    def __init__(self, dim: int, scale: float = 1.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"the prompt width must be even, got {dim}")
        self.register_buffer("gaussian", scale * torch.randn(2, dim // 2))

    def forward(self, xy: torch.Tensor) -> torch.Tensor:
        proj = 2 * math.pi * ((2 * xy - 1) @ self.gaussian.to(xy.dtype))
        return torch.cat([proj.sin(), proj.cos()], dim=-1)

    def grid(self, h: int, w: int) -> torch.Tensor:
        """Dense positional encoding of an h x w grid of cell centres: `[C, h, w]`."""
        dev = self.gaussian.device
        ys = (torch.arange(h, device=dev, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=dev, dtype=torch.float32) + 0.5) / w
        xy = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # [h, w, 2]
        return self(xy).permute(2, 0, 1)


class PromptEncoder(nn.Module):
    """Boxes `[B, 4]` (x0, y0, x1, y1 in input pixels) and/or points `[B, P, 2]` with labels `[B, P]` (1 foreground,
    0 background, -1 padding) -> sparse tokens `[B, T, C]`."""

    def __init__(self, dim: int):
        super().__init__()
        self.positions = FourierPositions(dim)
        self.corners = nn.Embedding(2, dim)      # top-left, bottom-right
        self.point_roles = nn.Embedding(2, dim)  # background, foreground
        self.padding_point = nn.Embedding(1, dim)
        self.no_mask = nn.Embedding(1, dim)      # dense embedding when no mask prompt is given

    def forward(self, size: tuple[int, int], boxes: Optional[torch.Tensor] = None,
                points: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        h, w = size
        scale = torch.tensor([w, h], dtype=torch.float32, device=self.corners.weight.device)
        tokens = []
        if points is not None:
            if labels is None or labels.shape != points.shape[:2]:
                raise ValueError("points [B, P, 2] need labels [B, P] (1 foreground, 0 background, -1 padding)")
            pe = self.positions((points.float() + 0.5) / scale)
            role = self.point_roles(labels.clamp(min=0).long())
            pad = (labels < 0)[..., None]
            tokens.append(torch.where(pad, self.padding_point.weight.expand_as(pe), pe + role))
        if boxes is not None:
            if boxes.dim() != 2 or boxes.shape[1] != 4:
                raise ValueError(f"boxes are [B, 4] (x0, y0, x1, y1), got shape {tuple(boxes.shape)}")
            corners = boxes.float().reshape(-1, 2, 2)
            tokens.append(self.positions((corners + 0.5) / scale) + self.corners.weight)
        if not tokens:
            raise ValueError("give a box or points: this model segments what a prompt points at")
        return torch.cat(tokens, dim=1)


class _Attention(nn.Module):
    """Multi-head attention with an optional reduced inner width (SAM's tokens <-> image attention uses C/2)."""

    def __init__(self, dim: int, heads: int, downsample: int = 1):
        super().__init__()
        inner = dim // downsample
        if inner % heads:
            raise ValueError(f"attention width {inner} is not divisible by {heads} heads")
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, inner), nn.Linear(dim, inner), nn.Linear(dim, inner)
        self.out = nn.Linear(inner, dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        def split(x):
            return x.reshape(x.shape[0], x.shape[1], self.heads, -1).transpose(1, 2)

        o = F.scaled_dot_product_attention(split(self.q(q)), split(self.k(k)), split(self.v(v)))
        return self.out(o.transpose(1, 2).flatten(2))


class TwoWayBlock(nn.Module):
    """Tokens attend to themselves, then to the image; an MLP on the tokens; then the image attends to the tokens.
    Positional encodings are added to queries and keys at every attention (not to values)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, skip_first_pe: bool = False):
        super().__init__()
        self.self_attn = _Attention(dim, heads)
        self.to_image = _Attention(dim, heads, downsample=2)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.ReLU(), nn.Linear(mlp_dim, dim))
        self.to_tokens = _Attention(dim, heads, downsample=2)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(4))
        self.skip_first_pe = skip_first_pe

    def forward(self, tokens, image, token_pe, image_pe):
        if self.skip_first_pe:
            tokens = self.self_attn(tokens, tokens, tokens)
        else:
            q = tokens + token_pe
            tokens = tokens + self.self_attn(q, q, tokens)
        tokens = self.norms[0](tokens)
        tokens = self.norms[1](tokens + self.to_image(tokens + token_pe, image + image_pe, image))
        tokens = self.norms[2](tokens + self.mlp(tokens))
        image = self.norms[3](image + self.to_tokens(image + image_pe, tokens + token_pe, tokens))
        return tokens, image


class MaskDecoder(nn.Module):
    """(image embedding `[B, C, h, w]`, its positions `[C, h, w]`, prompt tokens `[B, T, C]`) -> mask logits
    `[B, 1, 4h, 4w]`."""

    def __init__(self, dim: int = 256, depth: int = 2, heads: int = 8, mlp_dim: int = 2048):
        super().__init__()
        self.mask_token = nn.Embedding(1, dim)
        self.blocks = nn.ModuleList(TwoWayBlock(dim, heads, mlp_dim, skip_first_pe=i == 0) for i in range(depth))
        self.final_attn = _Attention(dim, heads, downsample=2)
        self.final_norm = nn.LayerNorm(dim)
        if dim % 8:
            raise ValueError(f"the decoder width must be divisible by 8, got {dim}")
        self.upscale = nn.Sequential(nn.ConvTranspose2d(dim, dim // 4, 2, stride=2), LayerNorm2d(dim // 4), nn.GELU(),
                                     nn.ConvTranspose2d(dim // 4, dim // 8, 2, stride=2), nn.GELU())
        self.hyper = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU(),
                                   nn.Linear(dim, dim // 8))

    def forward(self, image: torch.Tensor, image_pe: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        b, c, h, w = image.shape
        tokens = torch.cat([self.mask_token.weight.expand(b, -1, -1), prompts], dim=1)
        token_pe = tokens
        img = image.flatten(2).transpose(1, 2)                          # [B, hw, C]
        pe = image_pe.flatten(1).transpose(0, 1).unsqueeze(0)           # [1, hw, C]
        t = tokens
        for blk in self.blocks:
            t, img = blk(t, img, token_pe, pe)
        t = self.final_norm(t + self.final_attn(t + token_pe, img + pe, img))
        up = self.upscale(img.transpose(1, 2).reshape(b, c, h, w))      # [B, C/8, 4h, 4w]
        weights = self.hyper(t[:, 0])                                   # [B, C/8]
        return torch.einsum("bc,bchw->bhw", weights, up).unsqueeze(1)


class BoxPromptNet(nn.Module):
    """ViT encoder + neck + prompt encoder + mask decoder. `encoder.vit` is what the tuning strategies act on."""

    def __init__(self, vit: nn.Module, dim: int = 256, depth: int = 2, heads: int = 8, mlp_dim: int = 2048):
        super().__init__()
        self.encoder = ViTEncoder(vit, spatial_dims=2)
        e = self.encoder.embed_dim
        self.neck = nn.Sequential(nn.Conv2d(e, dim, 1, bias=False), LayerNorm2d(dim),
                                  nn.Conv2d(dim, dim, 3, padding=1, bias=False), LayerNorm2d(dim))
        self.prompt_encoder = PromptEncoder(dim)
        self.mask_decoder = MaskDecoder(dim, depth, heads, mlp_dim)


class PromptSegmenter(nn.Module):
    """Box (or point) prompted binary segmentation: image `[B, 3, H, W]` + one box per image `[B, 4]` -> mask logits
    `[B, 1, H, W]`. For several boxes over one image, `embed` once and `decode` each box."""

    def __init__(self, net: BoxPromptNet):
        super().__init__()
        self.net = net

    @property
    def encoder(self) -> nn.Module:
        return self.net.encoder

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """`[B, 3, H, W]` -> image embedding `[B, C, h, w]` plus the no-mask dense embedding."""
        last = len(self.net.encoder.vit.blocks) - 1 if hasattr(self.net.encoder.vit, "blocks") else \
            self.net.encoder.depth - 1
        feats = self.net.encoder(image, [last])[0]
        return self.net.neck(feats) + self.net.prompt_encoder.no_mask.weight[0][None, :, None, None]

    def decode(self, embedding: torch.Tensor, size: tuple[int, int], boxes: Optional[torch.Tensor] = None,
               points: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """embedding `[B, C, h, w]` (or `[1, C, h, w]`, shared by B prompts) -> logits `[B, 1, *size]`."""
        prompts = self.net.prompt_encoder(size, boxes, points, labels)
        if embedding.shape[0] == 1 and prompts.shape[0] > 1:
            embedding = embedding.expand(prompts.shape[0], -1, -1, -1)
        pe = self.net.prompt_encoder.positions.grid(*embedding.shape[-2:]).to(embedding.dtype)
        low = self.net.mask_decoder(embedding, pe, prompts)
        return F.interpolate(low, size=size, mode="bilinear", align_corners=False)

    def forward(self, image: torch.Tensor, boxes: Optional[torch.Tensor] = None, points: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.decode(self.embed(image), tuple(image.shape[-2:]), boxes, points, labels)


def build_prompt_segmenter(recipe) -> PromptSegmenter:
    """The recipe's box-prompt network over its backbone (`create_backbone`, pretrained weights when given)."""
    h = recipe.head
    vit = create_backbone(recipe.backbone, num_classes=0)
    if not hasattr(vit, "forward_intermediates") or not hasattr(vit, "patch_embed"):
        raise ValueError(f"head.type=box_prompt needs a timm ViT backbone, got {type(vit).__name__}")
    return PromptSegmenter(BoxPromptNet(vit, dim=h.dim, depth=h.depth, heads=h.heads, mlp_dim=h.mlp_dim))
