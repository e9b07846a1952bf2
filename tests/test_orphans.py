"""No orphans: killing the process that started workers takes the workers with it. Ingest workers die with their
parent; training processes whose torchrun agent is SIGKILLed write a last checkpoint, release the run lock and stop,
so `trainer.resume=auto` continues at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import ROOT, descendants, tiny_pretrain_overrides


def _alive(pid: int) -> bool:
    """Any thread of `pid` still running (a process whose main thread has exited shows 'Z' while others run)."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return False
    for task in tasks:
        try:
            if (task / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                return True
        except OSError:
            continue
    return False


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.time() + timeout
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def test_ingest_workers_die_with_their_parent(tmp_path):
    """The parent is killed as soon as its two workers exist: each then encodes its 100 samples (7 queue chunks, more
    than a pipe holds) and, unread, would wait for ever to flush them."""
    import numpy as np

    rng = np.random.default_rng(0)
    arrays = {f"{split}_{kind}": (rng.integers(0, 255, (n, 28, 28, 3), dtype=np.uint8) if kind == "images" else
                                  rng.integers(0, 2, (n, 1), dtype=np.uint8))
              for split, n in (("train", 200), ("val", 2), ("test", 2)) for kind in ("images", "labels")}
    np.savez(tmp_path / "noise.npz", **arrays)
    proc = subprocess.Popen([sys.executable, "-m", "medfound.cli", "shard", "npz", str(tmp_path / "noise.npz"),
                             "--out", str(tmp_path / "out"), "--name", "noise", "--workers", "2"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(descendants(proc.pid)) < 2 and proc.poll() is None:
        time.sleep(0.01)
    workers = descendants(proc.pid)
    assert proc.poll() is None and len(workers) >= 2, "the ingest ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)  # the parent only
    proc.wait()
    assert _wait_gone(workers, 15) == []


@pytest.mark.slow
def test_training_workers_checkpoint_and_stop_when_torchrun_dies(shards, tmp_path):
    run = tmp_path / "ddp"
    args = ["pretrain", "demo_mae_tiny", *tiny_pretrain_overrides(shards, run, steps=100_000),
            "trainer.checkpoint_every=20", "data.num_workers=0"]
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              "-m", "medfound.cli", *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    last = run / "checkpoints" / "last"
    deadline = time.time() + 180
    while time.time() < deadline and not last.is_file() and agent.poll() is None:
        time.sleep(0.1)
    assert agent.poll() is None and last.is_file(), "the run did not reach its first checkpoint"
    workers = [p for p in descendants(agent.pid) if "medfound.cli" in Path(f"/proc/{p}/cmdline").read_text()]
    assert len(workers) >= 2
    before = int(last.read_text().strip().split("_")[1])
    os.kill(agent.pid, signal.SIGKILL)  # the agent only: its workers run in sessions of their own
    agent.wait()
    assert _wait_gone(workers, 60) == [], "training processes outlived their launcher"
    step = int(last.read_text().strip().split("_")[1])
    assert step > before  # a last checkpoint, written on the way out
    state = json.loads((run / "checkpoints" / last.read_text().strip() / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    from medfound.io import lock_dir, unlock_dir

    deadline = time.time() + 30
    while True:  # free once they are gone: no orphan holds it, so trainer.resume=auto continues
        try:
            lock_dir(run)
            break
        except FileExistsError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)
    unlock_dir(run)
