"""README's 5-minute tour runs as written, on the bundled data only, from a directory that holds nothing but the
checkout's data/ (the expensive verbs get a few optimizer steps appended; everything else runs verbatim); and
`medfound demo` runs from a built wheel in an empty directory, with the sample archive the wheel ships."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import zipfile

import pytest

from helpers import ROOT

FEW_STEPS = {"pretrain": ["trainer.max_steps=2", "trainer.log_every=1", "optim.warmup_steps=1"],
             "finetune": ["trainer.max_steps=2", "trainer.log_every=1", "optim.warmup_steps=1", "eval.bootstrap=20"]}


def tour_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    block = text.split("## A 5-minute tour", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    joined = block.replace("\\\n", " ")
    commands = [shlex.split(line, comments=True) for line in joined.splitlines()]
    return [c for c in commands if c]


def test_the_tour_is_medfound_commands_on_bundled_paths():
    commands = tour_commands()
    assert len(commands) >= 12 and all(c[0] == "medfound" for c in commands)
    verbs = [c[1] for c in commands]
    for verb in ("shard", "inspect", "pretrain", "finetune", "evaluate", "publish", "card"):
        assert verb in verbs, verb
    for c in commands:
        for arg in c:
            assert not arg.startswith(("/", "../", "~")), f"{shlex.join(c)} names a path outside the checkout"


@pytest.mark.slow
def test_every_tour_command_runs_as_written(tmp_path, monkeypatch, capsys):
    from medfound.cli import main

    (tmp_path / "data").symlink_to(ROOT / "data")
    monkeypatch.chdir(tmp_path)
    for command in tour_commands():
        argv = command[1:] + FEW_STEPS.get(command[1], [])
        rc = main(argv)
        out = capsys.readouterr()
        assert rc == 0, f"`{shlex.join(command)}` exited {rc}:\n{out.err[-2000:]}"
    assert (tmp_path / "runs/demo/model/README.md").is_file()
    assert (tmp_path / "runs/demo/probe_val/eval.json").is_file()


@pytest.mark.slow
def test_medfound_demo_runs_from_the_wheel_in_a_fresh_venv_without_extras(fresh_venv, tmp_path):
    """As a user gets it: the wheel built from this checkout, installed with --no-deps into a new virtual environment
    beside exactly the base requirements of its own metadata (no extra; torch comes from wherever pip finds it, the
    local cache here), then `medfound demo --quick` run in an empty directory, which uses the sample archive inside
    the wheel. (The environment is installed in the background from the start of the session: conftest.py.)"""
    venv, wheel, base, env = fresh_venv["venv"], fresh_venv["wheel"], fresh_venv["base"], fresh_venv["env"]
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    assert "medfound/sample_data/medmnist/retinamnist_demo.npz" in names
    assert "medfound/sample_data/README.md" in names  # the licences travel with the data
    assert any(r.startswith("tiffslide") for r in base)  # the demo tiles a slide: a base dependency
    python = str(venv / "bin" / "python")
    probe = subprocess.run([python, "-c", "import importlib.util as u, sys; print(sys.prefix); print([m for m in ("
                            "'pydicom', 'nibabel', 'nrrd', 'deepspeed', 's3fs', 'pyarrow', 'wandb', 'moto', 'pytest') "
                            "if u.find_spec(m)])"], env=env, capture_output=True, text=True, timeout=120)
    assert probe.stdout.splitlines() == [str(venv), "[]"], probe.stdout + probe.stderr  # no extra, not the dev venv
    work = tmp_path / "empty"
    work.mkdir()
    medfound = str(venv / "bin" / "medfound")
    r = subprocess.run([medfound, "demo", "--out", "demo_out", "--quick"], cwd=work, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "== 6/6 publish" in r.stdout and "the card matches its folder" in r.stdout
    assert str(venv) in r.stdout and "sample_data" in r.stdout  # the wheel's copy, not the checkout's data/
    assert (work / "demo_out" / "model" / "model.safetensors").is_file()
    # a second run refuses to replace the folder without --overwrite, and never touches a folder it did not make
    r = subprocess.run([medfound, "demo", "--out", "demo_out", "--quick"], cwd=work, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and "pass --overwrite to replace it" in r.stderr
    other = work / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    r = subprocess.run([medfound, "demo", "--out", "mine", "--overwrite"], cwd=work, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and "is not a medfound demo folder" in r.stderr and (other / "keep.txt").is_file()


def test_a_missing_demo_shard_set_names_the_command_that_makes_it(tmp_path, monkeypatch, capsys):
    from medfound.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "demo_mae_tiny"]) == 1
    err = capsys.readouterr().err
    assert "it is one of the demo's shard sets; `medfound demo --out runs/demo` runs the whole demo" in err
    assert "medfound shard npz " in err and "retinamnist_demo.npz --out runs/demo/shards/retinamnist" in err


@pytest.mark.slow
def test_a_demo_stage_stopped_by_sigterm_stops_the_demo(tmp_path):
    """SIGTERM during pretraining checkpoints and exits 0 (as SLURM preemption wants); the demo must not go on to
    fine-tune a backbone that was never exported."""
    import signal
    import time

    out = tmp_path / "demo"
    proc = subprocess.Popen([sys.executable, "-m", "medfound.cli", "demo", "--out", str(out)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TQDM_DISABLE": "1"})
    deadline = time.time() + 240
    metrics = out / "pretrain" / "logs" / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None and not (metrics.is_file() and metrics.stat().st_size):
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr[-2000:]
    assert "SIGTERM: checkpoint written" in stdout
    assert "medfound demo: step 3 (MAE pretraining of a tiny ViT on all three modalities) did not finish" in stderr
    assert "stopped before its end" in stderr and "trainer.resume=auto" in stderr
    assert "no config.json" not in stderr and not (out / "finetune").exists()
