"""3-D volumes (NRRD, NIfTI) with optional label maps -> volume, slice or patch samples.

Read with MONAI's `LoadImage` (pynrrd / nibabel underneath: `pip install medfound[volumes]`), keeping the
source dtype (e.g. int16 MR/CT values) exactly: images and label maps are stored as .npy, 2-D label slices
as PNG. Every sample's meta has the voxel spacing in mm and the orientation codes (from the affine, RAS
convention as MONAI loads it) of the array as stored, its shape, and where it came from in the volume.

Pairs: a table (`path`, optional `mask`, `label`/`labels`, `patient_id`, `site`, `split`) or, without
one, files named `X_image.ext` with `X_label.ext` (or `_seg`, `_mask`) in the same folder.

Layouts: `volume` (one sample per volume), `slices` (2-D slices along `axis`; by default the axis with
the coarsest spacing, i.e. the acquisition plane of an anisotropic scan) or `patches` (3-D patches of
`patch` voxels, stepping by the patch size, the last one aligned to the volume's end so every voxel is
covered; volumes smaller than a patch are an error naming the file).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Optional

import numpy as np

from medfound.data.ingest import Ingested, patient_token, read_table, safe_key, salt_record, table_labels
from medfound.data.ingest.images import DEFAULT_FRACTIONS, split_for_token
from medfound.io import sha256_file

SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz")
IMAGE_TAGS = ("_image", "_img", "_vol", "_volume")
LABEL_TAGS = ("_label", "_labels", "_seg", "_mask")


def _stem(path: Path) -> str:
    name = path.name
    for suf in SUFFIXES:
        if name.endswith(suf):
            return name[: -len(suf)]
    return path.stem


def pair_files(folder: Path) -> list[dict[str, str]]:
    """Rows (path, mask) for `X_image.*` + `X_label.*` pairs; a volume without a label map has mask ''."""
    files = sorted(p for p in folder.iterdir() if any(p.name.endswith(s) for s in SUFFIXES))
    by_stem = {_stem(p): p for p in files}
    rows = []
    for stem, p in by_stem.items():
        if any(stem.endswith(t) for t in LABEL_TAGS):
            continue
        base = next((stem[: -len(t)] for t in IMAGE_TAGS if stem.endswith(t)), stem)
        label = next((by_stem[base + t] for t in LABEL_TAGS if base + t in by_stem), None)
        rows.append({"path": p.name, "mask": label.name if label else ""})
    return rows


# NRRD "type" field values (NRRD0005 spec) -> NumPy dtypes
_NRRD_TYPES = {
    **dict.fromkeys(("signed char", "int8", "int8_t"), "i1"),
    **dict.fromkeys(("uchar", "unsigned char", "uint8", "uint8_t"), "u1"),
    **dict.fromkeys(("short", "short int", "signed short", "signed short int", "int16", "int16_t"), "i2"),
    **dict.fromkeys(("ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"), "u2"),
    **dict.fromkeys(("int", "signed int", "int32", "int32_t"), "i4"),
    **dict.fromkeys(("uint", "unsigned int", "uint32", "uint32_t"), "u4"),
    **dict.fromkeys(("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64",
                     "int64_t"), "i8"),
    **dict.fromkeys(("ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t"), "u8"),
    "float": "f4", "double": "f8",
}


def _source_dtype(path: Path) -> np.dtype:
    """The voxel type stored in the file, so MONAI's reader keeps it instead of casting to float."""
    if path.name.endswith((".nrrd", ".nhdr")):
        import nrrd
        kind = str(nrrd.read_header(str(path))["type"]).lower()
        if kind not in _NRRD_TYPES:
            raise ValueError(f"{path.name}: unsupported NRRD voxel type {kind!r}")
        return np.dtype(_NRRD_TYPES[kind])
    import nibabel
    return np.dtype(nibabel.load(str(path)).get_data_dtype())


def read_volume(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(array in its source dtype, 4x4 affine from voxel indices to RAS mm) exactly as MONAI's `LoadImage` reads
    them (NRRD's LPS space converted to RAS): the one reader of ingest and of `medfound predict`'s NIfTI masks."""
    try:
        from monai.data import NibabelReader, NrrdReader
        from monai.transforms import LoadImage
    except ImportError as e:
        raise ImportError("volume ingest needs MONAI with pynrrd/nibabel: pip install medfound[volumes]") from e
    try:
        dtype = _source_dtype(path)
        reader = NrrdReader(dtype=dtype) if path.name.endswith((".nrrd", ".nhdr")) else NibabelReader(dtype=dtype)
        img, meta = LoadImage(image_only=False, reader=reader, dtype=None)(str(path))
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"cannot read volume {path.name}: {type(e).__name__}: {e}") from e
    arr = np.asarray(img)
    if arr.ndim != 3:
        raise ValueError(f"{path.name}: expected a 3-D volume, got shape {arr.shape}")
    return arr, np.asarray(meta["affine"], dtype=float)


def load_volume(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """(array in its source dtype, spacing in mm per array axis, orientation codes) via MONAI."""
    from nibabel.orientations import aff2axcodes

    arr, affine = read_volume(path)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    return arr, spacing, tuple(aff2axcodes(affine))


def nifti_bytes(array: np.ndarray, affine: np.ndarray) -> bytes:
    """`array` on the grid of a volume with `affine` as gzipped NIfTI-1 bytes (sform and qform: scanner RAS)."""
    import gzip

    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    return gzip.compress(img.to_bytes(), mtime=0)


def _starts(size: int, patch: int) -> list[int]:
    starts = list(range(0, size - patch + 1, patch))
    if starts[-1] + patch < size:
        starts.append(size - patch)
    return starts


def read_volumes(input: str | Path, *, table: Optional[str | Path] = None, layout: str = "volume",
                 axis: Optional[int] = None, patch: Optional[list[int]] = None, label_type: Optional[str] = None,
                 label_names: Optional[list[str]] = None, split_fractions: Optional[dict[str, float]] = None,
                 site: Optional[str] = None, keep_names: bool = False, salt: Optional[str] = None,
                 name: str = "volumes", **_: object) -> Ingested:
    folder = Path(input)
    if not folder.is_dir():
        raise FileNotFoundError(f"volume folder {folder} not found")
    if layout not in ("volume", "slices", "patches"):
        raise ValueError(f"layout={layout!r}: choose volume, slices or patches")
    patch = list(patch or [64, 64, 16])
    if layout == "patches" and (len(patch) != 3 or min(patch) < 1):
        raise ValueError(f"--patch needs three positive sizes, got {patch}")
    rows = read_table(table, ("path", "mask", "label", "labels", "patient_id", "site", "split")) if table else pair_files(folder)
    if not rows:
        raise ValueError(f"no volumes ({', '.join(SUFFIXES)}) in {folder}")
    schema, to_label = table_labels(rows, label_type, label_names)
    fractions = split_fractions or DEFAULT_FRACTIONS
    salt_bytes = salt.encode() if salt else hashlib.sha256(
        b"medfound-salt\0" + "".join(sorted(r["path"] for r in rows)).encode()).digest()

    skipped: dict[str, Any] = {"count": 0, "by_reason": {}, "files": []}

    def samples():
        for index, r in enumerate(rows):
            if not result.wants(index):
                continue
            path = folder / r["path"]
            try:
                image, spacing, codes = load_volume(path)
            except ValueError as e:  # one unreadable volume must not end the ingest: skipped, counted, named
                reason = str(e).split(": ", 1)[-1][:200]
                skipped["count"] += 1
                skipped["by_reason"][reason] = skipped["by_reason"].get(reason, 0) + 1
                skipped["files"].append((f"table row {index + 2}" if table else f"volume {index}", r["path"],
                                         reason))
                continue
            mask = None
            if (r.get("mask") or "").strip():
                mask, m_spacing, _ = load_volume(folder / r["mask"])
                if mask.shape != image.shape:
                    raise ValueError(f"{r['mask']}: label map shape {mask.shape} differs from {r['path']} {image.shape}")
                if not np.allclose(m_spacing, spacing, rtol=1e-3):
                    raise ValueError(f"{r['mask']}: spacing {m_spacing} differs from {r['path']} {spacing}")
                mask = mask.astype(np.uint8) if mask.max() < 256 and mask.min() >= 0 else mask.astype(np.int32)
            pid = (r.get("patient_id") or "").strip()
            token = patient_token(salt_bytes, pid) if pid else None
            split = (r.get("split") or "").strip() or split_for_token(token or patient_token(salt_bytes, "vol:" +
                                                                                              r["path"]), fractions)
            base = safe_key(_stem(path), keep_names)
            common: dict[str, Any] = {"split": split, "site": (r.get("site") or "").strip() or site,
                                      "label": to_label(r), "patient": token}
            info = {"volume": base, "volume_shape": list(image.shape), "orientation": "".join(codes)}
            if layout == "volume":
                yield {**common, "key": base, "image": image, "masks": {"label": mask} if mask is not None else {},
                       "meta": {**info, "spacing_mm": [round(float(s), 6) for s in spacing], "origin": [0, 0, 0]}}
            elif layout == "slices":
                ax = int(np.argmax(spacing)) if axis is None else axis % 3
                keep = [a for a in range(3) if a != ax]
                for z in range(image.shape[ax]):
                    sl = np.take(image, z, axis=ax)
                    masks = {"label": np.take(mask, z, axis=ax)} if mask is not None else {}
                    yield {**common, "key": f"{base}_s{z:04d}", "image": sl, "masks": masks,
                           "meta": {**info, "axis": ax, "index": z,
                                    "spacing_mm": [round(float(spacing[a]), 6) for a in keep],
                                    "slice_spacing_mm": round(float(spacing[ax]), 6)}}
            else:
                if any(p > s for p, s in zip(patch, image.shape)):
                    raise ValueError(f"{r['path']}: volume {image.shape} is smaller than the patch {patch}; "
                                     "lower --patch")
                for x in _starts(image.shape[0], patch[0]):
                    for y in _starts(image.shape[1], patch[1]):
                        for z in _starts(image.shape[2], patch[2]):
                            sel = (slice(x, x + patch[0]), slice(y, y + patch[1]), slice(z, z + patch[2]))
                            masks = {"label": mask[sel]} if mask is not None else {}
                            yield {**common, "key": f"{base}_p{x}_{y}_{z}", "image": image[sel], "masks": masks,
                                   "meta": {**info, "origin": [x, y, z],
                                            "spacing_mm": [round(float(s), 6) for s in spacing]}}

    source = {"files": [{"name": safe_key(_stem(folder / r["path"]), keep_names), "sha256": sha256_file(folder / r["path"])}
                        for r in rows]}
    settings = {"kind": "volumes", "layout": layout, "axis": axis, "patch": patch if layout == "patches" else None,
                "pairs": "table" if table else "X_image + X_label file names", "keep_names": keep_names,
                "reader": "monai.transforms.LoadImage (RAS)", "patient_salt": salt_record(salt, salt_bytes)}
    result = Ingested(samples(), schema, source, settings, skipped=skipped)
    return result
