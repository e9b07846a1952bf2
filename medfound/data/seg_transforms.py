"""Segmentation samples -> tensors: image and mask transformed together.

Output of the transform (one sample):
- `image`: 2-D `[3, H, W]` (every modality as 3 channels, as for classification) or 3-D `[1, D, H, W]`;
  uint8 for `intensity=imagenet` on 8-bit images (normalised on the device by `Normalize`), else float,
  already normalised here (`zscore`: per image and channel, as nnU-Net does for non-CT data; `ct`: clip to
  the data set's 0.5-99.5 percentile range, then the data set's mean and std).
- `mask`: long `[1, *S]` class indices (binary masks: stored value > 0 is class 1).
- `roi`: bool `[1, *S]` when `segment.roi` names a mask (DRIVE's field of view): scoring is done inside it.
- `spacing`: (evaluation) the voxel spacing in mm when the sample's meta has `spacing_mm`, for HD95 in mm.

Evaluation with `segment.spacing` (or a 2-D `segment.scale` / `fov_diameter` / `mpp`) also returns `native_mask`
(and `native_roi`) on the image's own grid, with `spacing` its own spacing: the prediction, made on the resampled
grid, is mapped back and scored there, as nnU-Net scores its exported segmentations at the original spacing.

Training (`train=True`): an optional resampling of volumes to `segment.spacing`, then a random crop of
`segment.patch_size` (zero-padded when the image is smaller), centred on a random foreground pixel with
probability `foreground_fraction` (nnU-Net's oversampling, which matters for small structures), random flips
along every spatial axis, random 90-degree rotations in the image plane (square crops), and a random
brightness/contrast jitter. Evaluation (`train=False`) keeps the whole image: sliding-window inference covers it.
"""

from __future__ import annotations

import math

from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medfound.config import SegmentConfig
from medfound.data.pipeline import MissingMember
from medfound.data.transforms import WINDOWS, resize_image, to_image_tensor
from medfound.data.fundus import detect_fov, fov_diameter


def check_mask_members(manifest, names: Sequence[Optional[str]], what: str) -> None:
    """Before any sample is decoded: every mask member in `names` is among the shard set's recorded members
    (manifest.fields), else the error names the set, the member and the fix."""
    fields = manifest.fields
    if fields is None:  # older manifests do not record their members: the samples are checked as they are read
        return
    have = {f.split(".")[0] for f in fields}
    for name in names:
        if name is not None and name not in have:
            label = "field-of-view ('fov')" if name == "fov" else f"'{name}'"
            raise MissingMember(f"{what} has no {label} masks (its samples hold: {', '.join(sorted(fields))}): "
                                f"{missing_mask_fix(name)}")


def missing_mask_fix(name: str) -> str:
    """How to give a shard set the mask member `name`."""
    if name == "fov":
        return ("re-shard the set with a field-of-view mask: `medfound shard images ... --fov detect` finds it in "
                "each fundus photograph, or give a fov column in the --table")
    return f"shard the masks with the images (a {'mask' if name == 'mask' else 'mask_' + name} column in the --table)"


def _mask_array(sample: dict, name: str, key: str) -> np.ndarray:
    masks = sample.get("masks") or {}
    if name not in masks:
        what = "field-of-view ('fov')" if name == "fov" else f"'{name}'"
        raise MissingMember(f"sample {key} has no {what} mask (it has: {', '.join(masks) or 'none'}): "
                            f"{missing_mask_fix(name)}; or set segment.mask / segment.roi to one it has")
    return np.asarray(masks[name])


def class_indices(mask: np.ndarray, num_classes: int, key: str) -> np.ndarray:
    """Stored mask -> class indices: binary (num_classes=2) maps any value > 0 to 1; else values must be < K."""
    if mask.ndim == 3 and mask.shape[-1] in (3, 4) and mask.dtype == np.uint8:
        mask = mask[..., 0]
    if num_classes == 2:
        return (mask > 0).astype(np.int64)
    top = int(mask.max()) if mask.size else 0
    if top >= num_classes or (mask.size and int(mask.min()) < 0):
        raise ValueError(f"sample {key}: mask values span {int(mask.min())}..{top} but segment.num_classes="
                         f"{num_classes}; set segment.num_classes={top + 1} or fix the mask")
    return mask.astype(np.int64)


def _modality_values(image: Any, meta: dict) -> np.ndarray:
    """Raw intensities as float (DICOM rescaled to modality units, e.g. Hounsfield)."""
    a = np.asarray(image).astype(np.float32)
    dicom = meta.get("dicom")
    if dicom:
        a = (a + dicom.get("shift", 0)) * dicom["rescale"][0] + dicom["rescale"][1]
    return a


def image_tensor(sample: dict, seg: SegmentConfig, window: Optional[str] = None) -> torch.Tensor:
    """The sample's image as `[3, H, W]` (2-D) or `[1, D, H, W]` (3-D), normalised per `seg.intensity`
    (imagenet: left as uint8 or [0, 1] float for the device-side `Normalize`)."""
    meta = sample.get("meta") or {}
    if seg.spatial_dims == 3:
        a = np.asarray(sample["image"])
        if a.ndim != 3 or (a.dtype == np.uint8 and a.shape[-1] in (3, 4)):  # an RGB picture is not a volume
            raise ValueError(f"sample {sample.get('key')}: a 3-D recipe needs volumes (shard them with `medfound shard "
                             f"volumes --layout volume` or --layout patches), got an array of shape {a.shape}")
        x = torch.from_numpy(_modality_values(a, meta)).unsqueeze(0)
    elif seg.intensity == "imagenet":
        return to_image_tensor(sample["image"], meta, window)
    else:
        a = _modality_values(sample["image"], meta)
        x = torch.from_numpy(a)
        x = x.unsqueeze(0) if x.ndim == 2 else x[..., :3].permute(2, 0, 1)
    if seg.intensity == "ct":
        lo, hi = seg.clip
        x = (x.clamp(lo, hi) - seg.stats[0]) / max(seg.stats[1], 1e-6)
    else:  # zscore per image and channel (imagenet on volumes also lands here: no ImageNet statistics for MR)
        dims = tuple(range(1, x.ndim))
        x = (x - x.mean(dim=dims, keepdim=True)) / x.std(dim=dims, keepdim=True).clamp_min(1e-6)
    if seg.spatial_dims == 2 and x.shape[0] == 1:
        x = x.expand(3, -1, -1).contiguous()
    return x


def resample(image: torch.Tensor, masks: list[torch.Tensor], spacing: Sequence[float], target: Sequence[float]
             ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Resample `[C, *S]` image (linear) and masks (nearest) from voxel `spacing` to `target` spacing (mm)."""
    size = [max(1, round(n * s / t)) for n, s, t in zip(image.shape[1:], spacing, target)]
    if list(image.shape[1:]) == size:
        return image, masks
    mode = "trilinear" if len(size) == 3 else "bilinear"
    out = F.interpolate(image[None].float(), size=size, mode=mode, align_corners=False)[0]
    return out, [F.interpolate(m[None].float(), size=size, mode="nearest")[0].to(m.dtype) for m in masks]


def _crop_start(shape: Sequence[int], patch: Sequence[int], centre: Optional[Sequence[int]]) -> list[int]:
    starts = []
    for i, (n, p) in enumerate(zip(shape, patch)):
        hi = max(n - p, 0)
        if centre is not None:
            s = min(max(int(centre[i]) - p // 2, 0), hi)
        else:
            s = int(torch.randint(0, hi + 1, ()))
        starts.append(s)
    return starts


def random_crop(tensors: list[torch.Tensor], patch: Sequence[int], fg: Optional[torch.Tensor]) -> list[torch.Tensor]:
    """Crop every `[C, *S]` tensor at the same place to `patch` (zero-padding first where S < patch); centred on a
    random voxel of `fg` (`[*S]` bool) when given and non-empty."""
    shape = tensors[0].shape[1:]
    pad = [max(p - n, 0) for n, p in zip(shape, patch)]
    if any(pad):
        spec = [x for d in reversed(pad) for x in (d // 2, d - d // 2)]
        tensors = [F.pad(t, spec) for t in tensors]
        if fg is not None:
            fg = F.pad(fg, spec)
        shape = tensors[0].shape[1:]
    centre = None
    if fg is not None:
        idx = fg.nonzero()
        if len(idx):
            centre = idx[int(torch.randint(0, len(idx), ()))].tolist()
    starts = _crop_start(shape, patch, centre)
    sl = (slice(None),) + tuple(slice(s, s + p) for s, p in zip(starts, patch))
    return [t[sl] for t in tensors]


def image_scale(sample: dict, seg: SegmentConfig, key: str) -> Optional[float]:
    """The resize factor of one 2-D sample: segment.scale, or segment.fov_diameter over the diameter of the
    sample's field-of-view mask (`fundus.fov_diameter`), or the sample's recorded um/px over segment.mpp; None when
    none is set."""
    if seg.scale == "auto":  # chosen per image with the model (medfound.evaluate.segmentation.choose_scale)
        return None
    if seg.scale is not None:
        return float(seg.scale)
    if seg.mpp is not None:
        mpp = (sample.get("meta") or {}).get("mpp")
        if not mpp:
            raise MissingMember(f"sample {key} records no micrometres per pixel, so segment.mpp cannot resample it: "
                                "re-shard its set with `medfound shard images ... --mpp UM_PER_PX` (slide tiles from "
                                "`medfound shard wsi` carry it), or drop segment.mpp")
        return float(mpp) / seg.mpp
    if seg.fov_diameter is None:
        return None

    d = fov_diameter(_mask_array(sample, "fov", key))
    if d == 0:
        raise MissingMember(f"sample {key}: its field-of-view mask is empty, so segment.fov_diameter cannot scale it: "
                            f"{missing_mask_fix('fov')}")
    return seg.fov_diameter / d


def rescale(x: torch.Tensor, extra: list[torch.Tensor], factor: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Resize a 2-D image `[C, H, W]` by `factor` (bilinear with antialiasing; uint8 stays uint8) and its masks
    (`[1, H, W]`, nearest neighbour) to the same grid."""
    h, w = x.shape[-2:]
    size = (max(1, round(h * factor)), max(1, round(w * factor)))
    y = resize_image(x, size)
    masks = [F.interpolate(t[None].float(), size=size, mode="nearest-exact")[0].to(t.dtype) for t in extra]
    return y, masks


def simulate_low_resolution(x: torch.Tensor, keep: float) -> torch.Tensor:
    """A 2-D image `[C, H, W]` as if taken at `keep` times its resolution and upsampled to its grid: shrunk by
    `keep` (antialiased) and enlarged back, bilinear; the grid, and so every mask, is unchanged."""
    h, w = x.shape[-2:]
    return resize_image(resize_image(x, (max(1, round(h * keep)), max(1, round(w * keep)))), (h, w))


def build_seg_transform(seg: SegmentConfig, train: bool, window: Optional[str] = None,
                        predict: bool = False) -> Callable[[dict], Any]:
    """The sample -> {"image", "mask"[, "roi"]} transform for `seg` (see the module docstring); in training
    with `crops_per_image` > 1 it returns that many such dicts, cut from the one decoded image. `predict`: samples
    without masks (new studies, `medfound predict`) -> {"image", "native_size"}, the image resampled exactly as in
    evaluation, and the size of its own grid the prediction is mapped back to (a missing field-of-view mask for
    `segment.fov_diameter` is detected from the image, as `shard images --fov detect` does)."""
    if window is not None and window not in WINDOWS and window != "file":
        raise ValueError(f"unknown window {window!r}: choose {', '.join(WINDOWS)} or file")
    if train and seg.scale == "auto":
        raise ValueError("segment.scale=auto chooses the inference scale of a trained model (medfound evaluate / "
                         "predict); train at a number (segment.scale=0.5), with segment.random_scale for robustness")
    # randomness comes from torch's global RNG, as in torchvision's transforms: seeded per worker, and its state
    # is saved in checkpoints, so a resumed run draws the same crops

    def unlabelled(sample: dict) -> dict[str, torch.Tensor]:
        key = str(sample.get("key") or (sample.get("meta") or {}).get("key") or "?")
        x = image_tensor(sample, seg, window)
        size = tuple(x.shape[1:])
        masks = sample.get("masks") or {}
        if seg.fov_diameter is not None and "fov" not in masks:  # on the image's own grid, as a stored one is
            pixels = x if x.dtype == torch.uint8 else (x.float().clamp(0, 1) * 255).to(torch.uint8)
            fov = detect_fov(pixels.permute(1, 2, 0).numpy()).astype(np.uint8) * 255
            sample = {**sample, "masks": {**masks, "fov": fov}}
        spacing = (sample.get("meta") or {}).get("spacing_mm")
        own = spacing is not None and len(spacing) == seg.spatial_dims
        if seg.spacing is not None and own:
            x, _ = resample(x, [], spacing, seg.spacing)
        factor = image_scale(sample, seg, key)
        if factor is not None and abs(factor - 1.0) > 1e-6:
            x, _ = rescale(x, [], factor)
        out = {"image": x.contiguous(), "native_size": torch.tensor(size)}
        if own:  # the input's own voxel spacing (a volume's mask is written on its grid)
            out["spacing"] = torch.tensor(spacing, dtype=torch.float64)
        return out

    if predict:
        return unlabelled

    def apply(sample: dict) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        key = str(sample.get("key") or (sample.get("meta") or {}).get("key") or "?")
        x = image_tensor(sample, seg, window)
        m = torch.from_numpy(class_indices(_mask_array(sample, seg.mask, key), seg.num_classes, key))[None]
        if tuple(m.shape[1:]) != tuple(x.shape[1:]):
            raise ValueError(f"sample {key}: mask '{seg.mask}' is {tuple(m.shape[1:])} but the image is "
                             f"{tuple(x.shape[1:])}")
        extra = [m]
        if seg.roi is not None:
            extra.append(torch.from_numpy(_mask_array(sample, seg.roi, key) > 0)[None])
        spacing = (sample.get("meta") or {}).get("spacing_mm")
        native = None  # the masks on the image's own grid, where the model sees a resampled one
        if seg.spacing is not None and spacing is not None and len(spacing) == seg.spatial_dims:
            resampled, masks = resample(x, extra, spacing, seg.spacing)
            if resampled is not x:
                native, x, extra = extra, resampled, masks
        factor = image_scale(sample, seg, key)
        if train and seg.random_scale is not None:  # image, mask and FOV/ROI together, one draw per decoded image
            lo, hi = (math.log(v) for v in seg.random_scale)
            factor = (factor or 1.0) * math.exp(lo + float(torch.rand(())) * (hi - lo))
        if factor is not None and abs(factor - 1.0) > 1e-6:
            native = native or extra
            x, extra = rescale(x, extra, factor)
        if native is None and seg.spacing is not None and spacing is not None:
            spacing = seg.spacing  # (a no-op resample: the image is at the target spacing)
        if train:
            crops = [augment(x, extra) for _ in range(seg.crops_per_image)]
            return crops[0] if len(crops) == 1 else crops
        out = {"image": x.contiguous(), "mask": extra[0].contiguous()}
        if seg.roi is not None:
            out["roi"] = extra[1].contiguous()
        if native is not None:  # evaluation scores at the image's own size: the prediction is mapped back
            out["native_mask"] = native[0].contiguous()
            if seg.roi is not None:
                out["native_roi"] = native[1].contiguous()
        if spacing is not None and len(spacing) == seg.spatial_dims:
            # HD95 in mm: the image's own spacing, on whose grid it is scored (the target spacing if already there)
            out["spacing"] = torch.tensor(spacing, dtype=torch.float64)
        return out

    def augment(x: torch.Tensor, extra: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        fg = None
        if seg.foreground_fraction > 0 and float(torch.rand(())) < seg.foreground_fraction:
            fg = extra[0][0] > 0
        x, *extra = random_crop([x, *extra], seg.patch_size, fg)
        dims = list(range(1, x.ndim))
        if seg.flips:
            for d in dims:
                if float(torch.rand(())) < 0.5:
                    x, extra = x.flip(d), [t.flip(d) for t in extra]
        if seg.rot90 and x.shape[-1] == x.shape[-2]:
            k = int(torch.randint(0, 4, ()))
            x, extra = torch.rot90(x, k, (-2, -1)), [torch.rot90(t, k, (-2, -1)) for t in extra]
        if seg.low_res is not None and float(torch.rand(())) < seg.low_res_p:  # the image only: masks keep it
            lo, hi = seg.low_res
            x = simulate_low_resolution(x, lo + float(torch.rand(())) * (hi - lo))
        if seg.intensity_jitter > 0:
            j = seg.intensity_jitter
            scale, shift = 1 + (torch.rand(2) * 2 - 1) * j
            if x.dtype == torch.uint8:
                x = (x.float() * scale + (shift - 1) * 255 * 0.5).clamp(0, 255).to(torch.uint8)
            else:
                x = x * scale + (shift - 1)
        out = {"image": x.contiguous(), "mask": extra[0].contiguous()}
        if seg.roi is not None:
            out["roi"] = extra[1].contiguous()
        return out

    return apply
