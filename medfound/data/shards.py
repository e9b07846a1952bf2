"""Write samples into WebDataset tar shards plus a manifest, atomically.

A sample is a dict:
- `key`: unique, letters/digits/`_`/`-` only, no PHI;
- `image`: a PIL image or an array. 2-D uint8/uint16 and HxWx3 uint8 become lossless PNG (`{key}.png`;
  16-bit values are kept as they are, e.g. raw DICOM pixel values); anything else (volumes, signed or
  float arrays) becomes `{key}.npy`;
- `split`; optional `label` (a class index, or a list of indices for multi-label schemas), `site`,
  `modality` (per sample, when a set mixes modalities), `patient` (a salted token, never an ID);
- `masks`: optional {name: array}, each stored like the image as `{key}.{name}.png` or `.npy`
  (vessel masks, field-of-view masks, label maps);
- `meta`: JSON-able facts about the sample (spacing, windowing, tile coordinates, ...).
In the tar a sample is `{key}.png|npy`, its masks, `{key}.cls` (single label) or `{key}.labels.json`
(multi-label), and `{key}.json` (meta + split + site + modality + patient). Shards are
`{split}-{index:06d}.tar`, filled in input order up to `max_count` samples or `max_mb`, with a fixed tar
mtime, so the same input gives byte-identical shards and the same digest.

The whole set is built in a temporary sibling directory and renamed into place at the end, so an
interrupted run never leaves a half-written shard set under the real name.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import webdataset as wds
from PIL import Image

import medfound
from medfound.data import location
from medfound.data.journal import Journal
from medfound.data.manifest import (LabelSchema, MANIFEST_NAME, Manifest, ShardInfo, by_split_order, count_table,
                                    download_set, read_manifest, write_manifest)
from medfound.data.tario import ShardError, shard_keys
from medfound.io import atomic_dir, sha256_file

_KEY_OK = re.compile(r"^[A-Za-z0-9_\-]+$")
_NAME_OK = re.compile(r"^[a-z][a-z0-9_]*$")


PNG_LEVEL = [6]  # zlib level of stored PNGs; `fast_png` lowers it where the shards are thrown away right after


@contextlib.contextmanager
def fast_png() -> Iterator[None]:
    """Store PNGs at zlib level 1 inside the block (the same pixels, 4-5x faster to write, larger files): for the
    private temporary shard sets `medfound predict` reads once, in this process."""
    PNG_LEVEL.append(1)
    try:
        yield
    finally:
        PNG_LEVEL.pop()


def encode_png(image: Any) -> bytes:
    """PIL image or HxW / HxWxC uint8, HxW uint16 array -> PNG bytes (lossless, 16-bit grey kept)."""
    if isinstance(image, np.ndarray):
        if not _png_able(image):
            raise ValueError(f"cannot store an image array of dtype {image.dtype} and shape {image.shape} as PNG")
        image = Image.fromarray(image.squeeze(-1) if image.ndim == 3 and image.shape[-1] == 1 else image)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=PNG_LEVEL[-1])
    return buf.getvalue()


def _png_able(a: np.ndarray) -> bool:
    return (a.dtype == np.uint8 and (a.ndim == 2 or a.ndim == 3 and a.shape[-1] in (1, 3, 4))) or \
        (a.dtype == np.uint16 and a.ndim == 2)


def encode(value: Any) -> tuple[str, bytes]:
    """(extension, bytes): PNG for PIL images and PNG-able arrays, NumPy's .npy for everything else."""
    if isinstance(value, Image.Image) or isinstance(value, np.ndarray) and _png_able(value):
        return "png", encode_png(value)
    if isinstance(value, np.ndarray):
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(value), allow_pickle=False)
        return "npy", buf.getvalue()
    raise ValueError(f"cannot store a {type(value).__name__}: give a PIL image or a NumPy array")


class _SplitWriter:
    """Rolls one split's samples over numbered shards, from shard `start` (a resumed ingest); `on_close` hears of
    every finished shard with its samples' keys and summaries."""

    def __init__(self, root: Path, split: str, max_count: int, max_bytes: int, start: int = 0,
                 on_close: Optional[Callable[[ShardInfo, list[str], list[dict]], None]] = None):
        self.root, self.split, self.max_count, self.max_bytes = root, split, max_count, max_bytes
        self.index, self.writer, self.count, self.bytes = start, None, 0, 0
        self.done: list[ShardInfo] = []
        self.on_close, self.keys, self.summaries = on_close, [], []

    def _name(self) -> str:
        return f"{self.split}-{self.index:06d}.tar"

    def write(self, record: dict[str, Any]) -> None:
        size = sum(len(v) + 1024 for k, v in record.items() if isinstance(v, bytes))  # + tar headers/padding
        if self.writer is not None and (self.count >= self.max_count or self.bytes + size > self.max_bytes):
            self.close()
            self.index += 1
        if self.writer is None:
            # an int mtime keeps plain ustar headers (a float one makes tarfile add a PAX header per member)
            self.writer = wds.TarWriter(str(self.root / self._name()), mtime=0, compress=False)
            self.count, self.bytes = 0, 0
        self.writer.write(record)
        self.count += 1
        self.bytes += size
        if self.on_close is not None:
            self.keys.append(record["__key__"])

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def close(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        path = self.root / self._name()
        info = ShardInfo(path=path.name, split=self.split, count=self.count, bytes=path.stat().st_size,
                         sha256=sha256_file(path))
        self.done.append(info)
        self.writer = None
        if self.on_close is not None:
            self.on_close(info, self.keys, self.summaries)
            self.keys, self.summaries = [], []


@dataclass
class Encoded:
    """A sample already encoded into its tar record (by an ingest worker process) and its summary for the counts."""

    record: dict[str, Any]
    summary: dict[str, Any]


def encode_sample(s: dict[str, Any], label_schema: LabelSchema) -> Encoded:
    """The tar record of one sample and its small summary for the manifest's counts; ValueError names the sample."""
    return Encoded(*_record(s, label_schema))


def _record(s: dict[str, Any], label_schema: LabelSchema) -> tuple[dict[str, Any], dict[str, Any]]:
    """The tar record of one sample and its small summary for the manifest's counts."""
    key = str(s["key"])
    if not _KEY_OK.match(key):
        raise ValueError(f"sample key {key!r} has characters other than letters, digits, '_' and '-' "
                         "(webdataset splits keys at '.'); fix the ingest's key")
    label = s.get("label")
    if label_schema.type == "none" and label is not None:
        raise ValueError(f"sample {key!r} has a label but the schema is unlabelled (type none)")
    if label_schema.type != "none" and label is None:
        raise ValueError(f"sample {key!r} has no label but the schema is {label_schema.type}: label every sample")
    if label is not None:
        multi = label_schema.type == "multilabel"
        if multi != isinstance(label, (list, tuple)):
            raise ValueError(f"sample {key!r}: label {label!r} does not fit a {label_schema.type} schema "
                             "(multi-label samples carry a list of class indices, others one index)")
        for lab in (label if multi else [label]):
            if not 0 <= int(lab) < label_schema.num_classes:
                raise ValueError(f"sample {key!r}: label {lab} outside 0..{label_schema.num_classes - 1} "
                                 f"(classes {label_schema.names})")
    split = str(s["split"])
    meta = dict(s.get("meta") or {}, split=split)
    for field in ("site", "modality", "patient"):
        if s.get(field):
            meta[field] = s[field]
    ext, data = encode(s["image"])
    record: dict[str, Any] = {"__key__": key, ext: data}
    for name, mask in (s.get("masks") or {}).items():
        if not _NAME_OK.match(name) or name in ("png", "npy", "cls", "json", "labels"):
            raise ValueError(f"sample {key!r}: mask name {name!r} must be lower-case letters, digits and '_'")
        m_ext, m_data = encode(mask)
        record[f"{name}.{m_ext}"] = m_data
    if label is not None:
        if label_schema.type == "multilabel":
            record["labels.json"] = json.dumps(sorted(int(x) for x in label)).encode()
        else:
            record["cls"] = str(int(label)).encode()
    record["json"] = json.dumps(meta, sort_keys=True).encode()
    summary = {"split": split, "site": s.get("site"), "modality": s.get("modality"),
               "label": None if label is None else ([int(x) for x in label] if isinstance(label, (list, tuple))
                                                    else int(label))}
    return record, summary


def write_shard_set(
    samples: Iterable[dict[str, Any]],
    out: str | Path,
    *,
    name: str,
    modality: str | Callable[[], str],
    label_schema: LabelSchema,
    source: dict[str, Any],
    ingest: dict[str, Any],
    site: Optional[str] = None,
    max_count: int = 1000,
    max_mb: float = 64.0,
    overwrite: bool = False,
    bags: Optional[Iterable[dict[str, Any]]] = None,
    skipped: Optional[dict[str, Any]] = None,
    deidentification: Optional[dict[str, Any]] = None,
    journal: Optional[Journal] = None,
) -> Manifest:
    """Write `samples` as shards under `out` with a manifest; return the manifest.

    `modality` (or a callable giving it), `bags`, `skipped` and `deidentification` may be filled by the
    ingest while `samples` is consumed: they are read after the last sample. `skipped` may list the files
    skipped under "files"; only the counts go into the manifest (file names can carry PHI). Raises ValueError naming the sample for a bad key, a duplicate
    key or a label outside the schema; nothing is written under `out` then.
    `journal` (a resumable ingest): build in its staging folder, record every finished shard there, start each
    split after the shards it already holds (those samples are not in `samples`), and keep the folder on failure.
    """
    records: list[dict[str, Any]] = list(journal.summaries) if journal else []
    seen: set[str] = set(journal.done_keys) if journal else set()
    fields: Counter = Counter(journal.fields) if journal else Counter()

    def on_close(info: ShardInfo, keys: list[str], summaries: list[dict]) -> None:
        journal.add_shard(info, keys, summaries, sorted(fields))  # type: ignore[union-attr]

    with atomic_dir(out, overwrite=overwrite, kind="shards", staging=journal.dir if journal else None) as tmp:
        writers: dict[str, _SplitWriter] = {}
        try:
            for s in samples:  # sample dicts, or samples a worker process already encoded
                record, summary = (s.record, s.summary) if isinstance(s, Encoded) else _record(s, label_schema)
                if record["__key__"] in seen:
                    raise ValueError(f"duplicate sample key {record['__key__']!r}: every sample in a shard set "
                                     "needs its own key")
                seen.add(record["__key__"])
                fields.update(k for k in record if k != "__key__")
                split = summary["split"]
                if split not in writers:
                    writers[split] = _SplitWriter(tmp, split, max_count, int(max_mb * 1024 * 1024),
                                                  start=journal.next_index(split) if journal else 0,
                                                  on_close=on_close if journal else None)
                writers[split].write(record)
                if journal:
                    writers[split].summaries.append(summary)
                records.append(summary)
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
        for w in writers.values():
            w.close()
        if not records:
            why = f"; skipped: {skipped}" if skipped else ""
            raise ValueError(f"no samples to write for {name!r}: check the input ({source}){why}")
        shards = sorted([i for w in writers.values() for i in w.done] + (journal.shards if journal else []),
                        key=lambda i: i.path)
        set_modality = modality() if callable(modality) else modality
        for r in records:
            r["modality"] = r["modality"] or set_modality
        counts = count_table(records)
        if label_schema.type != "none":
            counts["by_label"] = {sp: {label_schema.names[int(k)]: v for k, v in c.items()}
                                  for sp, c in counts["by_label"].items()}
        if skipped:
            skipped = {k: v for k, v in skipped.items() if k != "files"} if skipped.get("count", 1) else None
        manifest = Manifest(name=name, modality=set_modality, site=site, label_schema=label_schema, source=source,
                            ingest=ingest, shards=shards, counts=counts, fields=sorted(fields),
                            bags=list(bags) if bags is not None else None, skipped=skipped or None,
                            deidentification=deidentification, medfound_version=medfound.__version__,
                            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        if journal:
            journal.check_complete(seen)
        write_manifest(tmp, manifest)
    if journal:
        journal.finish(out)
    return manifest


def upload_shard_set(local: str | Path, url: str, *, overwrite: bool = False) -> Manifest:
    """Copy the finished shard set in `local` to the remote prefix `url`: the shards first, `manifest.json` last, so
    a reader sees the old set, no set, or the whole new one, never a manifest whose shards are still uploading.

    With `overwrite`, an existing set at `url` stays whole and readable until the new manifest replaces it: a new
    shard whose name is taken there by other content is uploaded under a new name (`train-000003.<sha12>.tar`, listed
    so in the new manifest), never over the old one; after the manifest swap, the old set's shards that the new one
    does not list (and shards an interrupted earlier overwrite left unlisted) are deleted. Without `overwrite` an
    existing set at `url` is refused. Returns the manifest as uploaded."""

    local = Path(local)
    target = location.join(url, MANIFEST_NAME)
    old = None
    if location.exists(target):
        if not overwrite:
            raise FileExistsError(f"{location.redact(url)} already holds a shard set ({MANIFEST_NAME}); pass "
                                  "--overwrite to replace it, or choose another --out")
        try:
            old = read_manifest(url)
        except ValueError:
            old = None
    built = read_manifest(local)
    taken = {s.path: s.sha256 for s in old.shards} if old is not None else {}
    # a name the old set uses for other bytes: upload beside it, never over it
    names = [s.path if taken.get(s.path, s.sha256) == s.sha256 else f"{s.path[:-4]}.{s.sha256[:12]}.tar"
             for s in built.shards]
    for s, name in zip(built.shards, names):
        location.upload(local / s.path, location.join(url, name))
    new = built
    if names != [s.path for s in built.shards]:  # the manifest lists the names as uploaded (its digest follows)
        import tempfile

        new = built.model_copy(update={"shards": [s.model_copy(update={"path": n}) for s, n in zip(built.shards,
                                                                                                names)]})
        with tempfile.TemporaryDirectory(prefix="medfound-manifest-") as tmp:
            write_manifest(tmp, new)
            location.upload(Path(tmp) / MANIFEST_NAME, target)  # the swap: readers now see the new set
    else:
        location.upload(local / MANIFEST_NAME, target)  # the swap
    keep = {s.path for s in new.shards}
    stale = {s.path for s in old.shards} if old is not None else set()
    stale |= {n for n in location.list_names(url) if _SHARD_NAME.match(n)}  # left by an interrupted overwrite
    for name in sorted(stale - keep):
        location.remove(location.join(url, name))
    return new


_SHARD_NAME = re.compile(r"^[a-z][a-z0-9_]*-\d{6}(\.[0-9a-f]{12})?\.tar$")  # what medfound names shards


def _sum_into(target: dict[str, Any], add: dict[str, Any]) -> dict[str, Any]:
    """Nested dicts of counts added key by key (the manifest's counts, skipped reasons, de-identification tallies);
    other values must agree and are kept."""
    for k, v in add.items():
        if isinstance(v, dict):
            _sum_into(target.setdefault(k, {}), v)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            target[k] = target.get(k, 0) + v
        else:
            target.setdefault(k, v)
    return target


def merge_parts(part_dirs: list[str | Path], out: str | Path, *, overwrite: bool = False) -> Manifest:
    """One shard set from the parts written by `medfound shard ... --part I/N` (any order of `part_dirs`).

    Every part is verified first (manifest digest, every shard's size, sha256 and sample count); the parts must be
    exactly 0..N-1 of one ingest (same source, settings, label schema and name), and no sample key may be in two
    parts. The shards are copied (hard-linked where the file system allows) and numbered per split in part order;
    counts, skipped inputs and de-identification tallies are summed; bags are concatenated. Nothing is written
    under `out` unless all of that holds.

    Parts and `out` may be remote prefixes (`s3://`, `gs://`; parts also `https://`): remote parts are downloaded
    into a temporary folder (each shard capped at its listed size and checked against its sha256), and a remote
    `out` is built there and uploaded as `medfound shard --out s3://...` uploads (shards first, manifest last)."""
    import tempfile

    if not part_dirs:
        raise ValueError("shard merge needs the part folders: medfound shard merge PART_DIR... --out DIR")
    remote_out = location.is_url(out)
    if not remote_out and not any(location.is_url(d) for d in part_dirs):
        return _merge_local([Path(d) for d in part_dirs], Path(out), overwrite, {})
    with tempfile.TemporaryDirectory(prefix="medfound-merge-") as tmp:
        local, shown = [], {}
        for i, d in enumerate(part_dirs):
            if location.is_url(d):
                copy = download_set(location.check_location(d), Path(tmp) / f"part{i}")
                shown[copy] = location.redact(str(d))
                local.append(copy)
            else:
                local.append(Path(d))
        if not remote_out:
            return _merge_local(local, Path(out), overwrite, shown)
        out = location.check_location(out)
        if not overwrite and location.exists(location.join(out, "manifest.json")):
            raise FileExistsError(f"{location.redact(out)} already holds a shard set (manifest.json); pass "
                                  "--overwrite to replace it, or choose another --out")
        _merge_local(local, Path(tmp) / "merged", False, shown)
        return upload_shard_set(Path(tmp) / "merged", out, overwrite=overwrite)


def _merge_local(part_dirs: list[Path], out: Path, overwrite: bool, shown: dict[Path, str]) -> Manifest:
    """merge_parts over local part folders into a local `out`; `shown`: the name to print for a downloaded part."""
    import os
    import shutil

    def label(d: Path) -> str:
        return shown.get(d, str(d))

    parts: dict[int, tuple[Path, Manifest]] = {}
    total_parts = None
    for d in part_dirs:
        m = read_manifest(d)
        where = m.ingest.get("part")
        if not (isinstance(where, list) and len(where) == 2):
            raise ValueError(f"{label(d)} is not a part (its manifest has no ingest.part): write parts with "
                             "`medfound shard KIND INPUT --part I/N --out PART_DIR`")
        i, n = int(where[0]), int(where[1])
        if total_parts is None:
            total_parts = n
        elif n != total_parts:
            raise ValueError(f"{label(d)} is part {i} of {n}, but {label(parts[min(parts)][0])} is of {total_parts}: "
                             "the parts come from different --part N")
        if i in parts:
            raise ValueError(f"part {i}/{n} is given twice ({label(parts[i][0])} and {label(d)}): the parts overlap")
        parts[i] = (d, m)
    missing = sorted(set(range(total_parts)) - set(parts))
    if missing:
        raise ValueError(f"parts {', '.join(f'{i}/{total_parts}' for i in missing)} are missing (given "
                         f"{', '.join(f'{i}/{total_parts}' for i in sorted(parts))}); ingest them with --part "
                         "before merging")
    order = [parts[i] for i in range(total_parts)]
    first_dir, first = order[0]

    def comparable(m: Manifest, field: str) -> Any:
        value = getattr(m, field)
        return {k: v for k, v in value.items() if k != "part"} if field == "ingest" else value

    def same(field: str, m: Manifest, d: Path) -> None:
        if comparable(m, field) != comparable(first, field):
            raise ValueError(f"{label(d)} and {label(first_dir)} differ in {field}: the parts come from different "
                             "ingests (same input, options and --name are needed)")

    salts = {label(d): (m.ingest.get("patient_salt") or {}).get("fingerprint") for d, m in order}
    if len(set(salts.values())) > 1:
        listed = ", ".join(f"{d}: {fp or 'not recorded'}" for d, fp in salts.items())
        raise ValueError(f"the parts' patient tokens come from different salts (salt fingerprints {listed}): the same "
                         "patient has unrelated tokens in them, so the split by patient would put one patient in "
                         "several splits. Re-ingest every part with the same --salt (or none, to derive it from the "
                         "inputs)")
    owner: dict[str, Path] = {}
    for d, m in order:
        for field in ("name", "label_schema", "source", "ingest", "site"):
            same(field, m, d)
        for s in m.shards:
            try:
                keys = shard_keys(str(d / s.path), s.model_dump(), "sha256")
            except (ShardError, FileNotFoundError) as e:
                raise ValueError(f"part {label(d)} is damaged: {e}; re-ingest that part") from None
            for key in keys:
                if key in owner:
                    raise ValueError(f"sample {key!r} is in {label(owner[key])} and in {label(d)}: the parts overlap")
                owner[key] = d
    with atomic_dir(out, overwrite=overwrite, kind="shards") as tmp:
        shards: list[ShardInfo] = []
        next_index: Counter = Counter()
        for d, m in order:
            for s in sorted(m.shards, key=lambda s: s.path):
                name = f"{s.split}-{next_index[s.split]:06d}.tar"
                next_index[s.split] += 1
                try:
                    os.link(d / s.path, tmp / name)
                except OSError:
                    shutil.copyfile(d / s.path, tmp / name)
                shards.append(s.model_copy(update={"path": name}))
        counts: dict[str, Any] = {}
        skipped: dict[str, Any] = {}
        deid: dict[str, Any] = {}
        for _, m in order:
            _sum_into(counts, m.counts)
            _sum_into(skipped, m.skipped or {})
            _sum_into(deid, m.deidentification or {})
        for k in ("by_split", "by_label"):
            counts[k] = by_split_order(counts.get(k, {}))
        for k in ("by_site", "by_modality"):
            counts[k] = dict(sorted(counts.get(k, {}).items()))
        if "dropped_values" in deid:
            deid["dropped_values"] = dict(sorted(deid["dropped_values"].items()))
        modalities = {m.modality for _, m in order}
        bags = [b for _, m in order for b in (m.bags or [])] if any(m.bags is not None for _, m in order) else None
        ingest = {k: v for k, v in first.ingest.items() if k != "part"} | {"merged_parts": total_parts}
        manifest = Manifest(name=first.name, modality=modalities.pop() if len(modalities) == 1 else "mixed",
                            site=first.site, label_schema=first.label_schema, source=first.source, ingest=ingest,
                            shards=sorted(shards, key=lambda i: i.path), counts=counts,
                            fields=sorted({f for _, m in order for f in (m.fields or [])}), bags=bags,
                            skipped=skipped or None, deidentification=deid or None,
                            medfound_version=medfound.__version__,
                            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        write_manifest(tmp, manifest)
    return manifest
