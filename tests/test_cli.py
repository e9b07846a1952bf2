"""The demo pipeline through the command line, each verb alone, and exact resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from medfound.cli import main

from helpers import DATA, ROOT, tiny_finetune_overrides, tiny_pretrain_overrides, wait_for_checkpoint

PRETRAIN = str(ROOT / "pretrain" / "demo_mae_tiny.yaml")
ADAPT = str(ROOT / "adapt" / "demo_classify_lora.yaml")


@pytest.mark.slow
@pytest.mark.parametrize("tuning", ["lora", "full", "linear_probe"])
def test_finetune_evaluate_publish_verbs(tuning, shards, pretrained, tmp_path, capsys):
    run = tmp_path / "ft"
    over = tiny_finetune_overrides(shards, pretrained / "export", run, steps=3, key="pneumonia")
    assert main(["finetune", ADAPT, f"tuning={tuning}", *over]) == 0
    out = capsys.readouterr()
    assert "finetune finished at step 3" in out.out and "eval:" in out.out
    assert f"(tuning: {tuning})" in out.err  # the trainable-parameter table
    report = json.loads((run / "eval.json").read_text())
    assert report["dataset"]["num_samples"] == 624 and report["label_type"] == "binary"
    assert set(report["metrics"]) == {"auroc", "auprc", "accuracy", "balanced_accuracy", "sensitivity", "specificity",
                                      "sens_at_spec", "ece"}
    assert report["operating_point"]["specificity_target"] == 0.9 and report["calibration"]["bins"]
    assert (run / "export" / "adapter").exists() == (tuning == "lora")
    (run / "eval.json").unlink()
    assert main(["evaluate", str(run)]) == 0
    assert json.loads((run / "eval.json").read_text())["metrics"] == report["metrics"]
    assert main(["publish", str(run), "--out", str(tmp_path / "model"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "README.md" in out and "card checked" in out and "would upload" in out
    assert main(["card", "check", str(tmp_path / "model")]) == 0


@pytest.mark.slow
def test_shard_and_pretrain_verbs(tmp_path, capsys):
    s = tmp_path / "shards"
    assert main(["shard", "npz", str(DATA / "medmnist" / "retinamnist_demo.npz"), "--out", str(s / "retina"),
                 "--modality", "fundus", "--label-type", "ordinal", "--max-count", "300"]) == 0
    assert "1120 samples" in capsys.readouterr().out
    assert main(["shard", "npz", str(DATA / "medmnist" / "retinamnist_demo.npz"), "--out", str(s / "retina")]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main(["shard", "wsi", str(DATA / "wsi" / "CMU-1-Small-Region.svs"), "--out", str(s / "he"), "--modality",
                 "pathology", "--mpp", "2.0", "--tile-size", "32"]) == 0
    assert main(["inspect", str(s / "retina"), str(s / "he")]) == 0
    assert "all checksums verified" in capsys.readouterr().out
    shards = {"retina": s / "retina", "pneumonia": s / "retina", "he": s / "he"}
    run = tmp_path / "pre"
    assert main(["pretrain", "demo_mae_tiny", *tiny_pretrain_overrides(shards, run, steps=2)]) == 0
    assert (run / "export" / "model.safetensors").is_file()
    assert main(["pretrain", "demo_mae_tiny", *tiny_pretrain_overrides(shards, run, steps=2)]) == 1
    assert "trainer.resume=auto" in capsys.readouterr().err  # never silently overwrites a run
    assert main(["evaluate", str(run)]) == 1
    assert "is a pretrain run" in capsys.readouterr().err
    assert main(["pretrain", ADAPT]) == 2


def _cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "medfound.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_sigkill_then_resume_auto_equals_an_uninterrupted_run(shards, tmp_path):
    def args(out: Path, *extra: str) -> list[str]:
        return ["pretrain", PRETRAIN, *tiny_pretrain_overrides(shards, out, steps=120), "trainer.checkpoint_every=10",
                "trainer.log_every=10", "data.num_workers=1", *extra]

    full = _cli(*args(tmp_path / "full"))
    victim = _cli(*args(tmp_path / "killed"))
    last = tmp_path / "killed" / "checkpoints" / "last"
    wait_for_checkpoint(victim, last, "step_00000030", timeout=120)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = last.read_text().strip()
    assert full.wait(timeout=300) == 0, full.stdout.read()
    resumed = _cli(*args(tmp_path / "killed", "trainer.resume=auto"))
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert f"resuming from {tmp_path / 'killed' / 'checkpoints' / killed_at}" in output
    assert killed_at < "step_00000120"  # killed mid-run, not after training ended
    a = load_file(str(tmp_path / "full" / "export" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "export" / "model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


@pytest.mark.slow
def test_two_processes_form_one_run(shards, tmp_path):
    """torchrun with 2 CPU processes trains one model on a gloo group, not two independent copies."""
    run = tmp_path / "ddp"
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "medfound.cli", "pretrain", PRETRAIN, *tiny_pretrain_overrides(shards, run, steps=3)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("pretrain finished at step 3") == 1  # only rank 0 reports
    config = (run / "config.yaml").read_text()
    assert "world_size: 2" in config and "global_batch_size: 32" in config
    state = json.loads((run / "checkpoints" / "step_00000003" / "trainer_state.json").read_text())
    assert state["images_seen"] == 3 * 32


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_zero(shards, tmp_path):
    run = tmp_path / "pre"
    proc = _cli("pretrain", PRETRAIN, *tiny_pretrain_overrides(shards, run, steps=100_000), "trainer.checkpoint_every=50")
    last = run / "checkpoints" / "last"
    deadline = time.time() + 120
    while time.time() < deadline and not last.is_file():
        time.sleep(0.05)
    assert proc.poll() is None
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out[-2000:]
    assert time.time() - sent < 15  # within seconds
    assert "SIGTERM: checkpoint written" in out and "resume with trainer.resume=auto" in out
    step = int(last.read_text().strip().split("_")[1])
    assert 50 <= step < 100_000 and (run / "checkpoints" / last.read_text().strip() / "model.safetensors").is_file()
