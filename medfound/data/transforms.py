"""Sample -> tensors: modality-aware intensity preprocessing, then an augmentation preset.

A transform takes the decoded sample (`image`: PIL image or array, `meta`, `masks`) and returns
`{"image": [3, S, S] tensor}` (plus `"crops": [...]` for multi-crop). Every modality ends as 3 channels
so one backbone serves them all. The data loaders ask for unnormalised output (`normalize=False`):
8-bit sources stay uint8 through augmentation and batching and are normalised by `Normalize` after the
batch reaches the device, so workers pass 4x smaller batches (this, not decoding, was the bottleneck of
a 224-px pipeline on CPU: see benchmarks/data_throughput.py). Windowed 16-bit and float sources come out
as float in [0, 1].

Preprocessing (`to_unit_image`), before any augmentation, to a float `[3, H, W]` tensor in [0, 1]:
- 8-bit grey or RGB: /255, grey repeated to 3 channels.
- DICOM (meta["dicom"], stored values kept at full depth by ingest): modality values
  `(stored + shift) * slope + intercept` (Hounsfield units for CT), then a window: a named preset
  (`WINDOWS`: lung, mediastinum, bone, brain, abdomen), or the file's own window, or, without one, the
  0.5-99.5 percentile range; MONOCHROME1 inverted so bone is bright in every radiograph.
- Other 16-bit / signed / float 2-D arrays (volume slices): the preset window when given, else the
  0.5-99.5 percentile range.
- Colour fundus (`fundus_crop`): crop to the field of view (the stored `fov` mask, else detected).

Physical pixel size (`spacing_mm`, data.spacing_mm; radiographs, mammograms): each image is resampled from its own
pixel spacing (DICOM PixelSpacing / ImagerPixelSpacing, `shard images --spacing-mm` or its table column; both axes
separately) to `spacing_mm`, then fitted to an `img_size` square field without rescaling: zero-padded where smaller
and cropped where larger (at the centre in evaluation, at a random place in training). The network so always sees a
field `img_size * spacing_mm` mm wide at one mm/px, whatever the scanner; the augmentation preset then runs on that
field. Without it every image is resized to `img_size` whole, so its mm/px follows its own size.

Augmentation presets (torchvision v2 on tensors):
- `none`: resize to `img_size`.            - `light`: RandomResizedCrop(0.8-1) + horizontal flip.
- `mae`: RandomResizedCrop(0.2-1) + horizontal flip, the MAE view (He et al. 2022).
- `he`: H&E tiles: RandomResizedCrop(0.6-1), random 90° rotation, horizontal and vertical flips and HED
  stain jitter (Tellez et al. 2018) in the Ruifrok-Johnston stain space.
- `dino`: DINOv2 multi-crop (Oquab et al. 2023): `global_crops` views at img_size (scale 0.32-1) and
  `local_crops` views at `local_size` (scale 0.05-0.32) with colour jitter, greyscale, blur and
  solarisation; returned as `image` (first global view) and `crops` (globals first, then locals).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2 as T

WINDOWS = {"lung": (-600.0, 1500.0), "mediastinum": (50.0, 350.0), "bone": (400.0, 1800.0), "brain": (40.0, 80.0),
           "abdomen": (40.0, 400.0)}  # (centre, width) in Hounsfield units
from medfound.config.data import AUGMENT_PRESETS as AUGMENTS  # noqa: E402  (the names the schema accepts)
from medfound.config.data import MultiCropConfig  # noqa: E402
from medfound.data.pipeline import MissingMember  # noqa: E402
from medfound.data.scale import pixel_spacing  # noqa: E402
from medfound.data.fundus import crop_to_fov, detect_fov  # noqa: E402
_BICUBIC = T.InterpolationMode.BICUBIC

# Ruifrok & Johnston (2001) stain vectors for haematoxylin, eosin and DAB, rows = stains, cols = RGB
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)


def window_unit(values: np.ndarray, window: Optional[tuple[float, float]]) -> np.ndarray:
    """Linear window (centre, width) -> [0, 1]; without a window, the 0.5-99.5 percentile range."""
    if window is not None:
        c, w = window
        lo, hi = c - w / 2.0, c + w / 2.0
    else:
        lo, hi = (float(x) for x in np.percentile(values, [0.5, 99.5]))
    return np.clip((values - lo) / max(hi - lo, 1e-6), 0.0, 1.0)


def resize_image(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`[C, H, W]` -> `[C, *size]`, bilinear with antialiasing when shrinking; uint8 stays uint8."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    y = torch.nn.functional.interpolate(x.float()[None], size=size, mode="bilinear", antialias=shrink,
                                        align_corners=False)[0]
    return y.round().clamp(0, 255).to(torch.uint8) if x.dtype == torch.uint8 else y


def to_spacing(x: torch.Tensor, spacing: tuple[float, float], target: float) -> torch.Tensor:
    """Resample `[C, H, W]` with (row, column) pixel spacing `spacing` mm to `target` mm per pixel on both axes."""
    h, w = x.shape[-2:]
    return resize_image(x, (max(1, round(h * spacing[0] / target)), max(1, round(w * spacing[1] / target))))


def fit_field(x: torch.Tensor, size: int, train: bool) -> torch.Tensor:
    """`[C, H, W]` -> `[C, size, size]` without rescaling: zero padding where the image is smaller (centred), a crop
    where it is larger (centred in evaluation, at a random offset from torch's RNG in training)."""
    out = x
    for dim in (-2, -1):
        n = out.shape[dim]
        if n > size:
            start = int(torch.randint(0, n - size + 1, ())) if train else (n - size) // 2
            out = out.narrow(dim, start, size)
    h, w = out.shape[-2:]
    if (h, w) != (size, size):
        top, left = (size - h) // 2, (size - w) // 2
        out = torch.nn.functional.pad(out, (left, size - w - left, top, size - h - top))
    return out.contiguous()


def to_unit_image(image: Any, meta: Optional[dict] = None, window: Optional[str] = None,
                  fov: Optional[Any] = None, fundus_crop: bool = False) -> torch.Tensor:
    """Any stored 2-D image -> float `[3, H, W]` in [0, 1] (see the module docstring)."""
    meta = meta or {}
    if window is not None and window not in WINDOWS and window != "file":
        raise ValueError(f"unknown window {window!r}: choose {', '.join(WINDOWS)} or file")
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[-1] not in (1, 3, 4):
        raise ValueError(f"a 3-D array of shape {a.shape} reached a 2-D transform: use a 3-D recipe for volumes")
    dicom = meta.get("dicom")
    if a.dtype == np.uint8 and not (dicom and dicom.get("invert")):
        x = a.astype(np.float32) / 255.0
    else:
        v = a.astype(np.float32)
        if dicom:
            v = (v + dicom.get("shift", 0)) * dicom["rescale"][0] + dicom["rescale"][1]
            win = WINDOWS.get(window or "") or (tuple(dicom["window"]) if dicom.get("window") else None)
            x = window_unit(v, win)
            if dicom.get("invert"):
                x = 1.0 - x
        else:
            x = window_unit(v, WINDOWS.get(window or ""))
    if x.ndim == 3 and x.shape[-1] == 4:
        x = x[..., :3]
    if fundus_crop:
        mask = np.asarray(fov) > 0 if fov is not None else detect_fov((x * 255).astype(np.uint8))
        x, _ = crop_to_fov(x, mask)
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
    return t.expand(3, -1, -1).contiguous() if t.shape[0] == 1 else t


def to_image_tensor(image: Any, meta: Optional[dict] = None, window: Optional[str] = None,
                    fov: Optional[Any] = None, fundus_crop: bool = False) -> torch.Tensor:
    """Like `to_unit_image`, but 8-bit images that need no intensity processing stay uint8 `[3, H, W]`
    (0-255), so the geometric augmentations run on torch's fast uint8 kernels; `Normalize` scales them."""
    a = np.asarray(image)
    dicom = (meta or {}).get("dicom")
    if a.dtype == np.uint8 and not (dicom and dicom.get("invert")) and not fundus_crop and \
            (a.ndim == 2 or a.ndim == 3 and a.shape[-1] in (1, 3)):
        t = torch.from_numpy(np.array(a, copy=True))  # writable: a PIL-backed array is read-only
        if t.ndim == 2 or t.shape[-1] == 1:
            return t.reshape(1, *t.shape[:2]).expand(3, -1, -1).contiguous()
        return t.permute(2, 0, 1)  # a channels-last view: torch's uint8 resize kernels take it without a copy
    return to_unit_image(image, meta, window, fov, fundus_crop)


def sample_spacing(sample: dict) -> tuple[float, float]:
    """The sample's (row, column) pixel spacing in mm, or MissingMember naming the sample and how to give it one."""
    spacing = pixel_spacing(sample.get("meta"))
    if spacing is None:
        key = sample.get("key") or (sample.get("meta") or {}).get("key") or "?"
        raise MissingMember(f"sample {key} has no pixel spacing, so data.spacing_mm cannot resample it: DICOM files "
                            "need PixelSpacing or ImagerPixelSpacing (`medfound shard dicom ... --require-spacing` "
                            "leaves out those without); for other images give `medfound shard images "
                            "--spacing-mm MM` (or a spacing_mm column in the --table); or drop data.spacing_mm")
    return spacing


class Normalize(torch.nn.Module):
    """(x - mean) / std for uint8 (scaled by 1/255) or float [0, 1] input, fused into one multiply-add."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.register_buffer("scale", 1.0 / std_t)
        self.register_buffer("shift", -torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1) / std_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[..., C, H, W]` uint8 (0-255) or float (0-1) -> normalised float."""
        scale = self.scale / 255.0 if x.dtype == torch.uint8 else self.scale
        return torch.addcmul(self.shift, x.float(), scale)


class ToFloat(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() / 255.0 if x.dtype == torch.uint8 else x


class HEDJitter(torch.nn.Module):
    """Stain augmentation for H&E (Tellez et al. 2018): in haematoxylin-eosin-DAB optical-density space,
    scale each stain by U(1-σ, 1+σ) and shift it by U(-σ, σ), then go back to RGB. Input/output [3, H, W] in [0, 1]."""

    def __init__(self, sigma: float = 0.05):
        super().__init__()
        self.sigma = sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        od = -torch.log(x.clamp_min(1e-6))                       # optical density per RGB channel
        stains = torch.einsum("chw,cs->shw", od, _HED_FROM_RGB)  # concentrations of H, E, D
        alpha = 1 + (torch.rand(3, 1, 1) * 2 - 1) * self.sigma
        beta = (torch.rand(3, 1, 1) * 2 - 1) * self.sigma
        stains = stains * alpha + beta
        return torch.exp(-torch.einsum("shw,sc->chw", stains, _RGB_FROM_HED)).clamp(0, 1)


class RandomRot90(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.rot90(x, int(torch.randint(0, 4, ())), dims=(-2, -1))


def _dino_view(size: int, scale: tuple[float, float], blur_p: float, solarize_p: float,
               blur_sigma: tuple[float, float], photometric: float) -> T.Compose:
    s = photometric
    colour = [T.RandomApply([T.ColorJitter(0.4 * s, 0.4 * s, 0.2 * s, 0.1 * s)], p=0.8),
              T.RandomGrayscale(p=0.2 * s)] if s > 0 else []
    # kept at p=0 on the first global view (solarize_p 0), so the random draws stay DINO's
    solarize = [T.RandomSolarize(0.5, p=solarize_p * s)] if s > 0 else []
    return T.Compose([
        T.RandomResizedCrop(size, scale=scale, interpolation=_BICUBIC, antialias=True),
        T.RandomHorizontalFlip(),
        *colour,
        T.RandomApply([T.GaussianBlur(9, sigma=blur_sigma)], p=blur_p),
        *solarize,
    ])


DINO_BLUR_SIGMA = (0.1, 2.0)  # px, DINO / DINOv2 for 224-px global views (and their 96-px local views)


def dino_blur_sigma(img_size: int) -> tuple[float, float]:
    """The Gaussian blur's sigma range of the `dino` views for global views of `img_size` px.

    DINO's range (0.1-2.0 px) was set for 224-px views, where 2 px is 1% of the width. On a 32-px image the same
    sigma is 6% of the width and, applied to every first global view, blurs away what a small image has; so below
    224 px the range shrinks in proportion to the image (the same share of detail removed), and at 224 px and above
    it is DINO's, unchanged. Local views use their global views' range, as in DINO.
    """
    f = min(1.0, img_size / 224)
    return (DINO_BLUR_SIGMA[0] * f, DINO_BLUR_SIGMA[1] * f)


def build_transform(augment: str, img_size: int, mean: Sequence[float], std: Sequence[float], train: bool = True,
                    *, window: Optional[str] = None, fundus_crop: bool = False, hed_sigma: float = 0.05,
                    multicrop: Optional[MultiCropConfig] = None, normalize: bool = True,
                    crop_scale: Optional[tuple[float, float]] = None, spacing_mm: Optional[float] = None
                    ) -> Callable[[Any], dict[str, torch.Tensor] | torch.Tensor]:
    """The transform for training (`augment` preset) or, with `train=False`, for evaluation.

    The returned callable takes a sample dict (`image`, `meta`, `masks`) and returns
    {"image": tensor[, "crops": [tensors]]}; given a bare PIL image it returns the image tensor.
    With `normalize=False` the output is left unnormalised (uint8 or float in [0, 1]) for `Normalize`
    to finish on the device. `spacing_mm`: resample each sample to that pixel spacing and fit it to the field
    first (module docstring); a sample without a pixel spacing raises MissingMember, naming it.
    """
    if augment not in AUGMENTS:
        raise ValueError(f"unknown augment preset {augment!r}: choose {', '.join(AUGMENTS)}")
    norm = Normalize(mean, std) if normalize else torch.nn.Identity()
    resize = T.Resize((img_size, img_size), interpolation=_BICUBIC, antialias=True)
    if not train or augment == "none":
        views = [T.Compose([resize, norm])]
    elif augment in ("light", "mae"):
        scale = crop_scale or ((0.8, 1.0) if augment == "light" else (0.2, 1.0))
        views = [T.Compose([T.RandomResizedCrop(img_size, scale=scale, interpolation=_BICUBIC, antialias=True),
                            T.RandomHorizontalFlip(), norm])]
    elif augment == "he":
        views = [T.Compose([T.RandomResizedCrop(img_size, scale=crop_scale or (0.6, 1.0), interpolation=_BICUBIC,
                                                antialias=True),
                            RandomRot90(), T.RandomHorizontalFlip(), T.RandomVerticalFlip(), ToFloat(),
                            HEDJitter(hed_sigma), norm])]
    elif augment == "dino":
        mc, sigma = multicrop or MultiCropConfig(), dino_blur_sigma(img_size)
        views = [T.Compose([_dino_view(img_size, (0.32, 1.0), 1.0 if i == 0 else 0.1, 0.0 if i == 0 else 0.2, sigma,
                                       mc.photometric), norm]) for i in range(mc.global_crops)]
        views += [T.Compose([_dino_view(mc.local_size, (0.05, 0.32), 0.5, 0.0, sigma, mc.photometric), norm])
                  for _ in range(mc.local_crops)]
    else:  # a preset named in config.data.AUGMENT_DESCRIPTIONS but not built here
        raise NotImplementedError(f"augment preset {augment!r} has no transform in medfound.data.transforms")

    def apply(sample: Any) -> Any:
        if isinstance(sample, Image.Image):
            return views[0](to_image_tensor(sample))
        fov = (sample.get("masks") or {}).get("fov") if fundus_crop else None  # masks decode lazily: ask only if used
        x = to_image_tensor(sample["image"], sample.get("meta"), window, fov, fundus_crop)
        if spacing_mm is not None:
            x = fit_field(to_spacing(x, sample_spacing(sample), spacing_mm), img_size, train)
        out = [v(x) for v in views]
        return {"image": out[0], "crops": out} if len(out) > 1 else {"image": out[0]}

    apply.views = views  # type: ignore[attr-defined]  # one transform per view, for inspection
    return apply
