"""Training pictures (`trainer.visualize_every`): each segmenting task draws its batch as rows of
image | ground truth | prediction, the masks painted over the image, so a run's logs/images/ show what it learns.

Volumes are drawn at their middle slice along the last axis. Pixel values are scaled per image to its own range (the
batch is normalised on the device); class k is painted in PALETTE[k - 1] at half opacity, background left bare.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

PALETTE = np.array([(255, 64, 64), (64, 200, 255), (255, 210, 0), (120, 255, 120), (255, 120, 255), (255, 150, 60)],
                   dtype=np.float64)


def _plane(t: torch.Tensor) -> torch.Tensor:
    """`[C, *S]` -> `[C, H, W]` (the middle slice of a volume along its last axis)."""
    return t[..., t.shape[-1] // 2] if t.ndim == 4 else t


def titled(grid, titles: list[str], min_panel: int = 160):
    """A grid of equal panels (`len(titles)` columns) enlarged by a whole factor (nearest, so pixels stay sharp)
    until a panel is at least `min_panel` px wide, with a white header naming each column."""
    from PIL import Image, ImageDraw

    cols = len(titles)
    panel = grid.width // cols
    factor = max(1, -(-min_panel // max(panel, 1)))
    big = grid.resize((grid.width * factor, grid.height * factor), Image.NEAREST).convert("RGB")
    header = 18
    out = Image.new("RGB", (big.width, big.height + header), (255, 255, 255))
    out.paste(big, (0, header))
    draw = ImageDraw.Draw(out)
    width = panel * factor
    for i, title in enumerate(titles):
        left, _, right, _ = draw.textbbox((0, 0), title)
        draw.text((i * width + max(2, (width - (right - left)) // 2), 3), title, fill=(0, 0, 0))
    return out


def overlay_rows(images: torch.Tensor, *label_maps: torch.Tensor, n: int = 4,
                 boxes: Optional[torch.Tensor] = None, titles: Optional[list[str]] = None):
    """A PIL image, one row per sample (at most `n`): the image, then the image with each label map painted over it;
    with `titles` (one per column) enlarged and labelled (`titled`).

    images `[B, C, *S]` (any range); label_maps `[B, *S]` or `[B, 1, *S]` integer class maps; boxes `[B, 4]` xyxy in
    pixels, outlined on every panel."""
    from PIL import Image, ImageDraw

    rows = []
    for i in range(min(n, images.shape[0])):
        x = _plane(images[i].detach().float().cpu())
        x = (x - x.min()) / (x.max() - x.min() + 1e-6)
        rgb = (x.expand(3, -1, -1) if x.shape[0] == 1 else x[:3]).permute(1, 2, 0).numpy() * 255
        panels = [rgb]
        for labels in label_maps:
            lab = labels[i].detach().cpu()
            lab = _plane(lab if lab.ndim == images[i].ndim else lab[None])[0].numpy().astype(np.int64)
            painted = rgb.copy()
            for k in np.unique(lab[lab > 0]):
                where = lab == k
                painted[where] = 0.5 * painted[where] + 0.5 * PALETTE[(int(k) - 1) % len(PALETTE)]
            panels.append(painted)
        row = Image.fromarray(np.concatenate(panels, axis=1).round().clip(0, 255).astype(np.uint8))
        if boxes is not None:
            draw, width = ImageDraw.Draw(row), rgb.shape[1]
            b = [float(v) for v in boxes[i].detach().cpu()]
            for p in range(len(panels)):
                draw.rectangle([b[0] + p * width, b[1], b[2] + p * width, b[3]], outline=(255, 255, 0), width=1)
        rows.append(np.asarray(row))
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    return titled(grid, titles) if titles else grid
