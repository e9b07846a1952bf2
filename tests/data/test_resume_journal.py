"""The resume journal of an interrupted ingest: no file names in it (they can carry PHI), private while the ingest is
unfinished, nothing in it trusted that cannot be checked (a hand-edited journal never drops samples silently), and
kept until the finished set is in place (a kill during the final rename loses no progress)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medfound.data.journal import JOURNAL_NAME, Journal, partial_dir
from medfound.data.manifest import read_manifest, verify_shards
from medfound.workflows import shard

from helpers import ROOT

PHI = "DOE_JOHNATHAN_PIDX98765_000"


def _archive(root: Path) -> Path:
    """40 images listed in a table; two unreadable ones sit in a folder whose name is PHI; row 33's mask has the
    wrong size (the ingest stops there until it is fixed)."""
    rng = np.random.default_rng(0)
    (root / PHI).mkdir(parents=True)
    rows = ["path,label,patient_id,mask"]
    for i in range(40):
        name = f"{PHI}/img{i:02d}.png" if i in (7, 22) else f"img{i:02d}.png"
        if i in (7, 22):
            (root / name).write_bytes(b"not a png")
        else:
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / name)
        Image.fromarray((rng.random((24, 24)) > 0.5).astype(np.uint8) * 255).save(root / f"img{i:02d}_mask.png")
        rows.append(f"{name},{'ab'[i % 2]},p{i // 3},img{i:02d}_mask.png")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def _break(folder: Path) -> bytes:
    good = (folder / "img31_mask.png").read_bytes()
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(folder / "img31_mask.png")
    return good


def _ingest(folder: Path, out: Path, **kw):
    return shard("images", folder, out, table=folder / "labels.csv", name="s", max_count=4, workers=1,
                 resumable=True, **kw)


def _interrupted(tmp_path: Path) -> tuple[Path, Path, bytes]:
    folder = _archive(tmp_path / "img")
    good = _break(folder)
    with pytest.raises(ValueError, match="row 33"):
        _ingest(folder, tmp_path / "out")
    return folder, partial_dir(tmp_path / "out"), good


def test_the_journal_keeps_no_file_names_and_is_private(tmp_path):
    folder = _archive(tmp_path / "clean_img")
    clean, skipped_clean = _ingest(folder, tmp_path / "clean")
    folder, partial, good = _interrupted(tmp_path)
    journal = partial / JOURNAL_NAME
    text = journal.read_text()
    assert '"t": "item"' in text and "table row 9" in text  # the skipped input is recorded by its row...
    assert PHI not in text and "DOE_JOHNATHAN" not in text  # ...never by its name
    assert stat.S_IMODE(partial.stat().st_mode) == 0o700 and stat.S_IMODE(journal.stat().st_mode) == 0o600
    (folder / "img31_mask.png").write_bytes(good)
    m, skipped = _ingest(folder, tmp_path / "out", resume=True)
    assert m.digest == clean.digest and m.counts == clean.counts
    # the skipped inputs were read again, so the names the user may ask for (--skipped-list) are all there
    assert [p for _, p, _ in skipped] == [p for _, p, _ in skipped_clean] and PHI in skipped[0][1]
    assert not partial.exists() and not (tmp_path / "out" / JOURNAL_NAME).exists()
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~_umask()  # opened up once finished


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write(path: Path, lines: list[dict]) -> None:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_a_hand_edited_journal_never_drops_samples(tmp_path, capsys):
    folder = _archive(tmp_path / "clean_img")
    clean, _ = _ingest(folder, tmp_path / "clean")
    folder, partial, good = _interrupted(tmp_path)
    journal = partial / JOURNAL_NAME
    lines = _lines(journal)
    items = [r for r in lines if r["t"] == "item" and r["keys"]]
    shards = [r for r in lines if r["t"] == "shard"]
    assert len(items) > 10 and len(shards) > 2
    items[3]["keys"] = []  # "this input made no samples": it would be skipped on resume
    shards[1]["keys"] = shards[1]["keys"][:2]  # a shard claiming fewer samples than it holds
    _write(journal, lines)
    (folder / "img31_mask.png").write_bytes(good)
    m, _ = _ingest(folder, tmp_path / "out", resume=True)
    printed = capsys.readouterr().out
    assert "2 line(s) of" in printed and "failed their checksum (edited or damaged)" in printed
    assert m.digest == clean.digest and m.counts["total"] == clean.counts["total"] == 38
    assert verify_shards(tmp_path / "out") == []


def test_a_forged_journal_line_is_caught_before_the_manifest_is_sealed(tmp_path):
    folder, partial, good = _interrupted(tmp_path)
    journal = partial / JOURNAL_NAME
    lines = _lines(journal)
    forger = Journal.__new__(Journal)  # a line re-signed as the journal would sign it (the checksum is no secret)
    forger.fingerprint = lines[0]["fingerprint"]
    item = next(r for r in lines if r["t"] == "item" and r["keys"])
    item.pop("sum")
    item["keys"] = []
    lines[lines.index(next(r for r in lines if r.get("i") == item["i"]))] = json.loads(forger._line(item))
    _write(journal, lines)
    (folder / "img31_mask.png").write_bytes(good)
    with pytest.raises(ValueError, match=r"does not account for every sample \(.*belong to no input.*rerun without "
                                         "--resume"):
        _ingest(folder, tmp_path / "out", resume=True)
    assert not (tmp_path / "out").exists()


_KILL_AT_RENAME = """
import os, sys
out = os.path.abspath(sys.argv[1])
def hook(event, args):
    if event == "os.rename" and os.path.abspath(os.fspath(args[1])) == out:
        os._exit(137)  # killed at the final rename
sys.addaudithook(hook)
from medfound.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_kill_at_the_final_rename_keeps_the_progress(tmp_path):
    folder = _archive(tmp_path / "img")
    out = tmp_path / "out"
    args = ["shard", "images", str(folder), "--table", str(folder / "labels.csv"), "--out", str(out), "--name", "s",
            "--max-count", "4", "--workers", "1"]
    killed = subprocess.run([sys.executable, "-c", _KILL_AT_RENAME, str(out), *args], capture_output=True, text=True,
                            cwd=ROOT)
    assert killed.returncode == 137, killed.stderr
    assert not out.exists() and (partial_dir(out) / JOURNAL_NAME).is_file()
    resumed = subprocess.run([sys.executable, "-m", "medfound.cli", *args, "--resume"], capture_output=True, text=True,
                             cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr
    assert "--resume: kept 10 finished shards (38 samples)" in resumed.stdout
    clean, _ = _ingest(folder, tmp_path / "clean")
    assert read_manifest(out).digest == clean.digest
