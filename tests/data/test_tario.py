"""The fast tar reader gives exactly what Python's tarfile gives, falls back for other headers, and
names a truncated or corrupt shard."""

from __future__ import annotations

import io
import tarfile

import pytest
import webdataset as wds

from medfound.data.pipeline import shard_urls
from medfound.data.tario import ShardError, iter_members, tar_samples


def _reference(url: str) -> list[tuple[str, bytes]]:
    with tarfile.open(url) as t:
        return [(m.name, t.extractfile(m).read()) for m in t.getmembers() if m.isfile()]


def test_same_members_as_tarfile(shards):
    urls, _ = shard_urls([shards["retina"], shards["he"]], "train")
    for url in urls:
        assert [(m["fname"], m["data"]) for m in iter_members(url)] == _reference(url)
    samples = list(tar_samples(iter({"url": u} for u in urls)))
    assert samples == list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))


def _write(url: str, fmt: int, names: list[str], symlink: bool = False) -> None:
    with tarfile.open(url, "w", format=fmt) as t:
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            data = f"payload {i}".encode() * (i + 1) * 40
            info.size, info.mtime = len(data), 1.5  # a float mtime: PAX writers add a record for it
            t.addfile(info, io.BytesIO(data))
            if symlink and i == 1:
                link = tarfile.TarInfo("link.txt")
                link.type, link.linkname = tarfile.SYMTYPE, name
                t.addfile(link)


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_pax_gnu_and_ustar_headers(tmp_path, fmt):
    url = str(tmp_path / "x.tar")
    long = "k" * 150 if fmt != tarfile.USTAR_FORMAT else "dir/" + "k" * 90  # ustar: name + prefix fields
    _write(url, fmt, ["a.cls", f"{long}.cls", "z.cls"])
    assert [(m["fname"], m["data"]) for m in iter_members(url)] == _reference(url)


def test_other_members_fall_back_to_tarfile(tmp_path):
    url = str(tmp_path / "links.tar")
    _write(url, tarfile.PAX_FORMAT, ["a.cls", "b.cls", "c.cls"], symlink=True)
    assert [(m["fname"], m["data"]) for m in iter_members(url)] == _reference(url)


def test_medfound_shards_use_plain_ustar_headers(shards):
    url = shard_urls([shards["he"]], "train")[0][0]
    with tarfile.open(url) as t:
        assert all(m.pax_headers == {} for m in t.getmembers())  # no per-member PAX overhead


def _header_offsets(url: str) -> list[int]:
    with tarfile.open(url) as t:
        return [m.offset for m in t.getmembers()]


def test_truncated_and_corrupt_shards_are_named(shards, tmp_path):
    url = shard_urls([shards["he"]], "train")[0][0]
    data = open(url, "rb").read()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(ShardError, match=r"cut.tar .*truncated.*medfound inspect"):
        list(iter_members(str(cut)))
    third = _header_offsets(url)[2]
    bad = bytearray(data)
    bad[third + 10] ^= 0xFF  # inside the third member's name: the header checksum no longer holds
    (tmp_path / "bad.tar").write_bytes(bytes(bad))
    got = []
    with pytest.raises(ShardError, match=f"corrupt tar header at byte {third}"):
        for m in iter_members(str(tmp_path / "bad.tar")):
            got.append((m["fname"], m["data"]))
    assert got == _reference(url)[:2]  # what came before the damage is intact
