"""Whole-slide images (Aperio SVS, pyramidal TIFF, ...) -> tissue tiles at a stated microns per pixel.

Pathology works in µm/px, not pyramid levels: a tile of `tile_size` px at `mpp` µm/px covers the
same tissue on every scanner. For each slide we (1) detect tissue on a low-resolution thumbnail
(Otsu threshold on HSV saturation: H&E tissue is coloured, glass is white or grey), (2) lay a grid
of tiles in level-0 coordinates, (3) keep tiles whose tissue fraction is at least `min_tissue`, and
(4) read each from the pyramid level closest below the target resolution, resizing to `tile_size`.
Each tile's meta holds the slide, level-0 x/y, the level read, its mpp and tissue fraction.

Reads with tiffslide (part of the base install) or, with backend="openslide", openslide-python.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image

from medfound.data.ingest import Ingested, read_table, safe_key, table_labels
from medfound.io import sha256_file

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".mrxs", ".bif", ".vms")


def open_slide(path: Path, backend: str = "tiffslide") -> Any:
    try:
        if backend == "openslide":
            import openslide
            return openslide.OpenSlide(str(path))
        import tiffslide
        return tiffslide.TiffSlide(str(path))
    except ImportError as e:
        extra = "pip install openslide-python openslide-bin" if backend == "openslide" else "pip install tiffslide imagecodecs"
        raise ImportError(f"reading whole-slide images with {backend} needs it installed: {extra}") from e


def slide_mpp(slide: Any, path: Path) -> Optional[float]:
    props = slide.properties
    for k in ("tiffslide.mpp-x", "openslide.mpp-x"):
        v = props.get(k)
        if v not in (None, ""):
            return float(v)
    return None


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold for uint8 values: maximises the between-class variance of the histogram."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    p = hist / max(hist.sum(), 1)
    omega = np.cumsum(p)
    mu = np.cumsum(p * np.arange(256))
    between = (mu[-1] * omega - mu) ** 2 / np.clip(omega * (1 - omega), 1e-12, None)
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))  # a plateau when the modes do not touch
    return float(best[0] + best[-1]) / 2.0


def tissue_mask(slide: Any, max_side: int = 1024) -> tuple[np.ndarray, float]:
    """Boolean tissue mask on a thumbnail and its downsample factor relative to level 0."""
    w0, h0 = slide.dimensions
    scale = max(w0, h0) / max_side if max(w0, h0) > max_side else 1.0
    thumb = slide.get_thumbnail((max(1, int(w0 / scale)), max(1, int(h0 / scale)))).convert("RGB")
    sat = np.asarray(thumb.convert("HSV"))[..., 1]
    thr = max(otsu_threshold(sat), 20.0)  # never call faint glass tissue on near-empty slides
    return sat > thr, w0 / thumb.size[0]


def tile_slide(path: Path, *, mpp: float, tile_size: int, min_tissue: float, given_mpp: Optional[float],
               backend: str, key_prefix: str):
    slide = open_slide(path, backend)
    try:
        base_mpp = slide_mpp(slide, path) or given_mpp
        if base_mpp is None:
            kind = "a plain (non-pyramidal) TIFF" if slide.level_count == 1 else "a slide"
            raise ValueError(f"{path.name}: {kind} without microns-per-pixel metadata, so tiles at {mpp} µm/px cannot be "
                             "cut reliably. If you know the scan resolution, state it with --slide-mpp (e.g. 0.25 for 40x, "
                             "0.5 for 20x).")
        if mpp < base_mpp * 0.999:
            raise ValueError(f"{path.name}: target {mpp} µm/px is finer than the scan ({base_mpp} µm/px); "
                             f"choose --mpp {base_mpp} or coarser")
        downsample = mpp / base_mpp
        level = slide.get_best_level_for_downsample(downsample)
        level_ds = float(slide.level_downsamples[level])
        step0 = tile_size * downsample                       # tile footprint in level-0 px
        read = max(1, round(step0 / level_ds))               # pixels to read at the chosen level
        mask, mask_ds = tissue_mask(slide)
        w0, h0 = slide.dimensions
        for j in range(int(h0 // step0)):
            for i in range(int(w0 // step0)):
                x, y = round(i * step0), round(j * step0)
                r0, c0 = int(y / mask_ds), int(x / mask_ds)  # the tile's footprint on the thumbnail mask, >= 1 px
                m = mask[r0: max(int((y + step0) / mask_ds), r0 + 1), c0: max(int((x + step0) / mask_ds), c0 + 1)]
                frac = float(m.mean()) if m.size else 0.0
                if frac < min_tissue:
                    continue
                region = slide.read_region((x, y), level, (read, read)).convert("RGB")
                if region.size != (tile_size, tile_size):
                    region = region.resize((tile_size, tile_size), Image.Resampling.LANCZOS)
                yield {"key": f"{key_prefix}_x{x}_y{y}", "image": region,
                       "meta": {"slide": key_prefix, "x": x, "y": y, "level": level, "mpp": mpp,
                                "slide_mpp": base_mpp, "tile_size": tile_size, "tissue": round(frac, 3)}}
    finally:
        slide.close()


def read_wsi(input: str | Path, *, mpp: float = 0.5, tile_size: int = 224, min_tissue: float = 0.5,
             slide_mpp: Optional[float] = None, table: Optional[str | Path] = None, split: str = "train",
             label_type: Optional[str] = None, label_names: Optional[list[str]] = None, site: Optional[str] = None,
             backend: str = "tiffslide", keep_names: bool = False, **_: object) -> Ingested:
    """Tile one slide file or every slide in a folder.

    `table` (optional CSV/Parquet: slide,label|labels[,split,site], `slide` = file name) carries slide labels
    to their tiles and to the slide-level bags listed in the manifest (for MIL); without it tiles are
    unlabelled and all go to `split`.
    """
    input = Path(input)
    if input.is_dir():
        slides = sorted(p for p in input.iterdir() if p.suffix.lower() in SLIDE_SUFFIXES)
    elif input.is_file():
        slides = [input]
    else:
        raise FileNotFoundError(f"slide or folder {input} not found")
    if not slides:
        raise ValueError(f"no slides ({', '.join(SLIDE_SUFFIXES)}) in {input}")
    rows: dict[str, dict[str, str]] = {}
    if table:
        rows = {r["slide"]: r for r in read_table(table, ("slide", "label", "labels", "split", "site"))}
        unknown = sorted(set(rows) - {p.name for p in slides})
        if unknown:
            raise ValueError(f"{table}: slides {unknown[:5]} are not in {input}")
    schema, to_label = table_labels(list(rows.values()), label_type, label_names)
    bags: list[dict] = []

    def samples():
        for index, p in enumerate(slides):
            if not result.wants(index):
                continue
            r = rows.get(p.name, {})
            if table and not r:
                raise ValueError(f"{p.name} has no row in {table}; add it or move the slide out of {input}")
            prefix = safe_key(p.stem, keep_names)
            label = to_label(r) if rows else None
            bag = {"slide": prefix, "label": label, "split": r.get("split") or split, "site": r.get("site") or site,
                   "tiles": 0}
            for t in tile_slide(p, mpp=mpp, tile_size=tile_size, min_tissue=min_tissue, given_mpp=slide_mpp,
                                backend=backend, key_prefix=prefix):
                t.update(split=bag["split"], site=bag["site"], label=label)
                bag["tiles"] += 1
                yield t
            bags.append(bag)

    source = {"files": [{"name": safe_key(p.stem, keep_names) + p.suffix, "sha256": sha256_file(p)} for p in slides]}
    settings = {"kind": "wsi", "mpp": mpp, "tile_size": tile_size, "min_tissue": min_tissue, "backend": backend,
                "tissue_detection": "Otsu on HSV saturation of a <=1024 px thumbnail", "slide_mpp_override": slide_mpp,
                "keep_names": keep_names}
    result = Ingested(samples(), schema, source, settings, bags=bags)
    return result
