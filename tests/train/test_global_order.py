"""data.global_order through the training loop (not only the loader): a run on 2 processes, stopped at a
checkpoint mid-epoch, resumed on 4 processes, consumes every sample of the epoch exactly once, the same samples
as the epoch on one process; each module sees only real batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT

WORKER = str(Path(__file__).with_name("global_order_worker.py"))
ENV = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}


def _torchrun(nproc: int, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           WORKER, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _keys(run: Path, world: int, epoch: int) -> list[str]:
    keys = []
    for log in sorted(run.glob(f"keys_w{world}_rank*.jsonl")):
        for line in log.read_text().splitlines():
            e, batch = json.loads(line)
            keys += batch if e == epoch else []
    return keys


@pytest.mark.slow
def test_a_run_resumed_on_another_number_of_processes_sees_each_sample_of_the_epoch_once(shards, tmp_path):
    sys.path.insert(0, str(Path(WORKER).parent))
    from global_order_worker import global_loader

    from medfound.data.pipeline import shard_sets

    run = tmp_path / "run"
    run.mkdir()
    _torchrun(2, str(run), str(shards["pneumonia"]), "10", "0")  # 10 steps x 2 ranks x 16 = 320 samples
    before = _keys(run, 2, 0)
    assert len(before) == 320 and len(set(before)) == 320
    console = _torchrun(4, str(run), str(shards["pneumonia"]), "24", "1")  # into epoch 1
    assert "written by 2 processes, this run has 4" in console and "continues at its global position" in console
    after = _keys(run, 4, 0)
    assert _keys(run, 4, 1), "the resumed run did not reach the next epoch"
    consumed = before + after
    assert len(consumed) == len(set(consumed))  # no sample of the epoch twice
    sets, _ = shard_sets([shards["pneumonia"]], "train")
    whole = [k for b in global_loader(sets[0], 0) for k in b["key"]]  # one process
    assert set(consumed) == set(whole) and len(consumed) == len(whole)  # and none skipped
