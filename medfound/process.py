"""Processes that must not outlive the one that started them.

An ingest worker (`medfound shard --workers N`) whose parent is killed would otherwise stay blocked on its queue for
good, and a training process whose launcher (torchrun's agent) is SIGKILLed keeps training as an orphan, holding the
run lock and writing checkpoints, so `trainer.resume=auto` is refused. Two mechanisms, used together:
- `die_with_parent`: Linux's parent-death signal (prctl PR_SET_PDEATHSIG), delivered by the kernel the moment the
  parent goes; for ingest workers, which have nothing to save (the parent's journal holds the progress);
- `watch_parent`: a daemon thread that polls `os.getppid()` and calls back once the parent is gone; for training
  processes, whose callback raises SIGTERM in the process itself, so the loop's preemption path writes a last
  checkpoint (all ranks agree on the step) and exits. It works wherever getppid does, and is not tied to the
  launcher's thread that forked (PDEATHSIG is, which could fire while the launcher still runs).
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Optional

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int, sig: int = signal.SIGKILL) -> None:
    """Have the kernel send `sig` to this process when its parent `parent` dies (Linux); elsewhere, a watcher thread
    exits the process. Exits at once if the parent is already gone (it died before this call)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        except (OSError, AttributeError):
            watch_parent(lambda: os._exit(1), parent)
    else:  # pragma: no cover - macOS, BSD
        watch_parent(lambda: os._exit(1), parent)
    if os.getppid() != parent:
        os._exit(1)


def watch_parent(on_death: Callable[[], None], parent: Optional[int] = None,
                 interval: float = 1.0) -> threading.Thread:
    """Call `on_death()` once, from a daemon thread, when the parent process (`parent`, default: the current one) is
    gone: this process was re-parented, to init or a subreaper."""
    parent = os.getppid() if parent is None else parent

    def run() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        on_death()

    thread = threading.Thread(target=run, name="medfound-parent-watch", daemon=True)
    thread.start()
    return thread


def stop_when_launcher_dies() -> bool:
    """In a process started by torchrun (or `accelerate launch`, which runs it): SIGTERM ourselves when the launcher
    dies, so training checkpoints and stops instead of running on as an orphan. Returns whether it was armed."""
    if "TORCHELASTIC_RUN_ID" not in os.environ and "LOCAL_RANK" not in os.environ:
        return False
    pid = os.getpid()
    try:  # a rank that dies in native code (SIGABRT, SIGSEGV) prints where its Python stood
        faulthandler.enable()
    except (AttributeError, OSError, RuntimeError, ValueError):  # an stderr without a file descriptor
        pass

    def stop() -> None:
        print(f"medfound: the launcher of process {pid} is gone; stopping after a last checkpoint", file=sys.stderr,
              flush=True)
        os.kill(pid, signal.SIGTERM)

    watch_parent(stop)
    return True


def torchrun_group() -> tuple[int, int, Any, bool]:
    """(rank, world size, torch.distributed or None, whether this call started the group) from torchrun's
    environment; a gloo group is started when world > 1 (barriers and a few Python objects: tensors never travel).
    Used by the verbs that split their inputs across processes (`extract`, `predict`)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world <= 1:
        return 0, 1, None, False
    import torch.distributed as dist

    if dist.is_initialized():
        return rank, world, dist, False
    dist.init_process_group("gloo")
    return rank, world, dist, True


def end_group(succeeded: bool = True) -> None:
    """Close this process's torch.distributed group if one is open. A gloo group left open at interpreter exit can
    abort the process ("terminate called without an active exception", exit -6) after its work is done, which
    torchrun reports as a failed run; every verb ends through here (torch is not imported for it).

    After a verb that succeeded, every rank first meets at a barrier, so no rank tears its connections down while
    another still runs (rank 0 alone writes the export and the evaluation): the teardown is collective, as torch's
    documentation asks. After a failure there is no barrier (a peer may never arrive; torchrun stops the others)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        if succeeded:
            dist.barrier()
        dist.destroy_process_group()
