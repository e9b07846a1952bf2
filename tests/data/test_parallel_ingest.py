"""Ingest on several processes and in parts: byte-identical to one process, parts merged into one set with
their digests checked, bad parts and bad inputs refused by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medfound.cli import main
from medfound.data.manifest import read_manifest, verify_shards
from medfound.workflows import shard

from helpers import DATA, SHARED, tar_samples

RETINA = DATA / "medmnist" / "retinamnist_demo.npz"
NAMES = ["no DR", "mild", "moderate", "severe", "proliferative"]


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.tar"))}


def _identical(a: Path, b: Path) -> None:
    ma, mb = read_manifest(a), read_manifest(b)
    assert ma.digest == mb.digest
    assert _files(a) == _files(b)
    assert ma.skipped == mb.skipped and ma.deidentification == mb.deidentification and ma.bags == mb.bags


def _image_folder(root: Path) -> Path:
    """40 small images (a few of them broken) with masks, patients and sites in a table."""
    rng = np.random.default_rng(0)
    rows = ["path,label,patient_id,site,mask"]
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / f"img{i:02d}.png")
        Image.fromarray((rng.random((24, 24)) > 0.5).astype(np.uint8) * 255).save(root / f"img{i:02d}_mask.png")
        if i in (7, 22):
            (root / f"img{i:02d}.png").write_bytes(b"not a png")  # skipped, counted, named by row
        rows.append(f"img{i:02d}.png,{'ab'[i % 2]},p{i // 3},{'site' + str(i % 3)},img{i:02d}_mask.png")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.mark.parametrize("kind", ["npz", "images", "wsi", "dicom", "volumes"])
def test_two_workers_write_the_same_bytes_as_one(kind, tmp_path):
    if kind == "npz":
        inp, kw = RETINA, dict(label_type="ordinal", label_names=NAMES, max_count=128)
    elif kind == "images":
        (tmp_path / "img").mkdir()
        inp, kw = _image_folder(tmp_path / "img"), dict(max_count=8)
    elif kind == "wsi":
        inp, kw = DATA / "wsi", dict(mpp=1.0, tile_size=64, min_tissue=0.5, keep_names=True, max_count=32)
    elif kind == "dicom":
        pytest.importorskip("pydicom")
        inp, kw = SHARED / "dicom", dict(max_count=3, split_fractions={"train": 0.5, "test": 0.5})
    else:
        inp, kw = SHARED / "volumes", dict(modality="mr", layout="slices", keep_names=True, max_count=40)
    if not Path(inp).exists():
        pytest.skip(f"shared data {inp} is absent (the ../shared/data checkout is not on this machine)")
    one, _ = shard(kind, inp, tmp_path / "one", name="set", workers=1, **kw)
    two, skipped = shard(kind, inp, tmp_path / "two", name="set", workers=2, **kw)
    _identical(tmp_path / "one", tmp_path / "two")
    assert one.counts["total"] > 1
    if kind == "images":
        assert [ref for ref, _, _ in skipped] == ["table row 9", "table row 24"]
        assert two.skipped["count"] == 2


def test_parts_merge_into_one_set_with_the_whole_archive(tmp_path, capsys):
    whole, _ = shard("npz", RETINA, tmp_path / "whole", name="retina", label_type="ordinal", label_names=NAMES,
                     max_count=100)
    parts = []
    for i in range(3):
        out = tmp_path / f"part{i}"
        assert main(["shard", "npz", str(RETINA), "--out", str(out), "--name", "retina", "--label-type", "ordinal",
                     "--label-names", ",".join(NAMES), "--max-count", "100", "--part", f"{i}/3"]) == 0
        assert read_manifest(out).ingest["part"] == [i, 3]
        parts.append(str(out))
    # any order of the part folders gives the same merged set
    assert main(["shard", "merge", parts[2], parts[0], parts[1], "--out", str(tmp_path / "merged")]) == 0
    assert "merged 3 parts" in capsys.readouterr().out
    merged = read_manifest(tmp_path / "merged")
    assert verify_shards(tmp_path / "merged") == []
    assert merged.counts == whole.counts and merged.label_schema == whole.label_schema
    assert merged.source == whole.source and merged.ingest["merged_parts"] == 3
    a, b = tar_samples(tmp_path / "whole"), tar_samples(tmp_path / "merged")
    assert a == b  # the same samples, byte for byte (in other shards)


def test_merge_refuses_missing_overlapping_and_damaged_parts(tmp_path):
    kw = dict(name="retina", label_type="ordinal", label_names=NAMES, max_count=200)
    for i in range(3):
        shard("npz", RETINA, tmp_path / f"p{i}", part=f"{i}/3", **kw)
    p = [str(tmp_path / f"p{i}") for i in range(3)]
    with pytest.raises(ValueError, match="parts 1/3 are missing"):
        main_merge(p[0], p[2], out=tmp_path / "m")
    with pytest.raises(ValueError, match="part 0/3 is given twice"):
        main_merge(p[0], p[0], p[1], p[2], out=tmp_path / "m")
    shard("npz", RETINA, tmp_path / "other", part="1/3", **{**kw, "label_type": "multiclass"})
    with pytest.raises(ValueError, match="differ in label_schema"):
        main_merge(p[0], str(tmp_path / "other"), p[2], out=tmp_path / "m")
    tar = sorted((tmp_path / "p2").glob("*.tar"))[0]
    data = bytearray(tar.read_bytes())
    data[600] ^= 1
    tar.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"part {tmp_path / 'p2'} is damaged.*sha256"):
        main_merge(*p, out=tmp_path / "m")
    assert not (tmp_path / "m").exists()  # nothing written by a refused merge
    with pytest.raises(ValueError, match="is not a part"):
        shard("npz", RETINA, tmp_path / "full", **kw)
        main_merge(str(tmp_path / "full"), out=tmp_path / "m")


def main_merge(*parts: str, out: Path) -> None:
    from medfound.data.shards import merge_parts

    merge_parts(list(parts), out)


def test_a_bad_input_in_a_worker_names_the_row_and_writes_nothing(tmp_path):
    (tmp_path / "img").mkdir()
    folder = _image_folder(tmp_path / "img")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(folder / "img31_mask.png")  # another size than its image
    with pytest.raises(ValueError, match="labels.csv row 33: mask mask is 10x10 but the image is 24x24"):
        shard("images", folder, tmp_path / "out", workers=2)
    assert not (tmp_path / "out").exists()


def test_bad_part_specs_are_refused():
    for bad in ("3/3", "1", "a/b", "-1/2"):
        with pytest.raises(ValueError, match="--part"):
            shard("npz", RETINA, "/nonexistent/out", part=bad)


def test_the_slurm_array_script_ingests_parts_then_merges(tmp_path):
    """launch/slurm/shard.sbatch run as SLURM would run a 3-task array, then its merge step."""
    import os
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[2] / "launch" / "slurm" / "shard.sbatch"
    out = tmp_path / "retina"
    env = dict(os.environ, MEDFOUND_PYTHON=sys.executable, SLURM_ARRAY_TASK_COUNT="3", SLURM_CPUS_PER_TASK="1")
    for task in range(3):
        proc = subprocess.run(["bash", str(script), "npz", str(RETINA), str(out), "--max-count", "100"],
                              env=dict(env, SLURM_ARRAY_TASK_ID=str(task)), capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    proc = subprocess.run(["bash", str(script), "merge", str(out)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    whole, _ = shard("npz", RETINA, tmp_path / "whole", name="retina", max_count=100)
    assert read_manifest(out).counts == whole.counts and verify_shards(out) == []


def _cli_shard(*args: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "medfound.cli", "shard", *args], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2])


def test_a_failed_ingest_resumes_from_its_finished_shards(tmp_path):
    (tmp_path / "img").mkdir()
    folder = _image_folder(tmp_path / "img")
    good = (folder / "img31_mask.png").read_bytes()
    clean = _cli_shard("images", str(folder), "--out", str(tmp_path / "clean"), "--name", "s", "--max-count", "4")
    assert clean.returncode == 0, clean.stderr
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(folder / "img31_mask.png")  # row 33 breaks the ingest
    out = tmp_path / "out"
    failed = _cli_shard("images", str(folder), "--out", str(out), "--name", "s", "--max-count", "4")
    assert failed.returncode == 1 and "row 33" in failed.stderr
    partial = tmp_path / ".out.partial"
    kept = sorted(p.name for p in partial.glob("*.tar"))
    assert kept and not out.exists()  # the finished shards are kept aside; nothing under --out
    (folder / "img31_mask.png").write_bytes(good)
    damaged = partial / kept[0]
    damaged.write_bytes(damaged.read_bytes()[:-512])  # a kept shard that no longer matches: redone
    resumed = _cli_shard("images", str(folder), "--out", str(out), "--name", "s", "--max-count", "4", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "--resume: kept" in resumed.stdout
    _identical(tmp_path / "clean", out)
    assert not partial.exists()
    # another option than the partial ingest's is refused, naming the folder
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(folder / "img31_mask.png")
    assert _cli_shard("images", str(folder), "--out", str(tmp_path / "o3"), "--name", "s").returncode == 1
    again = _cli_shard("images", str(folder), "--out", str(tmp_path / "o3"), "--name", "s", "--max-count", "8",
                       "--resume")
    assert again.returncode == 1 and "fingerprint differs" in again.stderr and ".o3.partial" in again.stderr


def test_sigkill_then_resume_gives_the_uninterrupted_shards(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    npz = DATA / "medmnist" / "pneumoniamnist_demo.npz"
    args = ["npz", str(npz), "--name", "p", "--max-count", "40", "--workers", "2"]
    assert _cli_shard(*args, "--out", str(tmp_path / "whole")).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "medfound.cli", "shard", *args, "--out", str(tmp_path / "out")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = tmp_path / ".out.partial"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(partial.glob("*.tar"))) < 6 and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the ingest ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = _cli_shard(*args, "--out", str(tmp_path / "out"), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "--resume: kept" in resumed.stdout and " 0 finished shards" not in resumed.stdout
    _identical(tmp_path / "whole", tmp_path / "out")
