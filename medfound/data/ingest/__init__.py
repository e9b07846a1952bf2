"""Ingest readers: one per `medfound shard KIND`.

Each reader turns an input archive into an `Ingested`: an iterator of sample dicts (see
`medfound.data.shards`) plus the label schema, a PHI-free description of the source and the settings
used. Readers never put file paths, patient names or IDs into keys or meta unless the user asks
for names to be kept (`keep_names=True`, for public data whose names carry no PHI).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

from medfound.data.manifest import LabelSchema


@dataclass
class Ingested:
    samples: Iterable[dict[str, Any]]
    label_schema: LabelSchema
    source: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)


def safe_key(name: str, keep_names: bool) -> str:
    """A webdataset-safe key: the sanitised name when `keep_names`, else a short hash of it (no PHI)."""
    if keep_names:
        return re.sub(r"[^A-Za-z0-9_\-]+", "_", name).strip("_") or "x"
    return "h" + hashlib.sha256(name.encode()).hexdigest()[:16]


def label_schema_for(values: list[Any], label_type: Optional[str], label_names: Optional[list[str]]) -> tuple[LabelSchema, Callable[[Any], int]]:
    """Build the schema and a value -> class-index mapper from the labels seen and the user's choices.

    Values may be class indices (ints or int-like strings) or class names. Without `label_names`,
    integer labels name their classes "0".."K-1" and string labels are sorted alphabetically.
    """
    present = [v for v in values if v is not None and str(v) != ""]
    if not present:
        if label_type not in (None, "none"):
            raise ValueError(f"label type {label_type!r} given but the input has no labels")
        return LabelSchema(type="none"), lambda v: None  # type: ignore[return-value]
    as_int = all(re.fullmatch(r"-?\d+", str(v).strip()) for v in present)
    if label_names is None:
        if as_int:
            label_names = [str(i) for i in range(max(int(str(v)) for v in present) + 1)]
        else:
            label_names = sorted({str(v).strip() for v in present})
    index = {n: i for i, n in enumerate(label_names)}

    def to_index(v: Any) -> int:
        s = str(v).strip()
        if as_int:
            i = int(s)
            if not 0 <= i < len(label_names):
                raise ValueError(f"label {i} outside 0..{len(label_names) - 1} (classes {label_names})")
            return i
        if s not in index:
            raise ValueError(f"label {s!r} is not one of the class names {label_names}; add it to --label-names")
        return index[s]

    if label_type is None:
        label_type = "binary" if len(label_names) == 2 else "multiclass"
    if len(label_names) < 2:
        raise ValueError(f"the labels hold a single class {label_names}; a classifier needs two or more. If the "
                         "other classes exist but are absent from this archive, list them all with --label-names")
    try:
        return LabelSchema(type=label_type, names=list(label_names)), to_index
    except ValueError as e:  # pydantic's message, made to name the flags
        raise ValueError(f"--label-type {label_type} with classes {label_names}: {e.errors()[0]['msg']}") from None


def get_reader(kind: str) -> Callable[..., Ingested]:
    if kind == "npz":
        from medfound.data.ingest.npz import read_npz
        return read_npz
    if kind == "images":
        from medfound.data.ingest.images import read_images
        return read_images
    if kind == "wsi":
        from medfound.data.ingest.wsi import read_wsi
        return read_wsi
    raise ValueError(f"unknown shard kind {kind!r}: choose npz, images or wsi "
                     "(dicom and volumes come with the data-layer issue)")


KINDS = ("npz", "images", "wsi")
