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

import io
import json
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import webdataset as wds
from PIL import Image

import medfound
from medfound.data.manifest import LabelSchema, Manifest, ShardInfo, by_split_order, count_table, write_manifest
from medfound.io import atomic_dir, sha256_file

_KEY_OK = re.compile(r"^[A-Za-z0-9_\-]+$")
_NAME_OK = re.compile(r"^[a-z][a-z0-9_]*$")


def encode_png(image: Any) -> bytes:
    """PIL image or HxW / HxWxC uint8, HxW uint16 array -> PNG bytes (lossless, 16-bit grey kept)."""
    if isinstance(image, np.ndarray):
        if not _png_able(image):
            raise ValueError(f"cannot store an image array of dtype {image.dtype} and shape {image.shape} as PNG")
        image = Image.fromarray(image.squeeze(-1) if image.ndim == 3 and image.shape[-1] == 1 else image)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)
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
    journal: Optional["Journal"] = None,
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
            journal.finish()
        write_manifest(tmp, manifest)
    return manifest


def upload_shard_set(local: str | Path, url: str, *, overwrite: bool = False) -> None:
    """Copy the finished shard set in `local` to the remote prefix `url`: the shards first, `manifest.json` last, so
    a reader sees the old set, no set, or the whole new one, never a manifest whose shards are still uploading.
    With `overwrite`, the old manifest is removed before any shard is replaced and the old set's unlisted shards
    after the new manifest is up; without it an existing set at `url` is refused."""
    from medfound.data import location
    from medfound.data.manifest import MANIFEST_NAME, read_manifest

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
        location.remove(target)
    new = read_manifest(local)
    for s in new.shards:
        location.upload(local / s.path, location.join(url, s.path))
    location.upload(local / MANIFEST_NAME, target)
    if old is not None:
        keep = {s.path for s in new.shards}
        for s in old.shards:
            if s.path not in keep:
                location.remove(location.join(url, s.path))


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
    under `out` unless all of that holds."""
    import os
    import shutil

    from medfound.data.manifest import read_manifest
    from medfound.data.tario import ShardError, shard_keys

    if not part_dirs:
        raise ValueError("shard merge needs the part folders: medfound shard merge PART_DIR... --out DIR")
    parts: dict[int, tuple[Path, Manifest]] = {}
    total_parts = None
    for d in map(Path, part_dirs):
        m = read_manifest(d)
        where = m.ingest.get("part")
        if not (isinstance(where, list) and len(where) == 2):
            raise ValueError(f"{d} is not a part (its manifest has no ingest.part): write parts with "
                             "`medfound shard KIND INPUT --part I/N --out PART_DIR`")
        i, n = int(where[0]), int(where[1])
        if total_parts is None:
            total_parts = n
        elif n != total_parts:
            raise ValueError(f"{d} is part {i} of {n}, but {parts[min(parts)][0]} is of {total_parts}: the parts come "
                             "from different --part N")
        if i in parts:
            raise ValueError(f"part {i}/{n} is given twice ({parts[i][0]} and {d}): the parts overlap")
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
            raise ValueError(f"{d} and {first_dir} differ in {field}: the parts come from different ingests (same "
                             "input, options and --name are needed)")

    owner: dict[str, Path] = {}
    for d, m in order:
        for field in ("name", "label_schema", "source", "ingest", "site"):
            same(field, m, d)
        for s in m.shards:
            try:
                keys = shard_keys(str(d / s.path), s.model_dump(), "sha256")
            except (ShardError, FileNotFoundError) as e:
                raise ValueError(f"part {d} is damaged: {e}; re-ingest that part") from None
            for key in keys:
                if key in owner:
                    raise ValueError(f"sample {key!r} is in {owner[key]} and in {d}: the parts overlap")
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


JOURNAL_NAME = ".progress.jsonl"


def partial_dir(out: str | Path) -> Path:
    """Where a resumable ingest of `out` builds: `.NAME.partial` beside it (kept after a failure or a kill)."""
    out = Path(out)
    return out.with_name(f".{out.name}.partial")


class Journal:
    """The progress of a resumable ingest, in `.NAME.partial/.progress.jsonl` (JSON lines, appended and fsynced at
    every finished shard): the ingest's fingerprint, then per input its sample keys, the change it made to the
    reader's side records (skipped files, de-identification counts, bags) and its DICOM instance token, and per
    finished shard its manifest entry, keys and count summaries.

    Resuming keeps the shards whose files still match their sha256 (per split, the unbroken run of them from the
    first), deletes everything else in the folder, and skips, without decoding them, the inputs whose every sample is
    in a kept shard; the other inputs are read again and only their samples not in a kept shard are written. The
    result is byte-identical to an uninterrupted ingest."""

    def __init__(self, out: str | Path, fingerprint: str, resume: bool):
        import shutil

        self.dir = partial_dir(out)
        self.path = self.dir / JOURNAL_NAME
        self.fingerprint = fingerprint
        self.shards: list[ShardInfo] = []
        self.summaries: list[dict[str, Any]] = []
        self.done_keys: set[str] = set()
        self.fields: list[str] = []
        self.items: dict[int, dict[str, Any]] = {}
        self.resumed = False
        self._pending: list[str] = []
        if resume and self.path.is_file():
            self._load()
            self.resumed = True
        else:
            if resume:
                print(f"--resume: no partial ingest at {self.dir}; starting from the first input", flush=True)
            if self.dir.exists():
                shutil.rmtree(self.dir)
            self.dir.mkdir(parents=True)
            self._write([json.dumps({"t": "start", "fingerprint": fingerprint})])

    def _load(self) -> None:
        lines = []
        for raw in self.path.read_text().splitlines():
            try:
                lines.append(json.loads(raw))
            except ValueError:  # the last line of a killed write
                break
        if not lines or lines[0].get("t") != "start" or lines[0].get("fingerprint") != self.fingerprint:
            raise ValueError(f"--resume: the partial ingest in {self.dir} was started with other inputs or options "
                             "(the fingerprint differs); rerun without --resume to start over")
        broken: set[str] = set()
        keep: set[str] = {JOURNAL_NAME}
        for line in lines[1:]:
            if line["t"] == "item":
                self.items[int(line["i"])] = line
            elif line["t"] == "shard":
                info = ShardInfo(**line["info"])
                p = self.dir / info.path
                ok = info.split not in broken and p.is_file() and p.stat().st_size == info.bytes and \
                    sha256_file(p) == info.sha256
                if not ok:
                    broken.add(info.split)
                    continue
                self.shards.append(info)
                keep.add(info.path)
                self.done_keys.update(line["keys"])
                self.summaries.extend(line["summaries"])
                self.fields = line["fields"]
        for p in self.dir.iterdir():  # a half-written shard, or one that no longer matches its record
            if p.name not in keep:
                p.unlink()
        # the journal rewritten as what was kept, so that later appends extend a consistent file
        kept = [json.dumps(lines[0])] + [json.dumps(v) for _, v in sorted(self.items.items())]
        kept += [json.dumps(line) for line in lines[1:] if line["t"] == "shard" and line["info"]["path"] in keep]
        from medfound.io import atomic_write_text

        atomic_write_text(self.path, "\n".join(kept) + "\n")

    def next_index(self, split: str) -> int:
        return sum(1 for s in self.shards if s.split == split)

    def skippable(self, i: int) -> Optional[dict[str, Any]]:
        """The journal line of input `i` when all its samples are in kept shards (it need not be read again)."""
        item = self.items.get(i)
        if item is not None and all(k in self.done_keys for k in item["keys"]):
            return item
        return None

    def add_item(self, i: int, keys: list[str], side: dict[str, Any], instance: Optional[str]) -> None:
        self._pending.append(json.dumps({"t": "item", "i": i, "keys": keys, "side": side, "instance": instance},
                                        default=list))

    def add_shard(self, info: ShardInfo, keys: list[str], summaries: list[dict], fields: list[str]) -> None:
        self._pending.append(json.dumps({"t": "shard", "info": info.model_dump(), "keys": keys,
                                         "summaries": summaries, "fields": fields}))
        self._write(self._pending)
        self._pending = []

    def _write(self, lines: list[str]) -> None:
        import os

        with open(self.path, "a") as f:
            f.write("".join(line + "\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())

    def finish(self) -> None:
        """The ingest is complete: the journal goes before the folder becomes the shard set."""
        self.path.unlink(missing_ok=True)
