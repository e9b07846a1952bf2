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
def test_medfound_demo_runs_from_the_wheel_in_an_empty_directory(tmp_path):
    """Built as a user gets it (`pip wheel`), unpacked on sys.path ahead of this checkout, run where nothing but
    the wheel's own files exist."""
    wheel_dir = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(wheel_dir), str(ROOT)], check=True, capture_output=True, timeout=300)
    wheel = next(wheel_dir.glob("medfound-*.whl"))
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        z.extractall(site)
    assert "medfound/sample_data/medmnist/retinamnist_demo.npz" in names
    assert "medfound/sample_data/README.md" in names  # the licences travel with the data
    work = tmp_path / "empty"
    work.mkdir()
    code = ("import medfound, sys; assert medfound.__file__.startswith(sys.argv[1]), medfound.__file__; "
            "from medfound.cli import main; sys.exit(main(['demo', '--out', 'demo_out', '--quick']))")
    env = {**os.environ, "PYTHONPATH": str(site), "TQDM_DISABLE": "1"}
    r = subprocess.run([sys.executable, "-c", code, str(site)], cwd=work, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "== 6/6 publish" in r.stdout and "the card matches its folder" in r.stdout
    assert str(site / "medfound" / "sample_data") in r.stdout  # the wheel's copy, not the checkout's data/
    assert (work / "demo_out" / "model" / "model.safetensors").is_file()
    # a second run refuses to replace the folder without --overwrite, and never touches a folder it did not make
    r = subprocess.run([sys.executable, "-c", code, str(site)], cwd=work, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and "pass --overwrite to replace it" in r.stderr
    other = work / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    r = subprocess.run([sys.executable, "-m", "medfound.cli", "demo", "--out", "mine", "--overwrite"], cwd=work,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "is not a medfound demo folder" in r.stderr and (other / "keep.txt").is_file()


def test_a_missing_demo_shard_set_names_the_command_that_makes_it(tmp_path, monkeypatch, capsys):
    from medfound.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "demo_mae_tiny"]) == 1
    err = capsys.readouterr().err
    assert "it is one of the demo's shard sets; `medfound demo --out runs/demo` runs the whole demo" in err
    assert "medfound shard npz " in err and "retinamnist_demo.npz --out runs/demo/shards/retinamnist" in err
