"""Fast reading of local tar shards, grouped into samples by webdataset.

Python's `tarfile` parses each member header in pure Python (about 75 µs a member here), which is a
large share of the cost of a small image sample. The shards medfound (and webdataset's `TarWriter`) write
are plain ustar archives of regular files, whose headers are fixed 512-byte records: name, octal size,
checksum. `iter_members` reads those directly, verifies each header's checksum, and understands the PAX
and GNU long-name records other writers add; the first header that is anything else (links, sparse files,
base-256 sizes) hands the rest of the file to `tarfile`.
The members are grouped into samples by webdataset's `group_by_keys`, so keys and suffixes follow its rules.

Local files and the remote schemes of `medfound.data.location` (s3, gs, http(s), through fsspec) are opened here;
no URL is ever handed to webdataset's opener, whose `pipe:` runs a shell command, so a crafted manifest or recipe
cannot execute anything. Remote shards are streamed in 8 MB read-ahead blocks and get the same checks as local ones.

Verification while streaming (`tar_samples(verify=...)`), against the manifest of the shard's own folder:
- `size` (the default on every read): the file's byte size before reading, and its sample count after the last
  member (a shard cut at a member boundary parses cleanly but comes up short); a member whose header claims more
  bytes than the file holds is a named error, never a `MemoryError`;
- `sha256`: also the file's sha256 before reading (one extra pass over the file; evaluation and `inspect` use it;
  a remote shard is downloaded once into a spooled temporary file, hashed on the way, then parsed from it).
A mismatch raises `ShardError` naming the shard and the fix.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
from typing import IO, Iterator, Literal, Optional

from webdataset.tariterators import group_by_keys

from medfound.data import location
from medfound.io import sha256_file

_BLOCK = 512
VERIFY = ("size", "sha256")
Verify = Literal["size", "sha256"]


class ShardError(ValueError):
    """A shard cannot be read (truncated, corrupt header); the message names it and the fix."""


def _checksum_ok(header: bytes) -> bool:
    stored = header[148:156].split(b"\0", 1)[0].strip()
    if not stored:
        return False
    return int(stored, 8) == sum(header[:148]) + 8 * 32 + sum(header[156:])


class _Prepend(io.RawIOBase):
    """`head` followed by the rest of the stream `f`: hands a header already read, and what follows, to tarfile."""

    def __init__(self, head: bytes, f: IO[bytes]):
        self.head, self.f = head, f

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.head:
            n = min(len(b), len(self.head))
            b[:n], self.head = self.head[:n], self.head[n:]
            return n
        data = self.f.read(len(b))
        b[:len(data)] = data
        return len(data)


def _fallback(f: IO[bytes], url: str, header: bytes, left: int, fix: str) -> Iterator[dict]:
    """The rest of the file (`left` bytes from `header` on) through tarfile, every member bounded by what is left: a
    base-256 or PAX size of 10^12 bytes is a named error, never a read that grows until memory runs out."""
    with tarfile.open(fileobj=io.BufferedReader(_Prepend(header, f)), mode="r|") as tar:
        for member in tar:
            if member.size > left:
                raise ShardError(f"shard {url}: member {member.name} claims {member.size} bytes, more than the "
                                 f"{max(left, 0)} the file holds after it (a corrupt or hostile header){fix}")
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


def iter_members(url: str, fileobj: Optional[IO[bytes]] = None, file_size: Optional[int] = None) -> Iterator[dict]:
    """`{"fname", "data", "__url__"}` for each regular file of an uncompressed tar, in order.

    `url` is a local path or a remote URL (`medfound.data.location`); `fileobj` (with `file_size`) reads an
    already open copy of it instead (a verified download). Understands ustar, PAX extended headers (path, size) and
    GNU long names; anything else (links, sparse files, base-256 sizes) hands the rest of the file to `tarfile`.
    """
    if fileobj is None:
        file_size = location.size(url) if file_size is None else file_size
        with location.open_binary(url, limit=file_size) as f:
            yield from iter_members(url, f, file_size)
        return
    fix = f"; check it with `medfound inspect {location.split(url)[0] or '.'}` and re-create it"
    f = fileobj
    file_size = location.size(url) if file_size is None else file_size
    read = f.read
    pending: dict[str, str] = {}
    offset = 0
    while True:
        header = read(_BLOCK)
        if not header or header == b"\0" * _BLOCK:
            return
        if len(header) < _BLOCK:
            raise ShardError(f"shard {url} ends inside a tar header at byte {offset} (truncated){fix}")
        kind = header[156:157]
        if header[257:262] != b"ustar" or header[124] & 0x80 or kind not in (b"0", b"\0", b"x", b"g", b"L", b"5"):
            yield from _fallback(f, url, header, file_size - offset, fix)
            return
        if not _checksum_ok(header):
            raise ShardError(f"shard {url}: corrupt tar header at byte {offset}{fix}")
        name = header[:100].split(b"\0", 1)[0]
        prefix = header[345:500].split(b"\0", 1)[0]
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        if kind in (b"0", b"\0") and "size" in pending:
            size = int(pending["size"])
        if size > file_size - offset - _BLOCK:
            raise ShardError(f"shard {url} ends inside member {name.decode(errors='replace')} (truncated or a "
                             f"corrupt header: it claims {size} bytes at byte {offset}, the file holds "
                             f"{max(file_size - offset - _BLOCK, 0)} more){fix}")
        data = read(size)
        if len(data) < size:
            raise ShardError(f"shard {url} ends inside member {name.decode(errors='replace')} (truncated){fix}")
        read(-size % _BLOCK)  # the padding to the next 512-byte record: read, not seeked (streams cannot seek)
        offset += _BLOCK + size + (-size % _BLOCK)
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


_MANIFESTS: dict[tuple, dict[str, dict]] = {}  # (path, mtime_ns, size) or (url,) -> shards: parsed once per process


def _manifest_shards(directory: str) -> Optional[dict[str, dict]]:
    """The shards listed in `directory/manifest.json` (file name -> entry), or None when there is no manifest.
    Read as plain JSON (the manifest's schema and digest are checked where the shard set is opened), and parsed
    again only when the file changes (a remote manifest: once per process)."""
    path = location.join(directory or ".", "manifest.json")
    if location.is_url(path):
        stamp: tuple = (path,)
    else:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        stamp = (path, st.st_mtime_ns, st.st_size)
    if stamp not in _MANIFESTS:
        try:
            doc = json.loads(location.read_bytes(path))
        except location.RemoteNotFound:
            return None
        except ValueError as e:
            raise ShardError(f"{path} is not valid JSON ({e}); re-create the shard set with `medfound shard`") from None
        _MANIFESTS[stamp] = {s["path"]: s for s in doc.get("shards", []) if isinstance(s, dict) and "path" in s}
    return _MANIFESTS[stamp]


def _expected(url: str) -> Optional[dict]:
    """The manifest entry of the shard at `url` (from the manifest beside it), or None when there is no manifest."""
    directory, name = location.split(url)
    listed = _manifest_shards(directory)
    if listed is None:
        return None
    if name not in listed:
        raise ShardError(f"shard {url} is not listed in {location.join(directory, 'manifest.json')}; "
                         "read shard sets through their manifest (`medfound inspect` lists them)")
    return listed[name]


def sample_key(fname: str) -> str:
    """The sample a member belongs to, as webdataset groups them: the name up to the first '.' of its last path
    component (`a/b.seg.png` -> `a/b`)."""
    dot = fname.find(".", fname.rfind("/") + 1)
    return fname if dot < 0 else fname[:dot]


SPOOL_BYTES = 256 << 20  # a verified remote shard stays in memory up to this size, then spills to a temporary file


def _download_verified(url: str, sha256: Optional[str], size: int, fix: str) -> IO[bytes]:
    """The remote shard at `url` copied into a spooled temporary file, hashed on the way; refused before any of it
    is parsed when the hash differs."""
    h = hashlib.sha256()
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
    try:
        with location.open_binary(url, limit=size) as src:  # never more than the manifest lists
            while block := src.read(8 << 20):
                h.update(block)
                spool.write(block)
        if sha256 is not None and h.hexdigest() != sha256:
            raise ShardError(f"shard {url}: sha256 differs from its manifest (corrupt or replaced){fix}")
    except BaseException:
        spool.close()
        raise
    spool.seek(0)
    return spool


def _verified_members(url: str, expected: Optional[dict], verify: str) -> Iterator[dict]:
    """`iter_members(url)`, checked against its manifest entry: size (and sha256) first, sample count at the end."""
    fix = f"; check it with `medfound inspect {location.split(url)[0] or '.'}` and re-create the shard set"
    size = location.size(url)
    if expected is not None:
        if size != expected.get("bytes"):
            raise ShardError(f"shard {url} is {size} bytes, its manifest says {expected.get('bytes')} "
                             f"(truncated or replaced){fix}")
    f: Optional[IO[bytes]] = None
    if verify == "sha256" and expected is not None:
        if location.is_url(url):
            f = _download_verified(url, expected.get("sha256"), size, fix)
        elif sha256_file(url) != expected.get("sha256"):
            raise ShardError(f"shard {url}: sha256 differs from its manifest (corrupt or replaced){fix}")
    count, last = 0, None
    try:
        for member in iter_members(url, f, size):
            key = sample_key(member["fname"])
            if key != last:
                count, last = count + 1, key
            yield member
    finally:
        if f is not None:
            f.close()
    if expected is not None and count != expected.get("count"):
        raise ShardError(f"shard {url} holds {count} samples, its manifest says {expected.get('count')} "
                         f"(cut at a member boundary, or replaced){fix}")


def shard_keys(url: str, expected: dict, verify: Verify = "sha256") -> list[str]:
    """The sample keys of one shard, in order, read with every check of `_verified_members` against `expected`
    (a manifest entry: bytes, sha256, count); raises ShardError naming the shard."""
    keys: list[str] = []
    for member in _verified_members(url, expected, verify):
        key = sample_key(member["fname"])
        if not keys or keys[-1] != key:
            keys.append(key)
    return keys


def tar_samples(src: Iterator[dict], verify: Verify = "size") -> Iterator[dict]:
    """Pipeline stage: `{"url"}` dicts in, webdataset samples (`__key__`, `__url__`, one entry per suffix) out.

    Every URL is a local shard file or a remote one (`medfound.data.location.SCHEMES`); those in a folder with a
    manifest are verified at level `verify`."""
    if verify not in VERIFY:
        raise ValueError(f"verify={verify!r}: choose one of {', '.join(VERIFY)}")
    def members() -> Iterator[dict]:
        for item in src:
            url = str(item["url"])
            if location.is_url(url):
                location.check_location(url)
            elif not os.path.isfile(url):
                raise ShardError(f"shard {url} is not a local file (missing, or a URL of a scheme medfound does not "
                                 "read: only files listed in a shard set's manifest are read); check the set with "
                                 "`medfound inspect`")
            yield from _verified_members(url, _expected(url), verify)
    return group_by_keys(members())


def shard_stage(verify: Verify = "size"):
    """`tar_samples` at a verification level, as a webdataset pipeline stage."""
    def stage(src: Iterator[dict]) -> Iterator[dict]:
        return tar_samples(src, verify)
    return stage
