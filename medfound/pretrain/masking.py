"""Random patch masking (MAE, He et al. 2022, sec. 3): keep a uniformly random subset per sample."""

from __future__ import annotations

import torch


def random_masking(batch: int, num_patches: int, mask_ratio: float, device: torch.device | None = None,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample which patches each image keeps.

    Returns:
        keep: `[B, K]` indices of kept patches (K = round(N * (1 - mask_ratio)), at least 1), ascending.
        mask: `[B, N]` float, 1 where the patch is masked (to reconstruct), 0 where kept.
        restore: `[B, N]` permutation that puts `[kept..., masked...]` tokens back into patch order.
    """
    n_keep = max(1, int(round(num_patches * (1.0 - mask_ratio))))
    noise = torch.rand(batch, num_patches, device=device, generator=generator)
    order = noise.argsort(dim=1)                 # random permutation per sample
    keep = order[:, :n_keep].sort(dim=1).values  # ascending keeps the encoder's token order stable
    masked = order[:, n_keep:].sort(dim=1).values
    shuffled = torch.cat([keep, masked], dim=1)
    restore = shuffled.argsort(dim=1)
    mask = torch.ones(batch, num_patches, device=device)
    mask.scatter_(1, keep, 0.0)
    return keep, mask, restore
