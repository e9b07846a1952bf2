"""Ingest readers: one per `medfound shard KIND`.

Each reader turns an input archive into an `Ingested`: an iterator of sample dicts (see
`medfound.data.shards`) plus the label schema, a PHI-free description of the source and the settings
used. Readers never put file paths, patient names or IDs into keys or meta unless the user asks for
names to be kept (`keep_names=True`, for public data whose names carry no PHI). Patient IDs become
salted HMAC tokens (`patient_token`), used to split by patient and to detect leakage.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import hmac
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from pydantic import ValidationError

from medfound.data.manifest import LabelSchema
from medfound.registry import INGEST_KINDS


@dataclass
class Ingested:
    samples: Iterable[dict[str, Any]]
    label_schema: LabelSchema
    source: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)
    # filled while `samples` is consumed:
    # {"count", "by_reason", "files": [(reference without PHI, e.g. "input #3", relative path, reason)]}
    skipped: Optional[dict[str, Any]] = None
    deidentification: Optional[dict[str, Any]] = None
    bags: Optional[list[dict[str, Any]]] = None       # slide-level bags for MIL
    modalities: Optional[Counter] = None              # per-sample modalities seen (a mixed archive)
    # which inputs (by index in the reader's fixed input order) this process reads; None: all. Set before `samples`
    # is consumed (`medfound.data.ingest.parallel`: --workers and --part); a reader calls `wants(i)` once per input,
    # in order, before any work on it
    select: Optional[Callable[[int], bool]] = None
    # True when samples from several processes are merged: checks across inputs (duplicate DICOM instances) are then
    # made where they merge, not in the reader
    cross_process: bool = False

    def wants(self, index: int) -> bool:
        return self.select is None or self.select(index)


def safe_key(name: str, keep_names: bool) -> str:
    """A webdataset-safe key: the sanitised name when `keep_names`, else a short hash of it (no PHI)."""
    if keep_names:
        return re.sub(r"[^A-Za-z0-9_\-]+", "_", name).strip("_") or "x"
    return "h" + hashlib.sha256(name.encode()).hexdigest()[:16]


def patient_token(salt: bytes, patient_id: str) -> str:
    """HMAC-SHA256 of a patient ID under a salt the shards never contain: stable within a salt, not reversible."""
    return hmac.new(salt, patient_id.encode(), hashlib.sha256).hexdigest()[:16]


def salt_record(salt: Optional[str], key_salt: bytes) -> dict[str, Any]:
    """What a manifest records of the salt behind its patient tokens (`ingest.patient_salt`): whether it was given
    (`--salt`) or derived from the inputs, and a fingerprint, a keyed hash that is equal for equal salts and reveals
    nothing else. Sets (or parts) with different fingerprints have unrelated tokens for the same patient, so a merge of
    them is refused and `inspect` does not vouch for their splits."""
    return {"given": bool(salt),
            "fingerprint": hmac.new(key_salt, b"medfound salt fingerprint v1", hashlib.sha256).hexdigest()[:16]}


def check_columns(path: Path, found: Iterable[str], known: Sequence[str], prefixes: Sequence[str] = ()) -> None:
    """Refuse a column the reader would silently ignore (`lable` makes a set unlabelled, `patientid` lets patients
    leak across splits), naming the nearest known column."""
    for column in found:
        if column in known or any(column.startswith(p) and len(column) > len(p) for p in prefixes):
            continue
        near = difflib.get_close_matches(column.strip().lower(), list(known), n=1, cutoff=0.5)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise ValueError(f"{path}: unknown column '{column}'{hint} This table's columns are "
                         f"{', '.join(known)}{''.join(', ' + p + 'NAME' for p in prefixes)}; rename or drop it")


def read_table(path: str | Path, known: Optional[Sequence[str]] = None, prefixes: Sequence[str] = ()
               ) -> list[dict[str, str]]:
    """Rows of a CSV or Parquet table as dicts of strings (Parquet needs pyarrow: pip install medfound[parquet]).
    With `known`, a column outside it (or the `prefixes`) is an error naming the nearest known column."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"table {path} not found")
    rows = _read_rows(path)
    if known is not None and rows:
        check_columns(path, rows[0].keys(), known, prefixes)
    return rows


def _read_rows(path: Path) -> list[dict[str, str]]:
    if path.suffix.lower() in (".parquet", ".pq"):
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError(f"reading {path.name} needs pyarrow: pip install medfound[parquet]") from e
        table = pq.read_table(path).to_pylist()
        return [{k: "" if v is None else "|".join(map(str, v)) if isinstance(v, list) else str(v)
                 for k, v in row.items()} for row in table]
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _split_labels(value: str) -> list[str]:
    return [v.strip() for v in re.split(r"[|;]", value) if v.strip()]


def table_labels(rows: list[dict[str, str]], label_type: Optional[str], label_names: Optional[list[str]]
                 ) -> tuple[LabelSchema, Callable[[dict[str, str]], Any]]:
    """Schema and row -> label from a table's `label` column (one class) or `labels` column (several,
    separated by '|' or ';': multi-label). No such column: unlabelled."""
    if not rows or ("label" not in rows[0] and "labels" not in rows[0]):
        if label_type not in (None, "none"):
            raise ValueError(f"label type {label_type!r} given but the table has no 'label' or 'labels' column")
        return LabelSchema(type="none"), lambda row: None
    if "labels" in rows[0]:
        if label_type not in (None, "multilabel"):
            raise ValueError(f"a 'labels' column is multi-label; --label-type {label_type} does not fit it")
        names = label_names or sorted({n for r in rows for n in _split_labels(r["labels"])})
        if not names:
            raise ValueError("the 'labels' column is empty in every row")
        index = {n: i for i, n in enumerate(names)}

        line = {id(r): i + 2 for i, r in enumerate(rows)}

        def to_multi(row: dict[str, str]) -> list[int]:
            found = _split_labels(row["labels"])
            unknown = [n for n in found if n not in index]
            if unknown:
                raise ValueError(f"table row {line.get(id(row))}: labels {unknown} are not among the class names "
                                 f"{names}; add them to --label-names")
            return sorted(index[n] for n in found)
        if label_names is not None:
            for r in rows:
                to_multi(r)
        return LabelSchema(type="multilabel", names=list(names)), to_multi
    missing = [i + 2 for i, r in enumerate(rows) if str(r.get("label", "")).strip() == ""]
    if missing:
        raise ValueError(f"table rows {missing[:5]} have no label but others do; label every row or none")
    line = {id(r): i + 2 for i, r in enumerate(rows)}
    schema, to_index = label_schema_for([r["label"] for r in rows], label_type, label_names)
    if label_names is not None:  # every label must be one the user named, checked before any work
        for r in rows:
            _named(to_index, r["label"], line[id(r)])
    return schema, lambda row: _named(to_index, row["label"], line.get(id(row)))


def _named(to_index: Callable[[Any], int], value: Any, line: Optional[int]) -> int:
    try:
        return to_index(value)
    except ValueError as e:
        raise ValueError(f"table row {line}: {e}" if line else str(e)) from None


def label_schema_for(values: list[Any], label_type: Optional[str], label_names: Optional[list[str]]
                     ) -> tuple[LabelSchema, Callable[[Any], int]]:
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
            seen = {int(str(v)) for v in present}
            label_names = [str(i) for i in range(max(seen) + 1)]
            gaps = [i for i in range(max(seen)) if i not in seen]
            if gaps or min(seen) < 0:
                raise ValueError(f"the integer labels {sorted(seen)} leave classes {gaps or 'below 0'} without a sample "
                                 "(a typo such as 7 in a 0/1 column makes a binary set 8-class); fix the labels, or "
                                 "name every class in index order with --label-names")
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
    except ValidationError as e:  # pydantic's message, made to name the flags
        raise ValueError(f"--label-type {label_type} with classes {label_names}: {e.errors()[0]['msg']}") from None


INGEST_KINDS.register("npz", builder="medfound.data.ingest.npz:read_npz",
                      description="MedMNIST-layout .npz (train/val/test images and labels)")
INGEST_KINDS.register("images", builder="medfound.data.ingest.images:read_images",
                      description="a folder of PNG/JPEG/TIFF + a CSV/Parquet table (labels, patients, sites, masks)")
INGEST_KINDS.register("dicom", builder="medfound.data.ingest.dicom:read_dicom",
                      description="DICOM files or folders, de-identified (PS3.15 basic profile), 2-D or multi-frame")
INGEST_KINDS.register("wsi", builder="medfound.data.ingest.wsi:read_wsi",
                      description="whole-slide images (SVS/TIFF) tiled at a target um/px with tissue detection")
INGEST_KINDS.register("volumes", builder="medfound.data.ingest.volumes:read_volumes",
                      description="NRRD/NIfTI volumes (+ label maps) as volumes, slices or patches")


def get_reader(kind: str) -> Callable[..., Ingested]:
    """The reader registered for `medfound shard KIND` (medfound.registry.INGEST_KINDS)."""
    return INGEST_KINDS.get(kind).load()


FRAMEWORK_OPTIONS = frozenset({"site", "name"})  # passed by `workflows.shard` itself, not options of the user's


def reader_options(kind: str) -> frozenset[str]:
    """The options the KIND reader takes: its keyword-only parameters (its signature is the declaration; `**_`
    only keeps the readers' calls uniform)."""
    import inspect

    params = inspect.signature(get_reader(kind)).parameters.values()
    return frozenset(p.name for p in params if p.kind == p.KEYWORD_ONLY) - FRAMEWORK_OPTIONS


def check_options(kind: str, options: dict) -> None:
    """Refuse options the KIND reader does not read, naming the kinds that do: one kind's option never passes
    silently on another (`shard npz --tile-size`)."""
    bad = sorted(set(options) - reader_options(kind))
    if not bad:
        return
    takers = {k: sorted(e.name for e in INGEST_KINDS if k in reader_options(e.name)) for k in bad}
    named = "; ".join(f"--{k.replace('_', '-')} ({'read by ' + ', '.join(takers[k]) if takers[k] else 'read by no kind'})"
                      for k in bad)
    raise ValueError(f"`medfound shard {kind}` does not read {named}: drop {'it' if len(bad) == 1 else 'them'}, or "
                     "use the kind that reads it")


KINDS = tuple(INGEST_KINDS.names())
