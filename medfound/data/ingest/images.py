"""A folder of image files plus a table (CSV or Parquet).

Columns: `path` (relative to the folder); `label` (one class) or `labels` (several, '|'-separated:
multi-label); optional `patient_id`, `site`, `split`, `laterality` and `view` (mammography: L/R and CC/MLO, kept in
the sample's meta so evaluation can combine the views of one breast); and mask columns stored beside the image:
`mask`, `fov` and any `mask_<name>` (paths to mask images of the same size, e.g. DRIVE's vessel and
field-of-view masks).

Without a `split` column, images are split by patient (`patient_id` when present, else one image = one
patient) from an HMAC token of the ID, so no patient is in two splits and the same table always gives the
same split. A table may list one image in several rows, each with its own mask (one structure per sample, for
box prompts). The salt is `--salt` or derived from the table's bytes; it is not stored, and neither are
patient IDs or file names: keys are hashes unless `keep_names` is set.

Colour fundus: `fov="detect"` stores a detected field-of-view mask as `fov` (when the table gives none);
`fov="crop"` also crops image and masks to the field of view.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from medfound.data.ingest import Ingested, patient_token, read_table, safe_key, salt_record, table_labels
from medfound.data.masks import apply_mask_mode
from medfound.data.scale import structure_size
from medfound.io import sha256_file

# Loaded by torch-free commands (`medfound ls`, `validate`, `--help`): medfound modules that bring in torch or
# numpy are imported inside the functions that need them (tests/test_layering.py keeps it so).

DEFAULT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
TABLE_NAMES = ("labels.csv", "labels.parquet")
IMAGE_COLUMNS = ("path", "label", "labels", "patient_id", "site", "split", "laterality", "view", "mask", "fov",
                 "spacing_mm")


def row_spacing(value: str, where: str) -> Optional[list[float]]:
    """A table's spacing_mm cell -> [row, column] mm per pixel: one number (square pixels) or "ROW,COL" (DICOM
    PixelSpacing order, e.g. NIH ChestX-ray14's OriginalImagePixelSpacing); empty -> None."""
    value = (value or "").strip()
    if not value:
        return None
    try:
        parts = [float(v) for v in value.replace(";", ",").split(",")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or not all(0 < v < 100 for v in parts):
        raise ValueError(f"{where}: spacing_mm {value!r} is not a pixel spacing: give mm per pixel as one number "
                         "(e.g. 0.143) or ROW,COL (e.g. 0.139,0.139)")
    return parts


def split_for_token(token: str, fractions: dict[str, float]) -> str:
    """Deterministic split for a hex token: its value in [0, 1) mapped onto cumulative fractions."""
    u = int(token[:12], 16) / float(16 ** 12)
    total = sum(fractions.values())
    acc = 0.0
    for name, frac in fractions.items():
        acc += frac / total
        if u < acc:
            return name
    return list(fractions)[-1]


class BadImage(ValueError):
    """An image file that cannot become a sample: skipped and counted, never the end of the ingest. `reason` says
    why without the file's name (names can carry PHI)."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.reason = reason


def _open(path: Path, where: str) -> Image.Image:
    if not path.is_file():
        raise BadImage(where, "image file not found")
    try:
        with Image.open(path) as im:
            if im.mode in ("F", "I", "I;32", "I;32B", "I;32S"):
                raise BadImage(where, f"32-bit image (PIL mode {im.mode}): store it as 8- or 16-bit, or as a volume "
                                      "(`medfound shard volumes`)")
            im.load()
            return im.convert("RGB") if im.mode in ("RGBA", "P", "CMYK", "LA", "YCbCr") else im.copy()
    except BadImage:
        raise
    except Image.DecompressionBombError:
        raise BadImage(where, f"over the decompression-bomb limit of {Image.MAX_IMAGE_PIXELS:,} pixels: tile it "
                              "first, or raise PIL.Image.MAX_IMAGE_PIXELS if it is genuine") from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for truncated or foreign files
        raise BadImage(where, f"cannot decode the image ({type(e).__name__})") from None


def _mask_values(im: Image.Image, full_depth: bool) -> np.ndarray:
    """A mask image's values: 16-bit masks (instance ids) at full depth when `full_depth`, everything else as 8-bit
    grey (0/255 masks saved as colour or palette images read as before)."""
    if full_depth and im.mode.startswith("I;16"):
        return np.asarray(im).astype(np.uint16)
    return np.asarray(im.convert("L"))


def _mask_columns(columns: list[str]) -> list[str]:
    return [c for c in columns if c in ("mask", "fov") or c.startswith("mask_")]


def read_images(folder: str | Path, *, table: Optional[str | Path] = None, label_type: Optional[str] = None,
                label_names: Optional[list[str]] = None, site: Optional[str] = None,
                split_fractions: Optional[dict[str, float]] = None, keep_names: bool = False,
                salt: Optional[str] = None, fov: str = "none", mpp: Optional[float] = None,
                scale: Optional[float] = None, fov_diameter: Optional[int] = None,
                spacing_mm: Optional[float] = None, mask_mode: Optional[str] = None, **_: object) -> Ingested:
    folder = Path(folder)
    if mpp is not None and not mpp > 0:
        raise ValueError(f"--mpp {mpp}: give the images' resolution in micrometres per pixel (> 0), e.g. 0.25")
    if spacing_mm is not None and not 0 < spacing_mm < 100:
        raise ValueError(f"--spacing-mm {spacing_mm}: give the images' pixel spacing in mm per pixel, e.g. 0.143 for "
                         "a chest radiograph digitised at 3000 px")
    if spacing_mm is not None and mpp is not None:
        raise ValueError("--mpp (microscopy, um/px) and --spacing-mm (radiology, mm/px) both give the pixel size: "
                         "keep the one of the modality")
    if fov_diameter is not None and mpp is not None:
        raise ValueError("--fov-diameter gives every image its own resize factor, so one --mpp cannot describe the "
                         "shards: drop --mpp (fundus photographs are measured by their field of view)")
    if fov_diameter is not None and (scale is not None or not fov_diameter > 0):
        raise ValueError(f"--fov-diameter {fov_diameter}: resizes each image so its field of view is that many px "
                         "wide (a positive width); it excludes --scale")
    if scale is not None and not 0.05 <= scale <= 20:
        raise ValueError(f"--scale {scale}: give the resize factor of every image (0.5 halves each side, 2 doubles "
                         "it), between 0.05 and 20")
    if table is None:
        found = [folder / n for n in TABLE_NAMES if (folder / n).is_file()]
        if not found:
            raise FileNotFoundError(f"no label table in {folder}: pass --table CSV_OR_PARQUET with columns path,label"
                                    "[,patient_id,site,split,laterality,view,mask,fov] (paths relative to the image folder)")
        table = found[0]
    table = Path(table)
    rows = read_table(table, IMAGE_COLUMNS, prefixes=("mask_",))
    if not rows:
        raise ValueError(f"{table} has no rows")
    if "path" not in rows[0]:
        raise ValueError(f"{table} needs a 'path' column (found columns {list(rows[0])})")
    if fov not in ("none", "detect", "crop"):
        raise ValueError(f"fov={fov!r}: choose none, detect or crop")
    has_split = "split" in rows[0]
    fractions = split_fractions or DEFAULT_FRACTIONS
    schema, to_label = table_labels(rows, label_type, label_names)
    mask_cols = _mask_columns(list(rows[0]))
    if fov_diameter is not None and fov == "none" and "fov" not in mask_cols:
        raise ValueError(f"--fov-diameter {fov_diameter} measures each image's field of view: give {table} a fov "
                         "column (mask paths) or pass --fov detect (or crop)")
    key_salt = salt.encode() if salt else hashlib.sha256(b"medfound-salt\0" + table.read_bytes()).digest()

    repeated = {p for p, n in Counter(r["path"] for r in rows).items() if n > 1}
    skipped: dict = {"count": 0, "by_reason": {}, "files": []}

    def samples():
        from medfound.data.fundus import crop_to_fov, detect_fov
        from medfound.data.fundus import fov_diameter as fov_diameter_of

        for i, r in enumerate(rows):
            if not result.wants(i):
                continue
            where = f"{table} row {i + 2}"
            rel = r["path"]
            try:
                img = _open(folder / rel, where)
                masks = {c if c in ("mask", "fov") else c.removeprefix("mask_"):
                         _mask_values(_open(folder / r[c], f"{where}, column {c}"), c != "fov")
                         for c in mask_cols if (r.get(c) or "").strip()}
            except BadImage as e:  # one bad file must not end the ingest: skip it, count it, say why
                skipped["count"] += 1
                skipped["by_reason"][e.reason] = skipped["by_reason"].get(e.reason, 0) + 1
                skipped["files"].append((f"table row {i + 2}", rel, e.reason))
                continue
            for name, m in masks.items():
                if m.shape != (img.height, img.width):
                    raise ValueError(f"{where}: {name} mask is {m.shape[1]}x{m.shape[0]} but the image is "
                                     f"{img.width}x{img.height}")
            masks = {n: m if n == "fov" else apply_mask_mode(m, mask_mode, f"{where}, {n} mask")
                     for n, m in masks.items()}
            if fov != "none":
                arr = np.asarray(img)
                fov_mask = masks["fov"] > 0 if "fov" in masks else detect_fov(arr)
                if fov == "crop":
                    names = list(masks)
                    arr, fov_mask, *cropped = crop_to_fov(arr, fov_mask, *(masks[n] for n in names))
                    masks = dict(zip(names, cropped))
                    img = Image.fromarray(arr)
                masks["fov"] = (fov_mask > 0).astype(np.uint8) * 255
            factor = scale
            if fov_diameter is not None:  # this image's own factor, from the width of its field of view
                if "fov" not in masks:
                    raise ValueError(f"{where}: {rel} has no fov mask, so --fov-diameter cannot scale it: fill its fov "
                                     "cell or pass --fov detect")
                width = fov_diameter_of(masks["fov"] > 0)
                if width == 0:
                    raise ValueError(f"{where}: the field-of-view mask of {rel} is empty, so --fov-diameter cannot "
                                     "scale it; check the image or its fov mask")
                factor = fov_diameter / width
            if factor is not None and factor != 1:  # images resampled with antialiasing, masks by nearest neighbour
                size = (max(1, round(img.width * factor)), max(1, round(img.height * factor)))
                img = img.resize(size, Image.Resampling.LANCZOS)
                masks = {n: np.asarray(Image.fromarray(m).resize(size, Image.Resampling.NEAREST))
                         for n, m in masks.items()}
            scale_meta = {"fov_diameter_px": fov_diameter_of(masks["fov"] > 0)} if "fov" in masks else {}
            # the physical pixel size as stored (after any resize), per sample: data.spacing_mm / segment.mpp read it
            spacing = row_spacing(r.get("spacing_mm", ""), where) or ([spacing_mm] * 2 if spacing_mm else None)
            if spacing is not None:
                scale_meta["spacing_mm"] = [round(v / (factor or 1.0), 8) for v in spacing]
            if mpp is not None:
                scale_meta["mpp"] = round(mpp / (factor or 1.0), 8)
            if "mask" in masks and (size := structure_size(masks["mask"])) is not None:
                scale_meta["structure_px"] = size  # a scale proxy for sets without a physical one (data/scale.py)
            pid = (r.get("patient_id") or "").strip()
            token = patient_token(key_salt, pid) if pid else None
            split = (r.get("split") or "").strip() if has_split else \
                split_for_token(token or patient_token(key_salt, "image:" + rel), fractions)
            if not split:
                raise ValueError(f"{where}: empty split; fill the split column or drop it to split by patient")
            name = Path(rel).with_suffix("").as_posix()
            if rel in repeated:  # one image, several structures (box prompts): one sample per mask
                if not (r.get("mask") or "").strip():
                    raise ValueError(f"{where}: {rel} appears in several rows; each needs its own mask column entry")
                name += "/" + Path(r["mask"]).stem
            yield {"key": safe_key(name, keep_names), "image": img, "split": split,
                   "site": (r.get("site") or "").strip() or site, "label": to_label(r), "patient": token,
                   "masks": masks, "meta": {"row": i, **({"fov": fov} if fov != "none" else {}), **scale_meta,
                                            **({"scale": round(factor, 6)} if factor is not None else {}),
                                            **{c: r[c].strip() for c in ("laterality", "view") if (r.get(c) or "").strip()}}}

    source = {"files": [{"name": table.name, "sha256": sha256_file(table)}], "images": len(rows)}
    settings = {"kind": "images", "split": "column" if has_split else {"by": "patient token", "fractions": fractions},
                "keep_names": keep_names, "masks": mask_cols, "fov": fov, "patient_salt": salt_record(salt, key_salt),
                **({"mask_mode": mask_mode} if mask_mode else {}),
                **({"scale": scale} if scale is not None else {}),
                **({"fov_diameter": fov_diameter} if fov_diameter is not None else {}),
                # microscopy: the images' um/px as stored (after --scale) (card, lineage)
                **({"mpp": mpp / (scale or 1.0)} if mpp is not None else {}),
                **({"spacing_mm": spacing_mm / (scale or 1.0)} if spacing_mm is not None else {})}
    result = Ingested(samples(), schema, source, settings, skipped=skipped)
    return result
