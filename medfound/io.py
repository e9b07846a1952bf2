"""Atomic file and directory writes, and checksums.

Everything medfound writes that a user relies on (shards, manifests, checkpoints, exports, cards)
goes through here: content is written under a temporary name in the same directory, flushed to
disk, then renamed into place, so a crash or a kill leaves either the old result or the new one,
never a half-written file under the real name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator


def write_failure(e: BaseException) -> str | None:
    """A short reason when `e` is a failed write (full disk, quota, read-only file system), else None. torch.save
    reports a full disk as a RuntimeError ("enforce fail ... unexpected pos") and safetensors as a SafetensorError
    ("No space left on device (os error 28)"), not as an OSError."""
    import errno

    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on the device"
    if isinstance(e, OSError) and e.errno == errno.EROFS:
        return "the file system is read-only"
    text = str(e)
    if (isinstance(e, RuntimeError) and ("unexpected pos" in text or "enforce fail" in text)) or \
            "No space left on device" in text or "os error 28" in text:
        return "no space left on the device"
    return None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


# What a folder medfound replaces with --overwrite must already be: the marker file of the same kind of output.
OUTPUT_KINDS = {"shards": "a shard set (manifest.json)", "model": "a published or imported model (config.json or "
                "export/*.json with a medfound block)", "bags": "a bag folder (bags.json)"}


def is_run_dir(path: Path) -> bool:
    """A training run's directory: its config.yaml beside checkpoints/ or the run lock."""
    return (path / "config.yaml").is_file() and ((path / "checkpoints").is_dir() or (path / LOCK_NAME).exists())


def _has_medfound_block(path: Path) -> bool:
    try:
        return isinstance(json.loads(path.read_text()).get("medfound"), dict)
    except (OSError, ValueError, AttributeError):
        return False


def output_kind(path: Path) -> str | None:
    """Which medfound output `path` is by its marker file (see OUTPUT_KINDS), or None."""
    manifest = path / "manifest.json"
    if manifest.is_file():
        try:
            if str(json.loads(manifest.read_text()).get("format", "")).startswith("medfound-shards/"):
                return "shards"
        except (OSError, ValueError, AttributeError):
            pass
    if (path / "bags.json").is_file():
        return "bags"
    if _has_medfound_block(path / "config.json") or any(_has_medfound_block(p) for p in path.glob("export/*.json")):
        return "model"
    return None


def _run_dir_inside(path: Path, depth: int = 4, max_dirs: int = 2000) -> Path | None:
    """A run directory at or below `path` (a walk over folders `depth` deep), or None. A tree with more than
    `max_dirs` folders is not walked to the end, so it counts as holding one: never replaced unseen."""
    todo, seen = [(path, 0)], 0
    while todo:
        d, level = todo.pop()
        if is_run_dir(d):
            return d
        if level >= depth:
            continue
        try:
            with os.scandir(d) as entries:
                for e in entries:
                    if e.is_dir(follow_symlinks=False):
                        seen += 1
                        if seen > max_dirs:
                            return path
                        todo.append((Path(e.path), level + 1))
        except OSError:
            continue
    return None


def check_replaceable(path: str | os.PathLike, kind: str) -> None:
    """Raise unless `path` may be replaced by a new output of `kind`: it must be absent, empty, or hold that
    kind's marker; never a run directory or a folder containing one. Nothing medfound did not write is deleted."""
    path = Path(path)
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return
    if not path.is_dir():
        raise FileExistsError(f"{path} is a file, not a folder; choose another output")
    run = _run_dir_inside(path)
    if run == path and not is_run_dir(path):
        raise FileExistsError(f"refusing to replace {path}: it holds too many folders to rule out a training run "
                              "directory inside; --overwrite never deletes a run. Choose another output folder")
    if run is not None:
        where = "is" if run == path else f"contains one ({run})"
        raise FileExistsError(f"refusing to replace {path}: it {where} a training run directory (checkpoints, logs); "
                              "--overwrite never deletes a run. Choose another output folder")
    found = output_kind(path)
    if found != kind:
        what = f"is {OUTPUT_KINDS[found]}" if found else "holds files medfound did not write"
        raise FileExistsError(f"refusing to replace {path} with --overwrite: it {what}, and --overwrite only "
                              f"replaces {OUTPUT_KINDS[kind]}. Choose another output folder, or empty this one yourself")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False, kind: str | None = None,
               staging: Path | None = None) -> Iterator[Path]:
    """Build a directory under a temporary sibling name; rename it to `path` only on success.

    With `overwrite=False` an existing non-empty `path` is an error before any work is done; with
    `overwrite=True` the old directory is replaced only after the new one is complete, and, for a user-facing
    output `kind` (OUTPUT_KINDS), only when it is that kind of output (`check_replaceable`). Temporary siblings
    left by a killed write of the same `path` (older than a day, or of a dead process) are removed first.
    `staging`: build in this existing folder instead of a fresh temporary one, and keep it when the build fails
    (a resumable write: `medfound shard --resume` continues from it).
    """
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} already exists and is not empty; choose another output or pass --overwrite")
    if overwrite and kind is not None:
        check_replaceable(path, kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path)
    if staging is None:
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.{os.getpid()}.tmp")
        tmp.mkdir()
    else:
        tmp = Path(staging)
    try:
        yield tmp
        mask = current_umask()
        os.chmod(tmp, 0o777 & ~mask)  # a staging folder kept private while it was built (0700) opens up now
        for f in tmp.rglob("*"):
            if f.is_file() and not f.is_symlink():
                # the umask's normal mode (0644 / 0755 under umask 022): libraries that write 0600 files
                # (safetensors) would otherwise publish weights that nobody else on a shared server can read
                os.chmod(f, (0o777 if f.stat().st_mode & 0o111 else 0o666) & ~mask)
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if path.exists():
            old = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.{os.getpid()}.old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists() and staging is None:
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temporaries(path: Path, max_age_s: float = 86400.0) -> list[Path]:
    """Remove `.NAME.*.tmp` / `.NAME.*.old` siblings of `path` that a killed write left: those naming a process
    that no longer runs (on this host), or older than `max_age_s`. Returns what was removed."""
    import time

    removed = []
    for p in path.parent.glob(f".{path.name}.*"):
        parts = p.name[len(path.name) + 2:].split(".")
        if p.suffix not in (".tmp", ".old") or not p.is_dir() or len(parts) not in (2, 3) or len(parts[0]) != 8:
            continue
        pid = int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None
        stale = (pid is not None and pid != os.getpid() and not _alive(pid)) or \
            time.time() - p.stat().st_mtime > max_age_s
        if stale:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


LOCK_NAME = ".medfound.lock"
_LOCK_TEXT = re.compile(r"^pid \d+ on \S*\n?$")  # what lock_dir writes; anything else is not ours
_held: dict[str, int] = {}  # resolved directory -> open lock file descriptor of this process


def lock_dir(path: str | os.PathLike) -> Path:
    """Take this process's exclusive lock on a run directory (`DIR/.medfound.lock`), or raise naming the holder.

    The lock is an `flock` on the file, so the kernel drops it when its holder exits, however it exits (SIGKILL
    included): a lock file left behind by a dead run is stale and simply taken over. The file records the
    holder's pid and host for the message. A process may take the same lock again (a resumed run in one
    process); `unlock_dir` releases it, and so does the process ending."""
    import fcntl
    import socket

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    key = str(path.resolve())
    if key in _held:
        return path / LOCK_NAME
    lock = path / LOCK_NAME
    try:  # never through a symlink: a planted `.medfound.lock -> ~/file` must not have that file truncated
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError:
        if lock.is_symlink():
            raise FileExistsError(f"{lock} is a symbolic link, not a medfound lock: remove it (the run lock is never "
                                  "followed through a link), then start again") from None
        raise
    try:
        import stat

        info = os.fstat(fd)
        current = os.pread(fd, 256, 0).decode(errors="replace")
        if not stat.S_ISREG(info.st_mode) or (current.strip() and not _LOCK_TEXT.match(current)):
            raise FileExistsError(f"{lock} exists and is not a medfound lock file (it holds other content): move it "
                                  "away, then start again; medfound does not overwrite it")
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except FileExistsError:
        os.close(fd)
        raise
    except OSError:
        holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise FileExistsError(f"{path} is in use by another medfound run ({holder}); two runs in one directory "
                              "would mix their outputs. Wait for it, or choose another trainer.output_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    _held[key] = fd
    return path / LOCK_NAME


def drop_inherited_locks(*_: object) -> None:
    """In a forked child (a DataLoader worker): close the run-directory lock descriptors inherited from the parent.
    An flock lives as long as any descriptor of it is open, so a worker outliving a killed run (it notices its
    parent's death only seconds later) would otherwise keep the run locked against `trainer.resume=auto`."""
    for fd in list(_held.values()):
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


@contextlib.contextmanager
def run_lock(path: str | os.PathLike) -> Iterator[None]:
    """`lock_dir(path)` for the duration of a block, released after it unless this process held it before (a
    training run evaluating its own export at the end)."""
    held = str(Path(path).resolve()) in _held
    lock_dir(path)
    try:
        yield
    finally:
        if not held:
            unlock_dir(path)


def unlock_dir(path: str | os.PathLike) -> None:
    """Release `lock_dir(path)` if this process holds it."""
    fd = _held.pop(str(Path(path).resolve()), None)
    if fd is not None:
        os.close(fd)
