"""Attention heatmaps: each tile's MIL attention painted over the slide thumbnail.

Attention weights of one slide are turned into percentiles (rank / N), as is usual for ABMIL/CLAM heatmaps, so the
colour scale does not depend on the bag's length; red = the tiles that drove the slide's prediction.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from medfound.io import atomic_write_bytes

# blue -> cyan -> yellow -> red (a perceptually ordered ramp; no matplotlib needed)
_ANCHORS = np.array([[0.0, 0, 0, 160], [0.35, 0, 190, 255], [0.65, 255, 230, 0], [1.0, 220, 0, 0]])


def colormap(values: np.ndarray) -> np.ndarray:
    """values in [0, 1] `[...]` -> uint8 RGB `[..., 3]`."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0, 1)
    rgb = [np.interp(v, _ANCHORS[:, 0], _ANCHORS[:, c]) for c in (1, 2, 3)]
    return np.stack(rgb, axis=-1).round().astype(np.uint8)


def attention_heatmap(thumbnail: Image.Image, coords: np.ndarray, attention: np.ndarray, tile_extent: int,
                      downsample: float, alpha: float = 0.5) -> Image.Image:
    """Blend per-tile attention over `thumbnail`.

    Args:
        thumbnail: the slide at `downsample` x below level 0 (the bag folder's `<slide>.thumb.png`).
        coords: `[N, 2]` level-0 x, y of each tile's top-left corner.
        attention: `[N]` the tiles' attention weights.
        tile_extent: a tile's side in level-0 pixels.
    """
    coords, attention = np.asarray(coords), np.asarray(attention, dtype=np.float64)
    if len(coords) != len(attention):
        raise ValueError(f"{len(coords)} tile coordinates but {len(attention)} attention weights")
    base = np.asarray(thumbnail.convert("RGB"), dtype=np.float64)
    rank = np.argsort(np.argsort(attention)) / max(1, len(attention) - 1)
    colour = colormap(rank)
    out = base.copy()
    side = max(1, round(tile_extent / downsample))
    for (x, y), c in zip(coords, colour):
        x0, y0 = round(x / downsample), round(y / downsample)
        region = out[y0:y0 + side, x0:x0 + side]
        region[:] = (1 - alpha) * base[y0:y0 + side, x0:x0 + side] + alpha * c
    return Image.fromarray(out.round().astype(np.uint8))


def save_heatmap(bag_dir: Path, record: dict, attention: np.ndarray, coords: np.ndarray, out: Path) -> Path:
    """The heatmap of one slide of a bag folder (its record in bags.json) -> `out` PNG."""

    thumb = Image.open(Path(bag_dir) / record["thumbnail"])
    image = attention_heatmap(thumb, coords, attention, record["tile_extent"], record["thumbnail_downsample"])
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(out, buf.getvalue())
    return out
