"""Image -> tensor presets.

Every preset takes a PIL image of any mode (grey radiographs, RGB fundus and H&E) and returns a
float tensor `[3, img_size, img_size]`, normalised with the recipe's mean/std: grey images are
repeated to three channels so one backbone serves all modalities.

- `mae`: RandomResizedCrop(scale 0.2-1) + horizontal flip, the MAE pretraining view (He et al. 2022).
- `light`: RandomResizedCrop(scale 0.8-1) + horizontal flip, for fine-tuning on small images.
- `none` / eval: resize to img_size only.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from PIL import Image
from torchvision.transforms import v2 as T

_SCALES = {"mae": (0.2, 1.0), "light": (0.8, 1.0)}


def build_transform(augment: str, img_size: int, mean: Sequence[float], std: Sequence[float],
                    train: bool = True) -> Callable[[Image.Image], torch.Tensor]:
    """The transform for training (`augment` preset) or, with `train=False`, for evaluation."""
    head: list = [T.ToImage()]
    if train and augment in _SCALES:
        geo = [T.RandomResizedCrop(img_size, scale=_SCALES[augment], interpolation=T.InterpolationMode.BICUBIC,
                                   antialias=True), T.RandomHorizontalFlip()]
    elif train and augment != "none":
        raise ValueError(f"unknown augment preset {augment!r}: choose mae, light or none")
    else:
        geo = [T.Resize((img_size, img_size), interpolation=T.InterpolationMode.BICUBIC, antialias=True)]
    tail = [T.ToDtype(torch.float32, scale=True), T.Normalize(mean=list(mean), std=list(std))]
    pipeline = T.Compose(head + geo + tail)

    def apply(img: Image.Image) -> torch.Tensor:
        if img.mode != "RGB":
            img = _to_rgb(img)
        return pipeline(img)

    return apply


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I", "F"):
        # 16-bit grey: stretch to 8 bits over the image's own range (windowing comes with DICOM ingest)
        import numpy as np
        a = np.asarray(img, dtype=np.float32)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo + 1e-6) * 255.0
        img = Image.fromarray(a.astype("uint8"))
    return img.convert("RGB")
