"""A folder of image files plus a CSV table (`path,label[,patient_id,site,split]`).

`path` is relative to the folder. Without a `split` column, images are split by patient
(`patient_id` when present, else one image = one patient) using a hash of the ID, so no patient is
in two splits and the same table always gives the same split. Patient IDs and file names are
never written to the shards: keys are hashes unless `keep_names` is set.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path
from typing import Optional

from PIL import Image

from medfound.data.ingest import Ingested, label_schema_for, safe_key
from medfound.io import sha256_file

DEFAULT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


def assign_split(group_id: str, fractions: dict[str, float], namespace: str) -> str:
    """Deterministic split for a patient (or image) ID: a hash mapped onto cumulative fractions."""
    u = int(hashlib.sha256(f"{namespace}\0{group_id}".encode()).hexdigest()[:12], 16) / float(16 ** 12)
    total = sum(fractions.values())
    acc = 0.0
    for name, frac in fractions.items():
        acc += frac / total
        if u < acc:
            return name
    return list(fractions)[-1]


def read_images(folder: str | Path, *, table: Optional[str | Path] = None, label_type: Optional[str] = None,
                label_names: Optional[list[str]] = None, site: Optional[str] = None,
                split_fractions: Optional[dict[str, float]] = None, keep_names: bool = False,
                name: str = "images", **_: object) -> Ingested:
    folder = Path(folder)
    table = Path(table) if table else folder / "labels.csv"
    if not table.is_file():
        raise FileNotFoundError(f"label table {table} not found: pass --table CSV with columns path,label"
                                "[,patient_id,site,split] (paths relative to the image folder)")
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{table} has no rows")
    if "path" not in rows[0]:
        raise ValueError(f"{table} needs a 'path' column (found columns {list(rows[0])})")
    has_split = "split" in rows[0]
    fractions = split_fractions or DEFAULT_FRACTIONS
    schema, to_index = label_schema_for([r.get("label") for r in rows], label_type, label_names)
    if schema.type != "none":
        missing = [i + 2 for i, r in enumerate(rows) if str(r.get("label", "")).strip() == ""]
        if missing:
            raise ValueError(f"{table}: rows {missing[:5]} have no label but others do; label every row or none")

    def samples():
        for i, r in enumerate(rows):
            rel = r["path"]
            p = folder / rel
            if not p.is_file():
                raise FileNotFoundError(f"{table} row {i + 2}: image {p} not found")
            try:
                with Image.open(p) as im:
                    im.load()
                    img = im.convert("RGB") if im.mode in ("RGBA", "P", "CMYK", "LA") else im.copy()
            except OSError as e:
                raise ValueError(f"{table} row {i + 2}: cannot decode {p} ({e})") from e
            group = (r.get("patient_id") or "").strip() or rel
            split = (r.get("split") or "").strip() if has_split else assign_split(group, fractions, name)
            if not split:
                raise ValueError(f"{table} row {i + 2}: empty split; fill the split column or drop it to split by patient")
            yield {"key": safe_key(Path(rel).with_suffix("").as_posix(), keep_names), "image": img,
                   "split": split, "site": (r.get("site") or "").strip() or site,
                   "label": None if schema.type == "none" else to_index(r["label"]), "meta": {"row": i}}

    source = {"files": [{"name": table.name, "sha256": sha256_file(table)}], "images": len(rows)}
    settings = {"kind": "images", "split": "column" if has_split else {"by": "patient_id hash", "fractions": fractions},
                "keep_names": keep_names}
    return Ingested(samples(), schema, source, settings)
