"""Atomic outputs: --overwrite replaces only a medfound output of the same kind (never a run, never unrelated
files), and temporaries left by a killed write are cleaned on the next write."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from medfound.io import atomic_dir, check_replaceable, clean_stale_temporaries

from helpers import DATA, ROOT


def _shard(out, overwrite=False):
    from medfound.workflows import shard

    return shard("npz", DATA / "medmnist" / "pneumoniamnist_demo.npz", out, max_count=64, overwrite=overwrite)[0]


def test_overwrite_replaces_a_shard_set_but_never_unrelated_files(tmp_path):
    out = tmp_path / "set"
    first = _shard(out)
    assert _shard(out, overwrite=True).digest == first.digest  # a shard set is replaced by a shard set
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("years of work")
    with pytest.raises(FileExistsError, match="holds files medfound did not write"):
        _shard(mine, overwrite=True)
    assert (mine / "chapter1.tex").read_text() == "years of work" and sorted(os.listdir(mine)) == ["chapter1.tex"]


def test_overwrite_never_replaces_or_contains_a_run(finetuned, tmp_path):
    from medfound.workflows import publish_run

    before = sorted(p.relative_to(finetuned) for p in finetuned.rglob("*"))
    with pytest.raises(FileExistsError, match="is a training run directory"):
        publish_run(finetuned, finetuned, overwrite=True)
    with pytest.raises(FileExistsError, match="contains one"):
        check_replaceable(finetuned.parent, "model")
    proc = subprocess.run([sys.executable, "-m", "medfound.cli", "import", str(finetuned / "export"), "--format", "timm",
                           "--out", str(finetuned), "--overwrite"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and "training run directory" in proc.stderr
    assert sorted(p.relative_to(finetuned) for p in finetuned.rglob("*")) == before
    _shard(tmp_path / "s")
    with pytest.raises(FileExistsError, match="is a shard set"):  # kinds do not mix either
        check_replaceable(tmp_path / "s", "model")


def test_stale_temporaries_of_a_killed_write_are_cleaned(tmp_path):
    target = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.0123abcd.{dead.stdout.strip()}.tmp"
    stale.mkdir()
    (stale / "half.tar").write_bytes(b"x")
    live = tmp_path / f".out.4567abcd.{os.getpid()}.tmp"  # this process's own, still being written
    live.mkdir()
    unrelated = tmp_path / ".out.notes.tmp"  # not a name medfound makes
    unrelated.mkdir()
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("done")
    assert not stale.exists() and live.exists() and unrelated.exists() and (target / "a").read_text() == "done"
    assert clean_stale_temporaries(target) == []


def test_atomic_dir_gives_files_the_umasks_normal_mode(tmp_path):
    """safetensors writes 0600 files; a published folder must be readable as the umask allows (issue 17, item 9)."""
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "weights.safetensors").write_bytes(b"x")
            os.chmod(tmp / "weights.safetensors", 0o600)
            (tmp / "sub").mkdir()
            (tmp / "sub" / "run.sh").write_text("#!/bin/sh\n")
            os.chmod(tmp / "sub" / "run.sh", 0o700)
    finally:
        os.umask(old)
    assert (tmp_path / "out" / "weights.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "out" / "sub" / "run.sh").stat().st_mode & 0o777 == 0o755
