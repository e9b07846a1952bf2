"""Fast reading of local tar shards, grouped into samples by webdataset.

Python's `tarfile` parses each member header in pure Python (about 75 µs a member here), which is a
large share of the cost of a small image sample. The shards medfound (and webdataset's `TarWriter`) write
are plain ustar archives of regular files, whose headers are fixed 512-byte records: name, octal size,
checksum. `iter_members` reads those directly, verifies each header's checksum, and understands the PAX
and GNU long-name records other writers add; the first header that is anything else (links, sparse files,
base-256 sizes) hands the rest of the file to `tarfile`.
Remote or piped URLs (`pipe:`, `s3://`, ...) go through webdataset's own opener. Either way the members
are grouped into samples by webdataset's `group_by_keys`, so keys and suffixes follow its rules.
"""

from __future__ import annotations

import os
import tarfile
from typing import Iterator

import webdataset as wds
from webdataset.tariterators import group_by_keys

_BLOCK = 512


class ShardError(ValueError):
    """A shard cannot be read (truncated, corrupt header); the message names it and the fix."""


def _checksum_ok(header: bytes) -> bool:
    stored = header[148:156].split(b"\0", 1)[0].strip()
    if not stored:
        return False
    return int(stored, 8) == sum(header[:148]) + 8 * 32 + sum(header[156:])


def _fallback(url: str, offset: int) -> Iterator[dict]:
    with open(url, "rb") as f:
        f.seek(offset)
        with tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                if member.isfile():
                    yield {"fname": member.name, "data": tar.extractfile(member).read(), "__url__": url}


def _pax_records(data: bytes) -> dict[str, str]:
    """POSIX.1-2001 extended header records: "LEN key=value\\n" repeated."""
    out, i = {}, 0
    while i < len(data):
        space = data.index(b" ", i)
        length = int(data[i:space])
        key, _, value = data[space + 1: i + length - 1].partition(b"=")
        out[key.decode()] = value.decode("utf-8", "replace")
        i += length
    return out


def iter_members(url: str) -> Iterator[dict]:
    """`{"fname", "data", "__url__"}` for each regular file of an uncompressed local tar, in order.

    Understands ustar, PAX extended headers (path, size) and GNU long names; anything else (links,
    sparse files, base-256 sizes) hands the rest of the file to `tarfile`.
    """
    fix = f"; check it with `medfound inspect {os.path.dirname(url) or '.'}` and re-create it"
    with open(url, "rb", buffering=1 << 20) as f:
        pending: dict[str, str] = {}
        while True:
            offset = f.tell()
            header = f.read(_BLOCK)
            if not header or header == b"\0" * _BLOCK:
                return
            if len(header) < _BLOCK:
                raise ShardError(f"shard {url} ends inside a tar header at byte {offset} (truncated){fix}")
            kind = header[156:157]
            if header[257:262] != b"ustar" or header[124] & 0x80 or kind not in (b"0", b"\0", b"x", b"g", b"L", b"5"):
                yield from _fallback(url, offset)
                return
            if not _checksum_ok(header):
                raise ShardError(f"shard {url}: corrupt tar header at byte {offset}{fix}")
            name = header[:100].split(b"\0", 1)[0]
            prefix = header[345:500].split(b"\0", 1)[0]
            size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
            if kind in (b"0", b"\0") and "size" in pending:
                size = int(pending["size"])
            data = f.read(size)
            if len(data) < size:
                raise ShardError(f"shard {url} ends inside member {name.decode(errors='replace')} (truncated){fix}")
            f.seek(-size % _BLOCK, os.SEEK_CUR)
            if kind == b"x":
                pending.update(_pax_records(data))
            elif kind == b"L":
                pending["path"] = data.rstrip(b"\0").decode("utf-8")
            elif kind in (b"0", b"\0"):
                fname = pending.get("path") or (prefix + b"/" + name if prefix else name).decode("utf-8")
                pending = {}
                yield {"fname": fname, "data": data, "__url__": url}
            elif kind == b"5":  # a directory: no data; global PAX headers (g) are ignored
                pending = {}


def tar_samples(src: Iterator[dict]) -> Iterator[dict]:
    """Pipeline stage: `{"url"}` dicts in, webdataset samples (`__key__`, `__url__`, one entry per suffix) out."""
    def members() -> Iterator[dict]:
        for item in src:
            url = item["url"]
            if os.path.isfile(url):
                yield from iter_members(url)
            else:
                for sample in wds.tarfile_to_samples()(iter([item])):
                    key, u = sample.pop("__key__"), sample.pop("__url__", url)
                    sample.pop("__local_path__", None)
                    for suffix, data in sample.items():
                        yield {"fname": f"{key}.{suffix}", "data": data, "__url__": u}
    return group_by_keys(members())
