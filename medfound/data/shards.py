"""Write samples into WebDataset tar shards plus a manifest, atomically.

A sample is a dict: `key` (unique, no PHI), `image` (PIL image or uint8/uint16 array), `split`,
optional `label` (class index), `site` and `meta` (JSON-able). In the tar each sample is
`{key}.png` (lossless), `{key}.cls` (the label, when labelled) and `{key}.json` (meta + split +
site). Shards are `{split}-{index:06d}.tar`, filled in input order up to `max_count` samples or
`max_bytes`, with a fixed tar mtime so the same input gives byte-identical shards (and digest).

The whole set is built in a temporary sibling directory and renamed into place at the end, so an
interrupted run never leaves a half-written shard set under the real name.
"""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import webdataset as wds
from PIL import Image

import medfound
from medfound.data.manifest import LabelSchema, Manifest, ShardInfo, count_table, write_manifest
from medfound.io import atomic_dir, sha256_file

_KEY_OK = re.compile(r"^[A-Za-z0-9_\-]+$")


def encode_png(image: Any) -> bytes:
    """PIL image or HxW / HxWxC uint8/uint16 array -> PNG bytes (lossless, 16-bit grey kept)."""
    if isinstance(image, np.ndarray):
        if image.dtype == np.uint16 and image.ndim == 2:
            image = Image.fromarray(image)  # mode I;16
        elif image.dtype == np.uint8 and image.ndim in (2, 3):
            image = Image.fromarray(image.squeeze(-1) if image.ndim == 3 and image.shape[-1] == 1 else image)
        else:
            raise ValueError(f"cannot store an image array of dtype {image.dtype} and shape {image.shape}; "
                             "convert it to uint8 (or 2-D uint16) first")
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


class _SplitWriter:
    """Rolls one split's samples over numbered shards."""

    def __init__(self, root: Path, split: str, max_count: int, max_bytes: int):
        self.root, self.split, self.max_count, self.max_bytes = root, split, max_count, max_bytes
        self.index, self.writer, self.count, self.bytes = 0, None, 0, 0
        self.done: list[ShardInfo] = []

    def _name(self) -> str:
        return f"{self.split}-{self.index:06d}.tar"

    def write(self, record: dict[str, Any]) -> None:
        size = sum(len(v) for v in record.values() if isinstance(v, bytes))
        if self.writer is not None and (self.count >= self.max_count or self.bytes + size > self.max_bytes):
            self.close()
            self.index += 1
        if self.writer is None:
            self.writer = wds.TarWriter(str(self.root / self._name()), mtime=0.0, compress=False)
            self.count, self.bytes = 0, 0
        self.writer.write(record)
        self.count += 1
        self.bytes += size

    def close(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        path = self.root / self._name()
        self.done.append(ShardInfo(path=path.name, split=self.split, count=self.count,
                                   bytes=path.stat().st_size, sha256=sha256_file(path)))
        self.writer = None


def write_shard_set(
    samples: Iterable[dict[str, Any]],
    out: str | Path,
    *,
    name: str,
    modality: str,
    label_schema: LabelSchema,
    source: dict[str, Any],
    ingest: dict[str, Any],
    site: Optional[str] = None,
    max_count: int = 1000,
    max_mb: float = 64.0,
    overwrite: bool = False,
) -> Manifest:
    """Write `samples` as shards under `out` with a manifest; return the manifest.

    Raises ValueError naming the sample for a bad key, a duplicate key or a label outside the schema.
    """
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        writers: dict[str, _SplitWriter] = {}
        for s in samples:
            key = str(s["key"])
            if not _KEY_OK.match(key):
                raise ValueError(f"sample key {key!r} has characters other than letters, digits, '_' and '-' "
                                 "(webdataset splits keys at '.'); fix the ingest's key")
            if key in seen:
                raise ValueError(f"duplicate sample key {key!r}: every sample in a shard set needs its own key")
            seen.add(key)
            label = s.get("label")
            if label_schema.type == "none" and label is not None:
                raise ValueError(f"sample {key!r} has a label but the schema is unlabelled (type none)")
            if label is not None and not 0 <= int(label) < label_schema.num_classes:
                raise ValueError(f"sample {key!r}: label {label} outside 0..{label_schema.num_classes - 1} "
                                 f"(classes {label_schema.names})")
            split = str(s["split"])
            meta = dict(s.get("meta") or {}, split=split)
            if s.get("site"):
                meta["site"] = s["site"]
            record = {"__key__": key, "png": encode_png(s["image"]), "json": json.dumps(meta, sort_keys=True).encode()}
            if label is not None:
                record["cls"] = str(int(label)).encode()
            if split not in writers:
                writers[split] = _SplitWriter(tmp, split, max_count, int(max_mb * 1024 * 1024))
            writers[split].write(record)
            records.append({"split": split, "label": None if label is None else int(label), "site": s.get("site")})
        for w in writers.values():
            w.close()
        if not records:
            raise ValueError(f"no samples to write for {name!r}: check the input ({source})")
        shards = sorted((i for w in writers.values() for i in w.done), key=lambda i: i.path)
        counts = count_table(records)
        if label_schema.type != "none":
            counts["by_label"] = {sp: {label_schema.names[int(k)]: v for k, v in c.items()}
                                  for sp, c in counts["by_label"].items()}
        manifest = Manifest(name=name, modality=modality, site=site, label_schema=label_schema, source=source,
                            ingest=ingest, shards=shards, counts=counts, medfound_version=medfound.__version__,
                            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        write_manifest(tmp, manifest)
    return manifest
