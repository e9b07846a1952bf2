"""Where an evaluation writes, and how: never over what medfound did not write, and all or nothing.

An evaluation writes `eval.json`, `predictions.csv`, `report/` (report.md and plots) and, for MIL, `heatmaps/`
into a folder: the run's own directory (the default) or `--out DIR`. The rules, as for `publish` and `shard`:
- `--out` may be a new or empty folder, or a folder of the user's that holds none of those names; a folder holding a
  previous evaluation (its marker `.medfound-eval.json`) is replaced only with `--overwrite`; a folder with an
  `eval.json` or `report/` medfound did not write there, or another training run's directory, is refused.
- Everything is written into a staging folder inside the destination first (same file system), then moved into
  place file by file. A failure while evaluating (a full disk, a bad shard) leaves the destination as it was. Only
  the files the previous evaluation listed in its marker are removed when the new one does not write them again:
  a user's `report/notes.md` survives a re-evaluation.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Iterator

from medfound.io import atomic_write_json, is_run_dir

EVAL_MARKER = ".medfound-eval.json"
EVAL_OUTPUTS = ("eval.json", "predictions.csv", "report", "heatmaps")
PREDICT_MARKER = ".medfound-predict.json"  # `medfound predict` writes by the same rules, under its own marker
PREDICT_OUTPUTS = ("predictions.csv", "masks", "summary.json", "probabilities", "overlays", "heatmaps", "units.csv")


def _listed(folder: Path, marker: str = EVAL_MARKER) -> list[str]:
    try:
        files = json.loads((folder / marker).read_text()).get("files", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [f for f in files if isinstance(f, str) and not Path(f).is_absolute() and ".." not in Path(f).parts]


def check_destination(out: Path, run_path: Path, overwrite: bool, marker: str = EVAL_MARKER,
                      outputs: tuple[str, ...] = EVAL_OUTPUTS, what: str = "evaluation") -> None:
    """Raise before any work unless an evaluation (or, with the predict marker and outputs, a prediction) of the run
    at `run_path` may write into `out`."""
    out, run_path = Path(out), Path(run_path)
    if (out.resolve() == run_path.resolve() and marker == EVAL_MARKER) or not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; give a folder for eval.json, predictions.csv and report/")
    if is_run_dir(out):
        other = "another" if marker == EVAL_MARKER else "a"  # evaluation may write into its own run, not others
        raise FileExistsError(f"--out {out} is {other} training run's directory; {'an' if what[0] in 'aeiou' else 'a'} "
                              f"{what} of {run_path} is never written into it. Choose a new folder")
    if (out / marker).is_file():
        if not overwrite:
            raise FileExistsError(f"--out {out} holds an earlier {what} ({marker}); pass --overwrite to replace it "
                                  f"(only the files that {what} wrote), or choose another folder")
        return
    found = [name for name in outputs if (out / name).exists() or (out / name).is_symlink()]
    if found:
        raise FileExistsError(f"--out {out} holds {', '.join(found)} that medfound did not write there (no "
                              f"{marker}); choose a new folder, or move them away first")


@contextlib.contextmanager
def staged(out: Path, run_path: Path, marker: str = EVAL_MARKER, keep: bool = False) -> Iterator[Path]:
    """A staging folder inside `out` for one evaluation (or prediction: its marker); on success its files replace
    the previous one's (see the module docstring); on failure it is removed and `out` is untouched. `keep`: the
    previous one's files stay and the marker lists both (a prediction continued by the same model)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stage = out / f".medfound-out.{uuid.uuid4().hex[:8]}.{os.getpid()}.tmp"
    stage.mkdir()
    try:
        yield stage
        _commit(stage, out, run_path, marker, keep)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _commit(stage: Path, out: Path, run_path: Path, marker: str = EVAL_MARKER, keep: bool = False) -> None:
    old = set(_listed(out, marker))
    new = sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file() and not p.is_symlink())
    for rel in new:
        target = out / rel
        for parent in reversed(Path(rel).parents[:-1]):  # never write through a link planted in the destination
            if (out / parent).is_symlink():
                (out / parent).unlink()
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.is_dir():
            raise FileExistsError(f"{target} is a link or a folder where the evaluation writes a file; move it away")
        os.replace(stage / rel, target)
    for rel in [] if keep else sorted(old - set(new)):  # what the previous evaluation wrote and this one does not
        target = out / rel
        if target.is_file() and not target.is_symlink():
            target.unlink()
    if keep:
        new = sorted(set(new) | {rel for rel in old if (out / rel).is_file()})
    verb = "evaluate" if marker == EVAL_MARKER else "predict"
    atomic_write_json(out / marker, {"written_by": f"medfound {verb}", "run": str(run_path),
                                     "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": new})

