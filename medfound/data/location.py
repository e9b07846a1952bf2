"""Where a shard set lives: a local folder, or a prefix on object storage or a web server, read through fsspec.

A shard-set location is a local path or a URL with one of `SCHEMES` (`s3://bucket/prefix`, `gs://bucket/prefix`,
`https://host/path`). Anything else that looks like a URL is refused before it is opened: webdataset's own opener
runs `pipe:` URLs as shell commands, and a location comes from a recipe or a command line, never from a manifest
(shard names in a manifest are plain file names joined onto the set's location).

Credentials are never part of a location: `https://user:token@host/...` is refused; S3 reads the usual AWS
environment (`AWS_ACCESS_KEY_ID`, `AWS_PROFILE`, `AWS_ENDPOINT_URL` for an S3-compatible server, ...), GCS its
application-default credentials, and both honour fsspec's own configuration files (`~/.config/fsspec/`).

A server that cannot be reached, refuses access or times out raises `RemoteError` naming the URL and the cause
(no such host, connection refused, HTTP 403, timeout) within `CONNECT_TIMEOUT_S` seconds of the attempt.

A server is never trusted with more than the manifest says: a shard is read as exactly its listed byte count (a
body that goes on past it, an endless stream or a compression bomb, is refused, never buffered), bytes arrive as
stored (no transparent decompression: `Accept-Encoding: identity`, and a gzip answer is hashed as sent, so it fails
its sha256), and a shard must arrive within an overall deadline, `shard_deadline(size)`, however slowly the server
drips it. Small files (manifests, tables) are read up to `MAX_SMALL_FILE` bytes.
"""

from __future__ import annotations

import io
import os
import posixpath
import re
from typing import IO, Any
from urllib.parse import urlsplit

SCHEMES = ("s3", "gs", "gcs", "http", "https")
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60
MIN_BYTES_PER_S = 256 * 1024  # the slowest average rate a shard may arrive at (2 Mbit/s): beyond it, a deadline
MAX_SMALL_FILE = 256 << 20    # a manifest or table larger than this is not a medfound file


def shard_deadline(size: int) -> float:
    """Seconds a remote file of `size` bytes may take to arrive, start to end."""
    return CONNECT_TIMEOUT_S + READ_TIMEOUT_S + size / MIN_BYTES_PER_S
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


class RemoteError(OSError):
    """A remote shard location that cannot be read; the message names the URL, the cause and the fix."""


class RemoteNotFound(RemoteError, FileNotFoundError):
    """The server answered, and there is no such object (HTTP 404, no such key or bucket)."""


class RemoteDataError(RemoteError):
    """The server answered with more data than the file is listed with (an endless or inflated body)."""


def is_url(location: str | os.PathLike) -> bool:
    return bool(_URL.match(str(location)))


def check_location(location: str | os.PathLike) -> str:
    """`location` as a string, after refusing schemes medfound does not read and credentials inside a URL."""
    text = str(location)
    if text.startswith("pipe:") or (":" in text.split("/", 1)[0] and not is_url(text) and not os.path.isabs(text)
                                    and not re.match(r"^[A-Za-z]:[\\/]", text)):
        raise ValueError(f"shard location {text!r}: only local paths and {', '.join(s + '://' for s in SCHEMES)} URLs "
                         "are read (webdataset-style `pipe:` commands are never run)")
    if is_url(text):
        parts = urlsplit(text)
        if parts.scheme.lower() == "file":
            return parts.path
        if parts.scheme.lower() not in SCHEMES:
            raise ValueError(f"shard location {text!r}: scheme {parts.scheme!r} is not read; use a local path or one "
                             f"of {', '.join(s + '://' for s in SCHEMES)}")
        if parts.username or parts.password:
            raise ValueError(f"shard location {redact(text)!r} carries credentials: remove them from the URL and give "
                             "them through the environment (AWS_* variables, GOOGLE_APPLICATION_CREDENTIALS, an fsspec "
                             "config file or a .netrc), never in a recipe or a command line, which are logged")
        if parts.query or parts.fragment:
            raise ValueError(f"shard location {redact(text)!r}: a shard-set URL is a plain prefix (no '?' query or '#' "
                             "fragment; signed URLs cannot be joined with shard names)")
    return text


def redact(url: str) -> str:
    """`url` without a user, password or query string, for messages and logs."""
    if not is_url(url):
        return url
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}"


def join(base: str | os.PathLike, name: str) -> str:
    """`name` (a plain file name from a manifest) inside the location `base`."""
    text = str(base)
    if is_url(text):
        return text.rstrip("/") + "/" + name
    return os.path.join(text, name)


def split(url: str) -> tuple[str, str]:
    """(location of the folder, file name) of a shard path or URL."""
    if is_url(url):
        head, _, tail = url.rstrip("/").rpartition("/")
        return head, tail
    return os.path.split(url)


def basename(location: str | os.PathLike) -> str:
    text = str(location).rstrip("/")
    return posixpath.basename(text) if is_url(text) else os.path.basename(text)


def _filesystem(url: str):
    import fsspec

    scheme = urlsplit(url).scheme.lower()
    options: dict[str, Any] = {}
    if scheme in ("http", "https"):
        import aiohttp

        # bytes as stored: no transparent decompression (a gzip bomb would be inflated before any check)
        options["client_kwargs"] = {"timeout": aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT_S,
                                                                     sock_connect=CONNECT_TIMEOUT_S,
                                                                     sock_read=READ_TIMEOUT_S),
                                    "auto_decompress": False, "headers": {"Accept-Encoding": "identity"}}
    elif scheme == "s3":
        options["config_kwargs"] = {"connect_timeout": CONNECT_TIMEOUT_S, "read_timeout": READ_TIMEOUT_S,
                                    "retries": {"max_attempts": 2, "mode": "standard"}}
    try:
        return fsspec.filesystem("gcs" if scheme == "gs" else scheme, **options)
    except ImportError as e:
        package, extra = {"s3": ("s3fs", "remote"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs")}.get(
            scheme, ("aiohttp", "remote"))
        raise ImportError(f"reading {scheme}:// shards needs {package}: pip install medfound[{extra}]") from e


def _cause(e: BaseException) -> str:
    """A short, credential-free cause of a failed remote access."""
    text = f"{type(e).__name__}: {e}"
    low = text.lower()
    status = getattr(e, "status", None)  # aiohttp's ClientResponseError
    response = getattr(e, "response", None)  # botocore's ClientError
    if status is None and isinstance(response, dict):
        status = response.get("Error", {}).get("Code")
    if isinstance(e, PermissionError) or status in (401, 403, "403", "AccessDenied", "InvalidAccessKeyId",
                                                    "SignatureDoesNotMatch") or " 403" in text:
        return "access denied (HTTP 403): check the credentials in the environment and the bucket's policy"
    if isinstance(e, FileNotFoundError) or status in (404, "404", "NoSuchKey", "NoSuchBucket"):
        return "not found (HTTP 404)"
    if "name or service not known" in low or "nodename nor servname" in low or "dns" in low or \
            "temporary failure in name resolution" in low or "could not resolve" in low:
        return "no such host (DNS lookup failed)"
    if "timeout" in low or "timed out" in low or isinstance(e, TimeoutError):
        return f"timed out (no answer within {CONNECT_TIMEOUT_S} s to connect or {READ_TIMEOUT_S} s to read)"
    if "connection refused" in low or "cannot connect" in low or "connect call failed" in low or \
            "could not connect" in low:
        return "connection refused (is the server running, and the host and port right?)"
    return text.replace("\n", " ")[:300]


def _fail(url: str, e: BaseException, what: str) -> RemoteError:
    cause = _cause(e)
    kind = RemoteNotFound if cause.startswith("not found") else RemoteError
    return kind(f"cannot {what} {redact(url)}: {cause}")


def _remote(url: str, what: str, call: Any) -> Any:
    """`call(filesystem)` for the remote `url`; the library's own errors (DNS, refused, 403, timeout) become one
    `RemoteError` naming the URL and the cause. A missing package stays an ImportError naming the extra."""
    try:
        return call(_filesystem(url))
    except ImportError:
        raise
    except Exception as e:
        raise _fail(url, e, what) from None


def exists(url: str) -> bool:
    """Whether the file `url` exists; a server that cannot be reached is an error (fsspec's own `exists` would
    say False for it)."""
    if not is_url(url):
        return os.path.isfile(url)
    try:
        size(url)
        return True
    except RemoteNotFound:
        return False


def size(url: str) -> int:
    if not is_url(url):
        return os.path.getsize(url)
    return int(_remote(url, "read", lambda fs: fs.size(url)))


def read_bytes(url: str) -> bytes:
    """The whole file at `url` (a manifest, a small table), at most MAX_SMALL_FILE bytes."""
    if not is_url(url):
        with open(url, "rb") as f:
            return f.read()
    with open_binary(url, block_size=1 << 20, limit=MAX_SMALL_FILE, deadline=shard_deadline(MAX_SMALL_FILE)) as f:
        return f.read()


def open_binary(url: str, block_size: int = 8 << 20, limit: int | None = None,
                deadline: float | None = None) -> IO[bytes]:
    """A binary file object for `url` read front to back: buffered (local), one streamed GET (http/https: no range
    requests, so any web server will do), or `block_size` range reads with read-ahead (object stores).
    Remote: `limit` bytes at most (more is a RemoteError, never buffered), all of them within `deadline` seconds
    (default `shard_deadline(limit)` when a limit is given)."""
    if not is_url(url):
        return open(url, "rb", buffering=1 << 20)
    if deadline is None and limit is not None:
        deadline = shard_deadline(limit)
    if urlsplit(url).scheme.lower() in ("http", "https"):
        import aiohttp

        per_request = {} if deadline is None else {"timeout": aiohttp.ClientTimeout(
            total=deadline, connect=CONNECT_TIMEOUT_S, sock_connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S)}
        # `size` given: fsspec then skips its HEAD request, whose own `timeout` argument means something else
        f = _remote(url, "open", lambda fs: fs.open(url, "rb", block_size=0, **per_request,
                                                    **({"size": limit} if per_request else {})))
    else:
        f = _remote(url, "open", lambda fs: fs.open(url, "rb", block_size=block_size, cache_type="none"))
    return _Chunked(f, url, block_size, limit, deadline)


class _Chunked(io.RawIOBase):
    """A remote file read in `chunk`-byte requests and served from memory: the tar reader asks for 512-byte headers,
    and each read of an fsspec file is a round trip through its event loop. Failures name the URL. At most `limit`
    bytes are taken (a server sending more is refused), all within `deadline` seconds of opening."""

    def __init__(self, f: Any, url: str, chunk: int, limit: int | None = None, deadline: float | None = None):
        import time

        self.f, self.url, self.chunk = f, url, chunk
        self.buf, self.pos = b"", 0
        self.limit, self.fetched = limit, 0
        self.deadline = None if deadline is None else time.monotonic() + deadline
        self.allowed = deadline

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            out = self.buf[self.pos:] + self._fetch(-1)
            self.buf, self.pos = b"", 0
            return out
        while len(self.buf) - self.pos < n:
            more = self._fetch(max(self.chunk, n))
            if not more:
                break
            self.buf = self.buf[self.pos:] + more
            self.pos = 0
        out = self.buf[self.pos:self.pos + n]
        self.pos += len(out)
        return out

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def _fetch(self, n: int) -> bytes:
        if self.limit is not None:
            left = self.limit - self.fetched
            if left <= 0:
                if self._raw(1):  # the server goes on past the size it was listed with
                    raise RemoteDataError(f"{redact(self.url)} sent more than the {self.limit:,} bytes it is listed with "
                                      "(an endless or inflated body, or a replaced file): refused, nothing of it kept; "
                                      "check the server, or re-create the shard set")
                return b""
            n = left if n < 0 else min(n, left)
        data = self._raw(n)
        self.fetched += len(data)
        return data

    def _raw(self, n: int) -> bytes:
        import time

        try:
            data = self.f.read(n)
        except Exception as e:  # aiohttp / botocore errors raised through fsspec's sync layer
            raise _fail(self.url, e, "read") from None
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise RemoteError(f"cannot read {redact(self.url)}: timed out (not all of it arrived within "
                              f"{self.allowed:.0f} s, the deadline for its size at {MIN_BYTES_PER_S // 1024} KiB/s); "
                              "a stalled or dripping server")
        return data

    def close(self) -> None:
        try:
            self.f.close()
        finally:
            super().close()


def upload(local: str | os.PathLike, url: str) -> None:
    """Copy the local file `local` to `url` (a whole-object PUT: readers never see part of it)."""
    _remote(url, "write", lambda fs: fs.put_file(str(local), url))


def list_names(url: str) -> list[str]:
    """The file names directly under the remote prefix `url` (empty when it cannot be listed, e.g. a web server)."""
    try:
        found = _remote(url, "list", lambda fs: fs.ls(url, detail=False))
    except (RemoteError, NotImplementedError):
        return []
    return [posixpath.basename(str(f).rstrip("/")) for f in found]


def remove(url: str) -> None:
    _remote(url, "delete", lambda fs: fs.rm_file(url) if fs.exists(url) else None)
