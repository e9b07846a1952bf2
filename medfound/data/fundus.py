"""Colour fundus field of view (FOV): the bright disc of retina inside the camera's black surround.

`detect_fov` finds it without annotations: threshold the brightest channel (the surround is near black
in every channel), keep the largest connected region, fill its holes (dark vessels, the fovea) and smooth
its border. `crop_to_fov` crops an image and its masks to the FOV's bounding box, so the retina fills the
frame whatever the camera's field and border.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def detect_fov(image: np.ndarray, min_level: int = 12) -> np.ndarray:
    """Boolean FOV mask `[H, W]` of a uint8 RGB `[H, W, 3]` or grey `[H, W]` fundus photograph."""
    bright = image.max(axis=-1) if image.ndim == 3 else image
    level = max(min_level, 0.1 * float(np.percentile(bright, 99)))
    mask = bright > level
    labels, n = ndimage.label(mask)
    if n == 0:
        raise ValueError("no field of view found: the image is dark everywhere (is it a fundus photograph?)")
    sizes = ndimage.sum(mask, labels, index=np.arange(1, n + 1))
    mask = labels == (1 + int(np.argmax(sizes)))
    mask = ndimage.binary_fill_holes(mask)
    return ndimage.binary_opening(mask, structure=np.ones((5, 5)), iterations=1)


def fov_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) bounds of the mask, exclusive at the end."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def crop_to_fov(image: np.ndarray, mask: np.ndarray, *others: np.ndarray) -> tuple[np.ndarray, ...]:
    """Crop `image`, `mask` and any `others` (same height and width) to the FOV's bounding box."""
    top, bottom, left, right = fov_box(mask)
    return tuple(a[top:bottom, left:right] for a in (image, mask, *others))


def fov_diameter(mask: np.ndarray) -> int:
    """The field of view's diameter in pixels: the horizontal extent of the mask (fundus photographs are often
    cut at the top and bottom, never at the sides, so the width is the circle's diameter); 0 for an empty mask."""
    m = np.asarray(mask) > 0
    if m.ndim != 2 or not m.any():
        return 0
    cols = np.flatnonzero(m.any(0))
    return int(cols[-1] - cols[0] + 1)
