"""Attention-based multiple-instance learning (Ilse, Tomczak & Welling, ICML 2018) over padded bags.

A whole-slide image is a bag of tile embeddings `h_k` (from a frozen backbone, `medfound extract`). Gated attention
scores every tile, `a_k = softmax_k(w^T (tanh(V h_k) * sigmoid(U h_k)))`, and the slide embedding is the weighted
mean `z = sum_k a_k h_k`; a linear layer classifies `z`. The attention weights are the heatmap.

Bags of different lengths are padded into one batch `[B, N, D]` with a boolean mask `[B, N]` (True = a real tile):
padded positions get attention exactly 0 and their features are zeroed before any arithmetic, so a padded bag gives
the same output as the bag alone, whatever the padding holds (CLAM and the reference ABMIL code train one bag at a
time for want of this).
"""

from __future__ import annotations

import torch
import torch.nn as nn


class GatedAttentionMIL(nn.Module):
    """ABMIL with gated attention.

    Args:
        in_dim: tile feature width D (the backbone's `num_features`).
        num_classes: slide classes (outputs; multi-label: findings).
        hidden_dim: width of the tile embedding before attention (Ilse et al.: 500; CLAM-style: 512/256).
        attention_dim: width of the attention network (Ilse et al.: 128).
        dropout: dropout on the tile embeddings.
    """

    def __init__(self, in_dim: int, num_classes: int, hidden_dim: int = 256, attention_dim: int = 128,
                 dropout: float = 0.25):
        super().__init__()
        self.in_dim, self.num_classes = in_dim, num_classes
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.attention_v = nn.Linear(hidden_dim, attention_dim)
        self.attention_u = nn.Linear(hidden_dim, attention_dim)
        self.attention_w = nn.Linear(attention_dim, 1)
        self.classifier = nn.Linear(hidden_dim, num_classes)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """features `[B, N, D]`, mask bool `[B, N]` (None: no padding) -> (logits `[B, K]`, attention `[B, N]`)."""
        if features.dim() != 3:
            raise ValueError(f"bags are [B, N, D] feature tensors, got shape {tuple(features.shape)}")
        if features.shape[-1] != self.in_dim:
            raise ValueError(f"bag features are {features.shape[-1]}-d but this head was built for {self.in_dim}-d "
                             "features: extract the bags with the same backbone")
        if mask is None:
            mask = torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)
        if not bool(mask.any(dim=1).all()):
            raise ValueError("a bag in the batch has no tiles")
        features = features.masked_fill(~mask[..., None], 0.0)  # junk (even NaN) in the padding never propagates
        h = self.embed(features)
        scores = self.attention_w(torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h))).squeeze(-1)
        attention = torch.softmax(scores.float().masked_fill(~mask, float("-inf")), dim=1).to(h.dtype)
        slide = torch.einsum("bn,bnd->bd", attention, h.masked_fill(~mask[..., None], 0.0))
        return self.classifier(slide), attention


def build_abmil(recipe, feature_dim: int, num_classes: int) -> GatedAttentionMIL:
    """head.type=abmil: the gated-attention head over `feature_dim`-d tile features (medfound.registry.HEADS)."""
    h = recipe.head
    return GatedAttentionMIL(feature_dim, num_classes, hidden_dim=h.hidden_dim, attention_dim=h.attention_dim,
                             dropout=h.dropout)
