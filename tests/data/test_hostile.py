"""Hostile and broken shard sets, built in the test: a manifest never runs a shell command, and every shard is
checked against its manifest while it streams (size and count always, sha256 at evaluation and inspect)."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from medfound.data.manifest import Manifest, ShardInfo, read_manifest, verify_shards, write_manifest
from medfound.data.pipeline import Decoding, Reading, make_loader, shard_urls
from medfound.data.tario import ShardError, iter_members, tar_samples
from medfound.data.transforms import build_transform
from medfound.io import sha256_file

from helpers import ROOT

T_EVAL = build_transform("none", 32, (0.5,) * 3, (0.5,) * 3, train=False)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite(directory: Path, edit) -> None:
    """Apply `edit(manifest)` bypassing validation (as a hand-crafted file would), then seal it with a correct
    digest, so only the content checks can catch it."""
    m = read_manifest(directory)
    edit(m)
    m.digest = m.compute_digest()
    (directory / "manifest.json").write_text(m.model_dump_json(indent=2))


def _resync(directory: Path, shard: str) -> None:
    """Make the manifest agree with a tampered shard's bytes and sha256 (but not its count)."""
    def edit(m: Manifest) -> None:
        for s in m.shards:
            if s.path == shard:
                s.__dict__.update(bytes=(directory / shard).stat().st_size, sha256=sha256_file(directory / shard))
    _rewrite(directory, edit)


def _offsets(path: Path) -> list[tuple[str, int]]:
    with tarfile.open(path) as t:
        return [(m.name, m.offset) for m in t.getmembers()]


def _relabel(shard: Path, new) -> None:
    """Rewrite the shard with each `.cls` member replaced by `new(index, old_label)` (None: unchanged)."""
    out = io.BytesIO()
    with tarfile.open(shard) as src, tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as dst:
        i = 0
        for member in src.getmembers():
            payload = src.extractfile(member).read()
            if member.name.endswith(".cls"):
                label = new(i, int(payload))
                payload, i = (payload if label is None else str(label).encode()), i + 1
            dst.addfile(member, io.BytesIO(payload))
    shard.write_bytes(out.getvalue())


def _loader(urls, verify="size"):
    return make_loader(urls, Decoding(T_EVAL, labelled=True), batch_size=64, reading=Reading(verify=verify))


def test_a_manifest_shard_path_never_reaches_a_shell(shards, tmp_path):
    d = _copy(shards["retina"], tmp_path / "set")
    marker = tmp_path / "PWNED"
    _rewrite(d, lambda m: m.shards[0].__dict__.update(path=f"pipe:touch {marker}; cat {m.shards[0].path}"))
    with pytest.raises(ValueError, match="not a plain .tar file name"):
        read_manifest(d)
    for bad in ("../other/train-000000.tar", "/etc/passwd.tar", "sub/train.tar", "s3://bucket/x.tar"):
        with pytest.raises(ValueError, match="plain .tar file name"):
            ShardInfo(path=bad, split="train", count=1, bytes=1, sha256="0" * 64)
    proc = subprocess.run([sys.executable, "-m", "medfound.cli", "inspect", "."], cwd=d, capture_output=True, text=True)
    assert proc.returncode == 1 and "not a plain .tar file name" in proc.stderr
    with pytest.raises(ShardError, match="not a local file"):  # nor does a URL given to the reader directly
        list(tar_samples(iter([{"url": f"pipe:touch {marker}"}])))
    assert not marker.exists()


def test_a_shard_cut_at_a_member_boundary_is_caught_while_streaming(shards, tmp_path):
    d = _copy(shards["retina"], tmp_path / "set")
    urls, (m,) = shard_urls([d], "test")
    shard = Path(urls[0])
    names = _offsets(shard)
    cut = next(off for name, off in names if name.split(".")[0] != names[0][0].split(".")[0])  # the 2nd sample
    data = shard.read_bytes()
    shard.write_bytes(data[:cut] + b"\0" * 1024)  # a clean end-of-archive after the first sample
    with pytest.raises(ShardError, match=rf"{shard.name} is \d+ bytes, its manifest says"):
        [b for b in _loader(urls)]
    _resync(d, shard.name)  # size and sha256 now agree: only the count tells
    with pytest.raises(ShardError, match=rf"{shard.name} holds 1 samples, its manifest says {m.shards[0].count}"):
        [b for b in _loader(urls, verify="sha256")]
    assert any(f"holds 1 samples, its manifest says {m.shards[0].count}" in p for p in verify_shards(d))


def test_rewritten_labels_are_caught_by_sha256(shards, tmp_path):
    d = _copy(shards["retina"], tmp_path / "set")
    urls, _ = shard_urls([d], "test")
    shard = Path(urls[0])
    size = shard.stat().st_size
    _relabel(shard, lambda i, old: (old + 1) % 5)  # every label moved, same sizes
    assert shard.stat().st_size == size
    assert [len(b["key"]) for b in _loader(urls)]  # size + count cannot see it (documented: training's default)
    with pytest.raises(ShardError, match=f"{shard.name}: sha256 differs from its manifest"):
        [b for b in _loader(urls, verify="sha256")]
    assert any("sha256 differs" in p for p in verify_shards(d))


def test_inspect_recounts_samples_and_finds_duplicate_keys(shards, tmp_path):
    d = _copy(shards["retina"], tmp_path / "set")

    def inflate(m: Manifest) -> None:
        for s in m.shards:
            s.__dict__["count"] = s.count * 100
        m.counts["total"] *= 100
    _rewrite(d, inflate)
    problems = verify_shards(d)
    assert len(problems) == len(read_manifest(d).shards) and all("manifest says" in p for p in problems)
    proc = subprocess.run([sys.executable, "-m", "medfound.cli", "inspect", str(d)], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 1 and "PROBLEM" in proc.stdout

    dup = tmp_path / "dup"
    dup.mkdir()
    infos = []
    for name in ("train-000000.tar", "train-000001.tar"):
        with tarfile.open(dup / name, "w", format=tarfile.USTAR_FORMAT) as t:
            for member, payload in (("k1.cls", b"0"), ("k1.json", b"{}")):
                info = tarfile.TarInfo(member)
                info.size = len(payload)
                t.addfile(info, io.BytesIO(payload))
        infos.append(ShardInfo(path=name, split="train", count=1, bytes=(dup / name).stat().st_size,
                               sha256=sha256_file(dup / name)))
    base = read_manifest(shards["retina"])
    write_manifest(dup, base.model_copy(update={"shards": infos, "counts": {"total": 2}}))
    assert any("sample key 'k1' is also in train-000000.tar" in p for p in verify_shards(dup))


def test_a_member_claiming_more_bytes_than_the_file_is_a_named_error(tmp_path):
    info = tarfile.TarInfo("big.png")
    info.size = 8 * 1024 ** 3 - 1  # the largest ustar size: a MemoryError if read blindly
    (tmp_path / "huge.tar").write_bytes(info.tobuf(format=tarfile.USTAR_FORMAT) + b"\0" * 4096)
    with pytest.raises(ShardError, match="ends inside member big.png .*claims 8589934591 bytes"):
        list(iter_members(str(tmp_path / "huge.tar")))


@pytest.mark.slow
def test_evaluation_verifies_sha256_and_stops_on_a_tampered_external_set(finetuned, shards, tmp_path):
    from medfound.workflows import evaluate as evaluate_run

    d = _copy(shards["retina"], tmp_path / "external")
    shard = Path(shard_urls([d], "test")[0][0])
    data = bytearray(shard.read_bytes())
    data[-2000] ^= 0x01  # one byte inside the last member's data (or its padding): only sha256 can tell
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=f"{shard.name}: sha256 differs"):
        evaluate_run(finetuned, external=[str(d)], out=str(tmp_path / "eval"))


def test_an_out_of_range_label_is_a_named_error_at_read_time(shards, tmp_path):
    d = _copy(shards["retina"], tmp_path / "set")
    urls, _ = shard_urls([d], "test")
    shard = Path(urls[0])
    _relabel(shard, lambda i, old: 9 if i == 0 else None)  # one sample's label edited out of range
    _resync(d, shard.name)
    loader = make_loader(urls[:1], Decoding(T_EVAL, labelled=True, num_classes=5, max_bad_fraction=1.0), batch_size=64)
    batches = list(loader)
    bad = [r for b in batches for r in b.get("_bad", [])]
    assert len(bad) == 1 and "label 9 outside the manifest's classes 0..4" in bad[0]
    assert all(int(b["label"].max()) < 5 for b in batches)
    with pytest.raises(ValueError, match="could not be decoded"):
        list(make_loader(urls[:1], Decoding(T_EVAL, labelled=True, num_classes=5, max_bad_fraction=0.0), batch_size=64))


def test_a_sample_with_nan_voxels_is_skipped_not_averaged_into_the_batch(tmp_path):
    import numpy as np

    from medfound.data.manifest import LabelSchema
    from medfound.data.shards import write_shard_set

    images = [np.full((16, 16), 100.0 + i, dtype=np.float32) for i in range(4)]
    images[2][3, 5] = np.nan
    write_shard_set(({"key": f"s{i}", "image": im, "split": "train"} for i, im in enumerate(images)),
                    tmp_path / "set", name="nan", modality="ct", label_schema=LabelSchema(type="none"),
                    source={}, ingest={"kind": "test"})
    urls, _ = shard_urls([tmp_path / "set"], "train")
    batches = list(make_loader(urls, Decoding(build_transform("none", 16, (0.5,) * 3, (0.5,) * 3, train=False),
                                              max_bad_fraction=0.5), batch_size=8))
    keys = [k for b in batches for k in b["key"]]
    bad = [r for b in batches for r in b.get("_bad", [])]
    assert keys == ["s0", "s1", "s3"] and len(bad) == 1 and "s2" in bad[0] and "non-finite values" in bad[0]
    assert all(torch_finite(b["image"]) for b in batches)


def torch_finite(t) -> bool:
    import torch
    return bool(torch.isfinite(t.float()).all())


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_full_disk_is_one_line_naming_the_fix_and_keeps_what_was_written(tmp_path):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "256k"):
        pytest.skip("cannot mount a small tmpfs here (needs root): the full-disk path is not exercised")
    try:
        args = [sys.executable, "-m", "medfound.cli", "shard", "npz", str(ROOT / "data" / "medmnist" /
                "pneumoniamnist_demo.npz"), "--max-count", "64"]
        small = subprocess.run(args + ["--out", str(disk / "small"), "--shard-size-mb", "0.05"], cwd=ROOT,
                               capture_output=True, text=True)
        assert small.returncode in (0, 1)
        before = sorted(p.name for p in disk.iterdir())
        proc = subprocess.run(args + ["--out", str(disk / "big")], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert "no space left on the device" in proc.stderr and "intact" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        # no half-written set under --out and nothing else touched; the finished shards wait, hidden, for --resume
        assert sorted(p.name for p in disk.iterdir()) == sorted(before + [".big.partial"])
        assert not (disk / "big").exists()
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
