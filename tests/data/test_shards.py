"""Shards round-trip the bundled real images exactly; the manifest's counts and checksums hold;
corruption is named; nothing already written is lost on a failed or repeated run."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medfound.cli import main
from medfound.data.manifest import LabelSchema, read_manifest, verify_shards
from medfound.data.shards import write_shard_set
from medfound.io import sha256_file
from medfound.workflows import shard

from helpers import tar_samples

DATA = Path(__file__).resolve().parents[2] / "data"


def test_npz_round_trip_counts_checksums_and_pixels(shards):
    d = shards["retina"]
    m = read_manifest(d)
    z = np.load(DATA / "medmnist" / "retinamnist_demo.npz")
    assert m.counts["by_split"] == {s: len(z[f"{s}_images"]) for s in ("train", "val", "test")}
    assert sum(s.count for s in m.shards) == m.counts["total"] == 1120
    assert len(m.split_shards("train")) == 5  # 600 samples, 128 per shard
    for s in m.shards:
        assert sha256_file(d / s.path) == s.sha256
        assert (d / s.path).stat().st_size == s.bytes
    assert verify_shards(d) == []
    samples = tar_samples(d)
    assert len(samples) == 1120
    for split in ("train", "test"):
        for i in (0, 17, len(z[f"{split}_images"]) - 1):
            s = samples[f"retinamnist_demo_{split}_{i:06d}"]
            np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(s["png"]))), z[f"{split}_images"][i])
            assert int(s["cls"]) == int(z[f"{split}_labels"][i, 0])
            assert json.loads(s["json"])["split"] == split
    assert m.counts["by_label"]["test"] == {"no DR": 174, "mild": 46, "moderate": 92, "severe": 68,
                                            "proliferative": 20}
    assert m.label_schema == LabelSchema(type="ordinal", names=["no DR", "mild", "moderate", "severe", "proliferative"])


def test_sharding_is_deterministic(shards, tmp_path):
    again = tmp_path / "again"
    shard("npz", DATA / "medmnist" / "retinamnist_demo.npz", again, name="retinamnist", modality="fundus",
          label_type="ordinal", label_names=["no DR", "mild", "moderate", "severe", "proliferative"], max_count=128,
          license="CC-BY-4.0")
    a, b = read_manifest(shards["retina"]), read_manifest(again)
    assert a.counts["by_modality"] == {"fundus": 1120}
    assert a.digest == b.digest
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]


def _copy_set(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_corrupt_and_truncated_shards_are_named(shards, tmp_path, capsys):
    d = _copy_set(shards["pneumonia"], tmp_path / "p")
    m = read_manifest(d)
    flipped, cut = d / m.shards[0].path, d / m.shards[1].path
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    cut.write_bytes(cut.read_bytes()[:1000])
    problems = verify_shards(d)
    assert len(problems) == 2
    assert any(str(flipped) in p and "sha256" in p for p in problems)
    assert any(str(cut) in p and "truncated" in p for p in problems)
    assert main(["inspect", str(d)]) == 1
    out = capsys.readouterr().out
    assert "PROBLEM" in out and "--overwrite" in out


def test_hand_edited_manifest_is_rejected(shards, tmp_path):
    d = _copy_set(shards["he"], tmp_path / "he")
    data = json.loads((d / "manifest.json").read_text())
    data["counts"]["total"] += 1
    (d / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="digest does not match"):
        read_manifest(d)
    with pytest.raises(FileNotFoundError, match="medfound shard KIND INPUT --out"):
        read_manifest(tmp_path / "nothing")


def _samples(n: int, bad_at: int | None = None):
    for i in range(n):
        yield {"key": f"s{i}", "image": np.full((8, 8), i, np.uint8), "split": "train",
               "label": 7 if i == bad_at else i % 2}


def test_existing_output_is_never_lost(tmp_path):
    out = tmp_path / "set"
    schema = LabelSchema(type="binary", names=["a", "b"])
    kw = dict(name="t", modality="other", label_schema=schema, source={}, ingest={})
    first = write_shard_set(_samples(5), out, **kw)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_shard_set(_samples(3), out, **kw)
    with pytest.raises(ValueError, match=r"sample 's2': label 7 outside 0..1"):
        write_shard_set(_samples(5, bad_at=2), out, overwrite=True, **kw)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # failed run left the old set intact
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # and no temporary debris
    assert read_manifest(out).digest == first.digest


def test_bad_keys_and_duplicates(tmp_path):
    schema = LabelSchema(type="none")
    kw = dict(name="t", modality="other", label_schema=schema, source={}, ingest={})
    with pytest.raises(ValueError, match="has characters other than"):
        write_shard_set([{"key": "a.b", "image": np.zeros((4, 4), np.uint8), "split": "train"}], tmp_path / "x", **kw)
    dup = [{"key": "a", "image": np.zeros((4, 4), np.uint8), "split": "train"}] * 2
    with pytest.raises(ValueError, match="duplicate sample key 'a'"):
        write_shard_set(dup, tmp_path / "y", **kw)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_sixteen_bit_images_are_kept(tmp_path):
    img = (np.arange(64, dtype=np.uint16) * 1000).reshape(8, 8)
    write_shard_set([{"key": "ct", "image": img, "split": "train"}], tmp_path / "s", name="t", modality="ct",
                    label_schema=LabelSchema(type="none"), source={}, ingest={})
    png = tar_samples(tmp_path / "s")["ct"]["png"]
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), img)
