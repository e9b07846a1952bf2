"""Random patch masking (MAE, He et al. 2022, sec. 3): keep a uniformly random subset per sample."""

from __future__ import annotations

import math

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


def block_mask(grid: tuple[int, int], num_masked: int, generator: torch.Generator | None = None,
               min_block: int = 4, aspect: tuple[float, float] = (0.3, 1 / 0.3), max_tries: int = 10) -> torch.Tensor:
    """Block-wise mask of about `num_masked` patches (BEiT, Bao et al. 2022; used by iBOT and DINOv2).

    Rectangles of at least `min_block` patches with a log-uniform aspect ratio are placed at random until
    the target is reached (or no rectangle fits any more); the rest is topped up with random single
    patches so the count is exact. Returns a bool `[H * W]` mask, True = masked.
    """
    h, w = grid
    num_masked = max(0, min(num_masked, h * w))
    mask = torch.zeros(h, w, dtype=torch.bool)
    rand = lambda: float(torch.rand((), generator=generator))  # noqa: E731
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
    while int(mask.sum()) < num_masked:
        left = num_masked - int(mask.sum())
        added = 0
        for _ in range(max_tries):
            area = min_block + rand() * (left - min_block) if left > min_block else left
            ratio = math.exp(log_lo + rand() * (log_hi - log_lo))
            bh, bw = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
            if not (1 <= bh <= h and 1 <= bw <= w):
                continue
            top, lft = int(rand() * (h - bh + 1)), int(rand() * (w - bw + 1))
            block = mask[top:top + bh, lft:lft + bw]
            new = int((~block).sum())
            if 0 < new <= left:
                block.fill_(True)
                added = new
                break
        if added == 0:  # nothing fits: finish with single patches
            free = torch.nonzero(~mask.view(-1)).squeeze(1)
            pick = free[torch.randperm(len(free), generator=generator)[:left]]
            mask.view(-1)[pick] = True
    return mask.view(-1)
