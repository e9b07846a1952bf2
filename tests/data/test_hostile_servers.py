"""Remote shard sets from servers that misbehave on purpose (started by this module on 127.0.0.1, stopped by it): a
body that goes on past the listed size, a gzip bomb, a server that drips one byte at a time, and members whose header
claims 10^12 bytes (PAX and GNU base-256 sizes). Each is a named error, quickly, holding no more than the manifest's
byte count; nothing of it is decompressed or buffered without bound."""

from __future__ import annotations

import functools
import gzip
import shutil
import tarfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from medfound.data import location
from medfound.data.manifest import ShardInfo, read_manifest, verify_shards, write_manifest
from medfound.data.tario import ShardError, iter_members
from medfound.io import sha256_file

BOMB_ZEROS = 64 << 20  # what the gzip bomb inflates to


class _Hostile(SimpleHTTPRequestHandler):
    """/ok/... as stored; /endless/, /bomb/, /drip/: their .tar files served as the name says (HEAD stays honest,
    so the size check passes and the body is what is tested)."""

    bombs: dict[str, bytes] = {}

    def log_message(self, *args):
        pass

    def do_GET(self):
        mode, _, rest = self.path.lstrip("/").partition("/")
        if mode == "ok" or not rest.endswith(".tar"):
            self.path = "/" + rest
            return super().do_GET()
        data = (Path(self.directory) / rest).read_bytes()
        try:
            if mode == "endless":  # the file, then zeros for ever (no Content-Length)
                self.send_response(200)
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data)
                while True:
                    self.wfile.write(b"\0" * 65536)
            elif mode == "bomb":  # gzip of the file and 64 MB of zeros, sent with Content-Encoding: gzip
                body = self.bombs.setdefault(rest, gzip.compress(data + b"\0" * BOMB_ZEROS, compresslevel=1))
                self.send_response(200)
                self.send_header("Content-Encoding", "gzip")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            elif mode == "drip":  # honest headers, then one byte every 0.2 s
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                for i in range(len(data)):
                    self.wfile.write(data[i:i + 1])
                    self.wfile.flush()
                    time.sleep(0.2)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_HEAD(self):
        _, _, rest = self.path.lstrip("/").partition("/")
        self.path = "/" + rest
        return super().do_HEAD()


@pytest.fixture(scope="module")
def hostile(shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    shutil.copytree(shards["retina"], root / "retina")
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Hostile, directory=str(root)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
    server.server_close()


def _first_shard(root: Path) -> str:
    return read_manifest(root / "retina").shards[0].path


def test_a_body_longer_than_listed_is_refused_without_keeping_it(hostile):
    http, root = hostile
    start = time.monotonic()
    problems = verify_shards(f"{http}/endless/retina")
    assert problems and all("sent more than the" in p and "bytes it is listed with" in p for p in problems)
    assert time.monotonic() - start < 30


def test_a_gzip_bomb_is_never_inflated(hostile):
    http, root = hostile
    problems = verify_shards(f"{http}/bomb/retina")
    assert problems and all("sha256 differs" in p or "sent more than" in p for p in problems), problems


def test_a_dripping_server_meets_the_deadline(hostile, monkeypatch):
    http, root = hostile
    monkeypatch.setattr(location, "CONNECT_TIMEOUT_S", 1)
    monkeypatch.setattr(location, "READ_TIMEOUT_S", 2)  # every byte arrives well within it: only the deadline stops
    name = _first_shard(root)
    start = time.monotonic()
    with pytest.raises(location.RemoteError, match="timed out"):
        list(iter_members(f"{http}/drip/retina/{name}"))
    assert time.monotonic() - start < 3 + location.shard_deadline((root / "retina" / name).stat().st_size)


def _with_member_header(root: Path, name: str, header: bytes) -> None:
    """Put `header` (one or more tar header blocks) in front of the first shard's members, keeping the manifest's
    sizes and hashes true, so only the reader's own bounds can stop it."""
    shard = root / name
    shard.write_bytes(header + shard.read_bytes())
    m = read_manifest(root)
    shards = [s if s.path != name else ShardInfo(path=name, split=s.split, count=s.count, bytes=shard.stat().st_size,
                                                 sha256=sha256_file(shard)) for s in m.shards]
    write_manifest(root, m.model_copy(update={"shards": shards}))


def _base256(size: int) -> bytes:
    info = tarfile.TarInfo("big.png")
    info.size = 4
    block = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    block[124:136] = b"\x80" + size.to_bytes(11, "big")  # GNU base-256 size
    block[148:156] = b" " * 8
    block[148:155] = f"{sum(block):06o}\0".encode()
    return bytes(block)


def _pax(size: int) -> bytes:
    info = tarfile.TarInfo("big.png")
    info.size = 4
    info.pax_headers = {"size": str(size)}
    return info.tobuf(format=tarfile.PAX_FORMAT)


@pytest.mark.parametrize("header", [_base256, _pax], ids=["gnu_base256", "pax"])
def test_a_member_claiming_a_terabyte_is_a_named_error(hostile, tmp_path, header):
    http, root = hostile
    target = root / f"claims_{header.__name__}"
    shutil.copytree(root / "retina", target)
    name = _first_shard(root)
    _with_member_header(target, name, header(10 ** 12))
    for url in (str(target / name), f"{http}/ok/{target.name}/{name}"):
        with pytest.raises(ShardError, match="1000000000000 bytes"):
            list(iter_members(url))
    problems = verify_shards(f"{http}/ok/{target.name}")
    assert any("1000000000000 bytes" in p for p in problems), problems
