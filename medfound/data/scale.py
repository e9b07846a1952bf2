"""The physical scale of a shard set, and the check that an external set is at the scale a model was trained on.

`scale_stats` reads the sample meta of up to `max_samples` samples (the `{key}.json` members only; no image is
decoded): the median field-of-view diameter in pixels (fundus: `fov_diameter_px`, stored by `shard images` when a
FOV mask exists), the median in-plane pixel spacing in mm (`pixel_spacing`: DICOM PixelSpacing / ImagerPixelSpacing,
`shard images --spacing-mm` or its table column, volume slices) and the µm/px of microscopy sets (each sample's
`mpp`, else the manifest's `ingest.mpp`). Where a set has none of these, a cheap proxy read from its masks stands in:
`structure_px`, the labelled structures' thickness in pixels (`structure_size`, stored per sample by `shard images`
for the `mask` member), which scales linearly with the resolution whatever the structure. Training records them
in the export's lineage (`scale`); `scale_warnings` compares an external set's with them and names the key that
would fix a difference larger than SCALE_TOLERANCE.
"""

from __future__ import annotations

import itertools
import json
from typing import Any, Iterator, Optional

import numpy as np

from medfound.data.manifest import read_manifest

# Loaded by torch-free commands (`medfound ls`, `validate`, `--help`): medfound modules that bring in torch or
# numpy are imported inside the functions that need them (tests/test_layering.py keeps it so).

SCALE_TOLERANCE = 1.25  # a set whose scale differs from the training data's by more than this factor is warned about


def structure_size(mask: Any) -> Optional[float]:
    """The thickness of a mask's foreground (> 0) in pixels: 4 x area / boundary length, the boundary counted in
    pixel edges (which, unlike boundary pixels, doubles exactly when the image is resampled 2x). About twice the
    width of a thin structure (a vessel), 0.8 x the diameter of a round one (a nucleus); None without foreground."""
    m = np.pad(np.asarray(mask) > 0, 1)
    if m.ndim != 2 or not m.any():
        return None
    edges = int((m[:, 1:] != m[:, :-1]).sum() + (m[1:, :] != m[:-1, :]).sum())
    return round(4.0 * float(m.sum()) / edges, 3)


def pixel_spacing(meta: Optional[dict]) -> Optional[tuple[float, float]]:
    """A 2-D sample's (row, column) pixel spacing in mm from its meta: `spacing_mm` (images, volume slices) or
    `dicom.spacing_mm` (DICOM); None when it has none (or a 3-D spacing)."""
    meta = meta or {}
    s = meta.get("spacing_mm")
    if s is None:
        s = (meta.get("dicom") or {}).get("spacing_mm")
    if not isinstance(s, (list, tuple)) or len(s) != 2:
        return None
    try:
        row, col = float(s[0]), float(s[1])
    except (TypeError, ValueError):
        return None
    return (row, col) if row > 0 and col > 0 else None


def iter_metas(shards: Any, split: Optional[str] = None) -> Iterator[dict[str, Any]]:
    """The JSON meta of every sample of a shard set (`split`, or every split), in shard order, decoding no image."""
    from medfound.data.pipeline import shard_urls
    from medfound.data.tario import iter_members

    splits = [split] if split else list(read_manifest(shards).splits)
    for url in [u for sp in splits for u in shard_urls([shards], sp)[0]]:
        for member in iter_members(url):
            name = member["fname"].rsplit("/", 1)[-1]
            if not name.endswith(".json") or name.endswith(".labels.json"):
                continue
            try:
                meta = json.loads(member["data"])  # the sample's meta (flat: split, site, fov_diameter_px...)
            except ValueError:
                continue
            if isinstance(meta, dict):
                yield meta


CALIBRE_SIGMAS = np.geomspace(0.5, 16.0, 40)  # the Gaussian scales `calibre_px` selects among (px)
CALIBRE_POINTS = 20000  # centre pixels read at most (an even subsample beyond)


def calibre_px(gray: Any, mask: Any, roi: Any = None) -> Optional[float]:
    """The calibre of the structures `mask` marks, in pixels, read from the image `gray` ([H, W]) itself: the median,
    over the mask's centre pixels (its distance transform's ridge; inside `roi` eroded by 8 px), of the Gaussian scale
    at which the scale-normalised ridge strength sigma^2 * lambda peaks (Lindeberg's scale selection; lambda: the
    Hessian eigenvalue across a dark structure, or minus the one across a bright one, whichever the mask is against
    its surroundings), refined between the CALIBRE_SIGMAS by a parabola in log sigma. None without centre pixels.

    It scales with the image's resolution like `structure_size` does, but it is the image's calibre, not the width
    a mask was drawn or a model paints at: segment.scale=auto compares it, at the centre of the model's own
    prediction, with the same measure on the training images (see evaluate/segmentation.py)."""
    from scipy import ndimage as ndi

    g = np.asarray(gray, np.float32)
    m = np.asarray(mask) > 0
    if g.ndim != 2 or m.shape != g.shape or not m.any():
        return None
    dist = ndi.distance_transform_edt(m)
    centre = (dist > 0) & (dist >= ndi.maximum_filter(dist, size=3) - 1e-6)
    if roi is not None:
        centre &= ndi.binary_erosion(np.asarray(roi) > 0, iterations=8)
    ys, xs = np.nonzero(centre)
    if not len(ys):
        return None
    if len(ys) > CALIBRE_POINTS:
        pick = np.linspace(0, len(ys) - 1, CALIBRE_POINTS).round().astype(int)
        ys, xs = ys[pick], xs[pick]
    ring = ndi.binary_dilation(m, iterations=3) & ~m
    dark = not ring.any() or float(g[m].mean()) <= float(g[ring].mean())
    response = np.empty((len(CALIBRE_SIGMAS), len(ys)), np.float32)
    for i, s in enumerate(CALIBRE_SIGMAS):
        gxx = ndi.gaussian_filter(g, s, order=(0, 2))[ys, xs]
        gyy = ndi.gaussian_filter(g, s, order=(2, 0))[ys, xs]
        gxy = ndi.gaussian_filter(g, s, order=(1, 1))[ys, xs]
        root = np.sqrt((gxx - gyy) ** 2 + 4 * gxy ** 2)
        response[i] = (gxx + gyy + root) / 2 * s * s if dark else -(gxx + gyy - root) / 2 * s * s
    k = response.argmax(0)
    keep = response[k, np.arange(len(k))] > 0  # a ridge of the right polarity
    if not keep.any():
        return None
    k, r = k[keep], response[:, keep]
    cols = np.arange(len(k))
    inner = (k > 0) & (k < len(CALIBRE_SIGMAS) - 1)
    offset = np.zeros(len(k))
    a, b, c = r[np.maximum(k - 1, 0), cols], r[k, cols], r[np.minimum(k + 1, len(CALIBRE_SIGMAS) - 1), cols]
    curve = a - 2 * b + c
    ok = inner & (curve < 0)
    offset[ok] = np.clip(0.5 * (a[ok] - c[ok]) / curve[ok], -0.5, 0.5)
    log_sigma = np.log(CALIBRE_SIGMAS)
    step = log_sigma[1] - log_sigma[0]
    return round(float(np.exp(np.median(log_sigma[k] + offset * step))), 4)


def first_metas(shards: Any, n: int = 16) -> list[dict[str, Any]]:
    """The JSON meta of the first `n` samples of a shard set (every split), decoding no image."""
    return list(itertools.islice(iter_metas(shards), n))


def scale_stats(shards: Any, split: Optional[str] = None, max_samples: int = 64) -> dict[str, Any]:
    """{"fov_diameter_px", "spacing_mm", "mpp", "structure_px", "samples"} of a shard set (`split`, or every split);
    keys without data are left out."""
    fov, spacing, mpps, structure, seen = [], [], [], [], 0
    for meta in itertools.islice(iter_metas(shards, split), max_samples):
        seen += 1
        if meta.get("fov_diameter_px"):
            fov.append(float(meta["fov_diameter_px"]))
        s = pixel_spacing(meta)
        if s is None and isinstance(meta.get("spacing_mm"), (list, tuple)) and len(meta["spacing_mm"]) > 2:
            s = tuple(float(v) for v in meta["spacing_mm"][:2])  # a volume: its in-plane spacing
        if s is not None:
            spacing.append(float(np.mean(s)))
        if meta.get("mpp"):
            mpps.append(float(meta["mpp"]))
        if meta.get("structure_px"):
            structure.append(float(meta["structure_px"]))
    out: dict[str, Any] = {"samples": seen}
    if fov:
        out["fov_diameter_px"] = round(float(np.median(fov)), 1)
    if spacing:
        out["spacing_mm"] = round(float(np.median(spacing)), 6)
    if structure:
        out["structure_px"] = round(float(np.median(structure)), 3)
    if not mpps:
        mpp = (read_manifest(shards).ingest or {}).get("mpp")
    else:
        mpp = float(np.median(mpps))
    if mpp:
        out["mpp"] = round(float(mpp), 8)
    return out


FIX = {"fov_diameter_px": "score it at the training scale with `segment.fov_diameter={value:.0f}` (a medfound "
                          "evaluate override, or train with it so every set is normalised)",
       "spacing_mm": "resample it to {value:g} mm/px: `segment.scale={factor:.3g}` (a medfound evaluate override), "
                     "`medfound shard images ... --scale {factor:.3g}`, or train with `data.spacing_mm` (classification)",
       "mpp": "score it at the training resolution with `segment.mpp={value:g}` (segmentation: a medfound evaluate "
              "override), or re-tile its slides at it (`medfound shard wsi ... --mpp {value:g}`)",
       "structure_px": "if its images are at another resolution, score it with `segment.scale={inverse:.3g}` (a medfound "
                       "evaluate override) or re-shard it with `--scale {inverse:.3g}`; record its physical scale at "
                       "ingest (`--mpp`, `--spacing-mm`, `--fov detect`) so the check can use it"}
WHAT = {"fov_diameter_px": "a field of view {ext:.0f} px wide", "spacing_mm": "pixels of {ext:g} mm",
        "mpp": "{ext:g} µm/px", "structure_px": "labelled structures {ext:.3g} px thick (a proxy read from its masks)"}
TRAINED = {"fov_diameter_px": "{value:.0f} px", "spacing_mm": "{value:g} mm", "mpp": "{value:g} µm/px",
           "structure_px": "{value:.3g} px"}
PHYSICAL = ("fov_diameter_px", "spacing_mm", "mpp")  # measured scales; structure_px is the fallback proxy


def describe_scale(stats: dict[str, Any]) -> str:
    """One line for `medfound inspect`: the scale a set records, or how to record one."""
    parts = [f"{label} {fmt.format(v=stats[k])}" for k, label, fmt in (
        ("fov_diameter_px", "field of view", "{v:.0f} px"), ("spacing_mm", "pixel spacing", "{v:g} mm"),
        ("mpp", "resolution", "{v:g} µm/px"), ("structure_px", "mask structures", "{v:.3g} px thick")) if k in stats]
    if not parts:
        return ("none recorded (record one at ingest: --mpp, --spacing-mm or a spacing_mm column, --fov detect; "
                "DICOM keeps its own)")
    return "; ".join(parts) + f" (medians of {stats['samples']} samples)"


def scale_warnings(name: str, external: dict[str, Any], trained: Optional[dict[str, Any]],
                   normalised: tuple[str, ...] = (), subject: Optional[str] = None) -> list[str]:
    """One warning per scale key in which `external` differs from `trained` by more than SCALE_TOLERANCE, naming
    the key that fixes it; keys in `normalised` (the run already resamples them) are not compared. The masks'
    structure_px is compared only where no physical scale is known for both sets (it is a proxy, and a structure may
    differ in size between populations or annotation styles). `subject`: what the set is called in the warning
    (default "external set NAME")."""
    out = []
    physical = any(k in (trained or {}) and k in external for k in PHYSICAL)
    for key in (*PHYSICAL, "structure_px"):
        if key in normalised or not trained or key not in trained or key not in external:
            continue
        if key == "structure_px" and physical:
            continue
        ratio = external[key] / trained[key]
        if max(ratio, 1 / ratio) > SCALE_TOLERANCE:
            out.append(f"{subject or f'external set {name}'} has {WHAT[key].format(ext=external[key])}, the training data "
                       f"{TRAINED[key].format(value=trained[key])} ({ratio:.2f}x, beyond the {SCALE_TOLERANCE}x "
                       f"tolerance): the model sees its structures at another size; "
                       + FIX[key].format(value=trained[key], factor=ratio, inverse=1 / ratio))
    return out


def require_spacing(shards: Any, what: str) -> None:
    """data.spacing_mm resamples by each sample's pixel spacing: before any work, the shard set must record one
    (read from the first samples' meta), else MissingMember names the set and the fix."""
    from medfound.data.pipeline import MissingMember

    stats = scale_stats(shards, max_samples=16)
    if stats["samples"] and "spacing_mm" not in stats:
        raise MissingMember(f"{what} records no pixel spacing in its samples, so data.spacing_mm cannot resample "
                            "them: DICOM files need PixelSpacing or ImagerPixelSpacing (`medfound shard dicom ... "
                            "--require-spacing` leaves out those without); for other images re-shard "
                            "with `medfound shard images ... --spacing-mm MM` (or a spacing_mm column in the "
                            "--table); or drop data.spacing_mm")
