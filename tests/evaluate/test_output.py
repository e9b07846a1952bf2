"""Where `medfound evaluate` writes: never over a user's files, never into another run or a run still training, and
all or nothing (a full disk leaves the destination as it was)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from medfound.cli import main
from medfound.evaluate.output import EVAL_MARKER

from helpers import ROOT


def _evaluate(*args: str) -> int:
    return main(["evaluate", *args, "eval.bootstrap=20"])


def test_an_earlier_evaluation_is_replaced_only_when_asked_and_user_files_survive(finetuned, tmp_path, capsys):
    out = tmp_path / "eval"
    assert _evaluate(str(finetuned), "--out", str(out)) == 0
    assert (out / EVAL_MARKER).is_file() and (out / "report" / "report.md").is_file()
    (out / "report" / "notes.md").write_text("my reading of the ROC\n")
    (out / "mine.txt").write_text("keep\n")
    first = (out / "eval.json").read_text()
    capsys.readouterr()
    assert _evaluate(str(finetuned), "--out", str(out)) == 1
    err = capsys.readouterr().err
    assert "holds an earlier evaluation" in err and "pass --overwrite to replace it" in err
    assert (out / "eval.json").read_text() == first
    assert _evaluate(str(finetuned), "--out", str(out), "--overwrite") == 0
    assert (out / "report" / "notes.md").read_text() == "my reading of the ROC\n"
    assert (out / "mine.txt").read_text() == "keep\n" and (out / "report" / "report.md").is_file()
    assert not list(out.glob(".medfound-out.*.tmp"))


def test_files_medfound_did_not_write_and_other_runs_are_refused(finetuned, pretrained, tmp_path, capsys):
    theirs = tmp_path / "theirs"
    (theirs / "report").mkdir(parents=True)
    (theirs / "report" / "notes.md").write_text("x\n")
    (theirs / "eval.json").write_text("{}\n")
    for extra in ([], ["--overwrite"]):
        assert _evaluate(str(finetuned), "--out", str(theirs), *extra) == 1
        err = capsys.readouterr().err
        assert "holds eval.json, report that medfound did not write there" in err
    assert (theirs / "eval.json").read_text() == "{}\n" and (theirs / "report" / "notes.md").is_file()
    before = sorted(p.name for p in pretrained.iterdir())
    assert _evaluate(str(finetuned), "--out", str(pretrained), "--overwrite") == 1
    assert "is another training run's directory" in capsys.readouterr().err
    assert sorted(p.name for p in pretrained.iterdir()) == before


_HOLDER = """
import sys, time
from medfound.io import lock_dir
lock_dir(sys.argv[1])
print("locked", flush=True)
time.sleep(60)
"""


def test_a_run_that_is_still_training_is_not_written_into(finetuned, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finetuned, run)
    before = (run / "eval.json").read_text()
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert _evaluate(str(run)) == 1
        assert "in use by another medfound run" in capsys.readouterr().err
        assert (run / "eval.json").read_text() == before
        assert _evaluate(str(run), "--out", str(tmp_path / "elsewhere")) == 0  # reading it is fine
    finally:
        holder.kill()
        holder.wait()
    assert _evaluate(str(run)) == 0


def test_a_full_disk_leaves_the_destination_as_it_was(finetuned, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root): the full-disk path is not exercised")
    try:
        proc = subprocess.run([sys.executable, "-m", "medfound.cli", "evaluate", str(finetuned), "--out",
                               str(disk / "eval"), "eval.bootstrap=20"], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 1 and "no space left on the device" in proc.stderr and "intact" in proc.stderr
        assert sorted(p.name for p in (disk / "eval").iterdir()) == []  # no eval.json without its report
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
