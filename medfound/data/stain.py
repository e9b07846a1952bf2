"""Stain normalisation for H&E (`data.stain_normalize`): a per-image domain-adaptation step.

Slides from different hospitals differ in stain colour (protocol, scanner, fading); mapping every image to one
reference stain basis removes much of that site signature. This uses MONAI's Macenko implementation
(`NormalizeHEStains`, Macenko et al. 2009: optical density, the H and E vectors from the extreme angles of the
tissue pixels' plane, concentrations rescaled to the reference maxima), with MONAI's reference stain matrix.

The result of an image is deterministic, so it is cached per sample key in each worker (a 1000x1000 tile costs about
0.5 s; training cuts several crops from each decoded tile and revisits it every epoch). Images without enough
tissue for the estimate (MONAI raises) pass through unchanged.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

import numpy as np
from PIL import Image


class StainNormalized:
    """Wraps a sample transform: the sample's 8-bit RGB image is stain-normalised first."""

    def __init__(self, transform: Callable[[dict], Any], cache_size: int = 256):
        self.transform, self.cache_size = transform, cache_size
        self._cache: OrderedDict[str, Image.Image] = OrderedDict()
        self._norm = None

    def normalise(self, image: Any, key: str) -> Image.Image:
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        if self._norm is None:
            from monai.apps.pathology.transforms import NormalizeHEStains

            self._norm = NormalizeHEStains()
        a = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
        if a.ndim != 3 or a.shape[-1] != 3 or a.dtype != np.uint8:
            raise ValueError(f"sample {key}: data.stain_normalize needs 8-bit RGB H&E images, got an array of shape "
                             f"{a.shape} and dtype {a.dtype}; turn it off for this modality")
        try:
            out = Image.fromarray(np.ascontiguousarray(self._norm(a)))
        except ValueError:  # too little tissue to estimate the stain vectors: keep the image as it is
            out = Image.fromarray(a)
        self._cache[key] = out
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return out

    def __call__(self, sample: dict) -> Any:
        key = str(sample.get("key") or "?")
        return self.transform(dict(sample, image=self.normalise(sample["image"], key)))
