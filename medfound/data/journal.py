"""The progress journal of a resumable ingest (`medfound shard ... --resume`), in `.NAME.partial/.progress.jsonl`.

JSON lines, appended and fsynced at every finished shard: the ingest's fingerprint, then per input its sample keys,
the change it made to the reader's side records (skip counts and reasons, de-identification counts, bags) and its
DICOM instance token, and per finished shard its manifest entry, keys and count summaries.

What it never holds: file names or paths. A skipped input is recorded by its index and reason only (names can carry
PHI: `DOE_JOHN_PID123/...`), and is read again on resume, so `--skipped-list` still names it. The folder is created
0700 and the journal 0600: only the user who ingests can read either while the ingest is unfinished.

Nothing in it is trusted on resume beyond what can be checked:
- every line carries a checksum over its content and the ingest's fingerprint; a line that fails it (edited by
  hand, or damaged) is dropped, so its input is read again and its shard (and the rest of that split) redone;
- every kept shard is checked against its recorded sha256 and size, and its sample keys are read back from the file
  and compared with the journal's;
- before the manifest is sealed, the samples written must be exactly those the inputs account for (`check_complete`):
  an input recorded with fewer keys than its samples, or a shard holding samples no input claims, stops the ingest.
The journal is deleted only after the finished set has been renamed into place, so a kill at any moment before
leaves a partial ingest that `--resume` continues.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

from medfound.data.manifest import ShardInfo

# Loaded by torch-free commands (`medfound ls`, `validate`, `--help`): medfound modules that bring in torch or
# numpy are imported inside the functions that need them (tests/test_layering.py keeps it so).

JOURNAL_NAME = ".progress.jsonl"


def partial_dir(out: str | Path) -> Path:
    """Where a resumable ingest of `out` builds: `.NAME.partial` beside it (kept after a failure or a kill)."""
    out = Path(out)
    return out.with_name(f".{out.name}.partial")


def _without_paths(side: dict[str, Any]) -> dict[str, Any]:
    """The side-record change of one input with the skipped files' paths removed (index and reason kept)."""
    skipped = side.get("skipped")
    if not isinstance(skipped, dict) or not skipped.get("files"):
        return side
    files = [[ref, None, reason] for ref, _, reason in skipped["files"]]
    return {**side, "skipped": {**skipped, "files": files}}


class Journal:
    """The progress of one resumable ingest (see the module docstring).

    Resuming keeps the shards whose files still match their record (per split, the unbroken run of them from the
    first), deletes everything else in the folder, and skips, without decoding them, the inputs whose every sample is
    in a kept shard and that were not skipped; the other inputs are read again and only their samples not in a kept
    shard are written. The result is byte-identical to an uninterrupted ingest."""

    def __init__(self, out: str | Path, fingerprint: str, resume: bool):
        self.dir = partial_dir(out)
        self.path = self.dir / JOURNAL_NAME
        self.fingerprint = fingerprint
        self.shards: list[ShardInfo] = []
        self.summaries: list[dict[str, Any]] = []
        self.done_keys: set[str] = set()
        self.fields: list[str] = []
        self.items: dict[int, dict[str, Any]] = {}
        self.resumed = False
        self.rejected = 0  # lines that failed their checksum on resume
        self._pending: list[str] = []
        if resume and self.path.is_file():
            self._load()
            self.resumed = True
        else:
            if resume:
                print(f"--resume: no partial ingest at {self.dir}; starting from the first input", flush=True)
            if self.dir.is_symlink() or self.dir.is_file():
                self.dir.unlink()
            elif self.dir.exists():
                shutil.rmtree(self.dir)
            self.dir.mkdir(parents=True, mode=0o700)
            os.chmod(self.dir, 0o700)  # whatever the umask: file names and keys stay the user's own until the end
            self._write([self._line({"t": "start", "fingerprint": fingerprint})])

    # --- lines -----------------------------------------------------------------------------------------------
    def _sum(self, record: dict[str, Any]) -> str:
        body = json.dumps(record, sort_keys=True, default=list)
        return hashlib.sha256(f"medfound-journal\0{self.fingerprint}\0{body}".encode()).hexdigest()[:32]

    def _line(self, record: dict[str, Any]) -> str:
        record = json.loads(json.dumps(record, default=list))  # tuples as lists, as they will be read back
        return json.dumps({**record, "sum": self._sum(record)}, default=list)

    def _checked(self, raw: str) -> Optional[dict[str, Any]]:
        try:
            record = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(record, dict):
            return None
        stored = record.pop("sum", None)
        return record if stored == self._sum(record) else None

    # --- resume ----------------------------------------------------------------------------------------------
    def _load(self) -> None:
        from medfound.data.tario import ShardError, shard_keys

        raws = self.path.read_text().splitlines()
        first = self._checked(raws[0]) if raws else None
        if first is None or first.get("t") != "start" or first.get("fingerprint") != self.fingerprint:
            raise ValueError(f"--resume: the partial ingest in {self.dir} was started with other inputs or options "
                             "(the fingerprint differs), or its journal is damaged; rerun without --resume to start "
                             "over")
        broken: set[str] = set()
        keep: set[str] = {JOURNAL_NAME}
        kept_lines: list[dict[str, Any]] = []
        for n, raw in enumerate(raws[1:], 2):
            record = self._checked(raw)
            if record is None:
                if n == len(raws) and not raw.endswith("}"):
                    continue  # the last line of a killed write
                self.rejected += 1
                try:  # a damaged shard line: its split is redone from there on
                    broken.add(json.loads(raw)["info"]["split"])
                except (ValueError, KeyError, TypeError):
                    pass
                continue
            if record.get("t") == "item":
                self.items[int(record["i"])] = record
            elif record.get("t") == "shard":
                info = ShardInfo(**record["info"])
                p = self.dir / info.path
                ok = info.split not in broken and p.is_file() and not p.is_symlink() and \
                    p.stat().st_size == info.bytes and len(record["summaries"]) == info.count
                if ok:
                    try:  # the keys read back from the file itself, with its sha256 and count checked
                        ok = shard_keys(str(p), info.model_dump(), "sha256") == list(record["keys"])
                    except (ShardError, OSError):
                        ok = False
                if not ok:
                    broken.add(info.split)
                    continue
                self.shards.append(info)
                keep.add(info.path)
                self.done_keys.update(record["keys"])
                self.summaries.extend(record["summaries"])
                self.fields = record["fields"]
                kept_lines.append(record)
        if self.rejected:
            print(f"--resume: {self.rejected} line(s) of {self.path} failed their checksum (edited or damaged): the "
                  "inputs and shards they described are read and written again", flush=True)
        # the rejected items' samples (if any sit in kept shards) stay; their inputs are read again (not skippable)
        for p in self.dir.iterdir():  # a half-written shard, or one that no longer matches its record
            if p.name not in keep:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        os.chmod(self.dir, 0o700)
        # the journal rewritten as what was kept, so that later appends extend a consistent file
        lines = [self._line(first)] + [self._line(v) for _, v in sorted(self.items.items())]
        lines += [self._line(r) for r in kept_lines]
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def next_index(self, split: str) -> int:
        return sum(1 for s in self.shards if s.split == split)

    def skippable(self, i: int) -> Optional[dict[str, Any]]:
        """The journal line of input `i` when it need not be read again: all its samples are in kept shards and it
        was not skipped (a skipped input is read again, so that its file name, which the journal does not keep,
        reaches `--skipped-list`)."""
        item = self.items.get(i)
        if item is not None and not item.get("redo") and all(k in self.done_keys for k in item["keys"]):
            return item
        return None

    # --- recording -------------------------------------------------------------------------------------------
    def add_item(self, i: int, keys: list[str], side: dict[str, Any], instance: Optional[str]) -> None:
        redo = bool((side.get("skipped") or {}).get("files")) if isinstance(side.get("skipped"), dict) else False
        record = {"t": "item", "i": i, "keys": list(keys), "side": _without_paths(side), "instance": instance,
                  "redo": redo}
        self.items[i] = json.loads(json.dumps(record, default=list))
        self._pending.append(self._line(record))

    def add_shard(self, info: ShardInfo, keys: list[str], summaries: list[dict], fields: list[str]) -> None:
        self._pending.append(self._line({"t": "shard", "info": info.model_dump(), "keys": keys,
                                         "summaries": summaries, "fields": fields}))
        self._write(self._pending)
        self._pending = []

    def _write(self, lines: list[str]) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        with os.fdopen(fd, "a") as f:
            f.write("".join(line + "\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())

    def check_complete(self, written: set[str]) -> None:
        """Before the manifest is sealed: the samples written are exactly those the inputs account for."""
        claimed: set[str] = set()
        for item in self.items.values():
            claimed.update(item["keys"])
        missing, extra = claimed - written, written - claimed
        if missing or extra:
            what = []
            if missing:
                what.append(f"{len(missing)} samples the inputs produced are in no shard (e.g. {sorted(missing)[0]})")
            if extra:
                what.append(f"{len(extra)} samples in the shards belong to no input (e.g. {sorted(extra)[0]})")
            raise ValueError(f"--resume: the journal in {self.dir} does not account for every sample ("
                             f"{'; '.join(what)}): it was edited or damaged. Nothing was written under --out; rerun "
                             "without --resume to ingest from the first input")

    def finish(self, out: str | Path) -> None:
        """The set is in place at `out` (renamed from the partial folder): its journal goes now, not before, so a
        kill during the rename leaves a partial ingest that --resume continues."""
        (Path(out) / JOURNAL_NAME).unlink(missing_ok=True)
