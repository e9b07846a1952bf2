"""Guards around a run: non-finite settings rejected, non-finite weights never saved, pruning never deletes the
checkpoint `last` names or the one resumed, one writer per run directory."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from medfound.config import ConfigError, OptimConfig, TrainerConfig, load_recipe
from medfound.io import LOCK_NAME, lock_dir, unlock_dir
from medfound.train.checkpoint import latest_checkpoint
from medfound.train.loop import fit

from helpers import ROOT, tiny_pretrain_overrides


class _Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))

    def forward(self, batch):
        return {"loss": (batch["image"].float().mean(dim=(2, 3)) * self.w).sum(1).pow(2).mean()}


def _batches(epoch):
    return [{"image": torch.rand(4, 3, 8, 8), "key": ["a", "b", "c", "d"]} for _ in range(100)]


def _fit(module, run, resume_from=None, lr=1e-2, **trainer):
    t = TrainerConfig(**{**dict(output_dir=run, max_steps=4, checkpoint_every=1, log_every=1, progress=False,
                                loggers=[], clip_grad_norm=None), **trainer})
    return fit(module, _batches, trainer=t, optim=OptimConfig(lr=lr, warmup_steps=0, schedule="constant"), lr=lr,
               run_dir=run, accelerator=Accelerator(cpu=True), config_text="kind: test\n", resume_from=resume_from)


@pytest.mark.parametrize("override", ["optim.blr=inf", "optim.weight_decay=.inf", "optim.lr=nan",
                                      "trainer.clip_grad_norm=inf"])
def test_non_finite_settings_are_rejected_before_any_work(override, tmp_path, shards):
    args = tiny_pretrain_overrides(shards, tmp_path / "run") + [override]
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_recipe(ROOT / "pretrain" / "demo_mae_tiny.yaml", args)
    assert not (tmp_path / "run").exists()


def test_an_empty_output_dir_is_refused(shards):
    with pytest.raises(ConfigError, match="trainer.output_dir is empty"):
        load_recipe(ROOT / "pretrain" / "demo_mae_tiny.yaml", tiny_pretrain_overrides(shards, Path("x")) +
                    ["trainer.output_dir="])


def test_non_finite_weights_are_never_saved_nor_called_good(tmp_path):
    run = tmp_path / "run"
    _fit(_Linear(), run, max_steps=2)
    good = latest_checkpoint(run / "checkpoints")
    model = _Linear()
    # a finite loss whose update overflows the weights: the lr the schema now refuses, given to fit directly
    with pytest.raises(FloatingPointError, match=r"weights became non-finite by step 3 \(w\).*not saved.*"
                                                 r"last good checkpoint is .*step_00000002"):
        _fit(model, run, resume_from=good, lr=1e38, max_steps=6, resume="auto")
    assert latest_checkpoint(run / "checkpoints") == good
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000001", "step_00000002"]


def test_pruning_spares_last_and_the_resumed_checkpoint(tmp_path):
    run = tmp_path / "run"
    _fit(_Linear(), run, max_steps=6, checkpoint_every=2, keep_checkpoints=3)
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000002", "step_00000004", "step_00000006"]
    old = ckpts / "step_00000002"
    time.sleep(0.01)
    # resume an older checkpoint with fewer kept: step 3 is written after 6, so it is the newest
    _fit(_Linear(), run, resume_from=old, max_steps=3, checkpoint_every=1, keep_checkpoints=1, resume=str(old))
    assert (ckpts / "last").read_text().strip() == "step_00000003"
    assert latest_checkpoint(ckpts).name == "step_00000003"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000002", "step_00000003"]


_HOLDER = """
import sys, time
from medfound.io import lock_dir
lock_dir(sys.argv[1])
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_writer_is_refused_and_a_dead_holder_is_stale(tmp_path, shards):
    from medfound.workflows import run_pretrain

    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        recipe = load_recipe(ROOT / "pretrain" / "demo_mae_tiny.yaml", tiny_pretrain_overrides(shards, run, steps=1))
        with pytest.raises(FileExistsError, match=rf"in use by another medfound run \(pid {holder.pid} on "):
            run_pretrain(recipe)
        assert not (run / "config.yaml").exists() and not (run / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    assert (run / LOCK_NAME).read_text().startswith(f"pid {holder.pid} ")  # left behind by a killed holder...
    lock_dir(run)  # ...and taken over: the kernel released its flock
    unlock_dir(run)


def test_the_run_lock_never_follows_a_link_nor_overwrites_a_foreign_file(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("my notes\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).symlink_to(victim)
    with pytest.raises(FileExistsError, match="is a symbolic link, not a medfound lock: remove it"):
        lock_dir(run)
    assert victim.read_text() == "my notes\n"
    (run / LOCK_NAME).unlink()
    (run / LOCK_NAME).write_text("not a lock\n")  # a file of the user's under that name: left alone
    with pytest.raises(FileExistsError, match="is not a medfound lock file"):
        lock_dir(run)
    assert (run / LOCK_NAME).read_text() == "not a lock\n"
    (run / LOCK_NAME).write_text("pid 1234 on elsewhere\n")  # a stale lock of ours is taken over
    lock_dir(run)
    assert (run / LOCK_NAME).read_text().startswith(f"pid {os.getpid()} on ")
    unlock_dir(run)


def test_a_damaged_checkpoint_is_one_named_error(tmp_path):
    from medfound.train.checkpoint import load_checkpoint

    run = tmp_path / "run"
    _fit(_Linear(), run, max_steps=1)
    ckpt = latest_checkpoint(run / "checkpoints")
    (ckpt / "model.safetensors").write_bytes(b"\xff" * 16)  # a garbage header
    with pytest.raises(ValueError, match=r"model.safetensors is unreadable .*corrupt or truncated.*trainer.resume="):
        load_checkpoint(ckpt, _Linear())
    _fit(_Linear(), tmp_path / "r2", max_steps=1)
    ckpt = latest_checkpoint(tmp_path / "r2" / "checkpoints")
    import pickle
    (ckpt / "optimizer.pt").write_bytes(pickle.dumps(Path("x")))  # an object, not tensors
    with pytest.raises(ValueError, match="optimizer.pt cannot be loaded safely"):
        load_checkpoint(ckpt, _Linear(), torch.optim.AdamW(_Linear().parameters()))


def test_a_corrupt_weights_file_is_one_line_on_the_cli(tmp_path):
    bad = tmp_path / "weights.safetensors"
    bad.write_bytes((2 ** 40).to_bytes(8, "little") + b"{}")  # a header length far past the end
    proc = subprocess.run([sys.executable, "-m", "medfound.cli", "import", str(bad), "--format", "timm", "--out",
                           str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "not a readable safetensors file" in proc.stderr


def test_a_full_disk_while_checkpointing_names_the_intact_checkpoint(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root): the full-disk path is not exercised")
    try:
        class Wide(torch.nn.Module):  # 7.5k parameters: ~30 KB of weights, ~60 KB of AdamW state per checkpoint
            def __init__(self):
                super().__init__()
                self.w = torch.nn.Parameter(torch.ones(3, 2500))

            def forward(self, batch):
                return {"loss": (batch["image"].float().mean(dim=(2, 3)) @ self.w).pow(2).mean() * 1e-6}

        run = disk / "run"
        with pytest.raises(OSError, match=r"writing checkpoint .*step_00000002 failed: no space left on the device"
                                          r".*step_00000001 \(the last complete checkpoint\) is intact"):
            _fit(Wide(), run, max_steps=3, keep_checkpoints=5)
        assert latest_checkpoint(run / "checkpoints").name == "step_00000001"
        assert not list((run / "checkpoints").glob(".*.tmp"))
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_resuming_with_a_changed_recipe_prints_the_changes_and_refuses_breaking_ones(shards, tmp_path, capsys):
    """A resume with another max_steps was silently accepted: now every change is printed, a change of what the
    run computes is refused (config.yaml and the checkpoints stay as they were) unless trainer.resume_changes=allow,
    and logging-only changes pass."""
    from medfound.workflows import run_pretrain

    run = tmp_path / "run"
    base = tiny_pretrain_overrides(shards, run, steps=2)
    run_pretrain(load_recipe(ROOT / "pretrain" / "demo_mae_tiny.yaml", base))
    config_before = (run / "config.yaml").read_text()
    capsys.readouterr()
    longer = base + ["trainer.resume=auto", "trainer.max_steps=3"]
    with pytest.raises(ConfigError, match=r"changed trainer.max_steps: the resumed run would not equal an "
                                          r"uninterrupted one .* trainer.resume_changes=allow"):
        run_pretrain(load_recipe(ROOT / "pretrain" / "demo_mae_tiny.yaml", longer))
    assert "trainer.max_steps: 2 -> 3  (changes what the run computes)" in capsys.readouterr().out
    assert (run / "config.yaml").read_text() == config_before
    # logging-only changes resume (nothing to train: the run is at max_steps) and are listed
    run_pretrain(load_recipe(ROOT / "pretrain" / "demo_mae_tiny.yaml", base + ["trainer.resume=auto",
                                                                                "trainer.log_every=5"]))
    out = capsys.readouterr().out
    assert "trainer.log_every: 1 -> 5" in out and "changes what the run computes" not in out
    run_pretrain(load_recipe(ROOT / "pretrain" / "demo_mae_tiny.yaml", longer + ["trainer.resume_changes=allow"]))
    assert "trainer.max_steps: 2 -> 3" in capsys.readouterr().out
    assert json.loads((latest_checkpoint(run / "checkpoints") / "trainer_state.json").read_text())["step"] == 3


def test_a_resume_spelled_relative_to_the_same_folder_is_the_same_run(shards, tmp_path, monkeypatch, capsys):
    from medfound.workflows import run_pretrain

    run = tmp_path / "run"
    run_pretrain(load_recipe(ROOT / "pretrain" / "demo_mae_tiny.yaml", tiny_pretrain_overrides(shards, run, steps=2)))
    monkeypatch.chdir(tmp_path)
    relative = tiny_pretrain_overrides(shards, Path("run"), steps=2) + ["trainer.resume=auto"]
    assert "trainer.output_dir=run" in relative
    capsys.readouterr()
    run_pretrain(load_recipe(ROOT / "pretrain" / "demo_mae_tiny.yaml", relative))  # no resume_changes=allow needed
    assert "trainer.output_dir" not in capsys.readouterr().out


def test_an_edited_checkpoint_pointer_or_state_is_refused(tmp_path):
    from medfound.train.checkpoint import read_trainer_state

    other, run = tmp_path / "other", tmp_path / "run"
    _fit(_Linear(), other, max_steps=2)
    _fit(_Linear(), run, max_steps=2)
    last = run / "checkpoints" / "last"
    for pointer in ("../../other/checkpoints/step_00000002", str(other / "checkpoints" / "step_00000002")):
        last.write_text(pointer + "\n")  # another run's checkpoint: would be resumed, then pruned
        with pytest.raises(ValueError, match="which is not a checkpoint folder of"):
            latest_checkpoint(run / "checkpoints")
    (run / "checkpoints" / "step_00000009").symlink_to(other / "checkpoints" / "step_00000002")
    last.write_text("step_00000009\n")
    with pytest.raises(ValueError, match="no path, no link"):
        latest_checkpoint(run / "checkpoints")
    last.write_text("step_00000002\n")
    state_file = run / "checkpoints" / "step_00000002" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    for edit, why in (({"step": -5}, "step=-5"), ({"step": 7}, "says step 7 in the folder of step 2"),
                      ({"images_seen": "many"}, "images_seen='many'")):
        state_file.write_text(json.dumps({**state, **edit}))
        with pytest.raises(ValueError, match=re.escape("is damaged: trainer_state.json ") + ".*" + re.escape(why)):
            read_trainer_state(state_file.parent)


def test_a_resumed_run_logs_each_step_once(tmp_path):
    from medfound.train.logging import read_metrics

    run = tmp_path / "run"
    _fit(_Linear(), run, max_steps=5, checkpoint_every=3, keep_checkpoints=5)  # logs 1..5, checkpoints at 3 and 5
    _fit(_Linear(), run, resume_from=run / "checkpoints" / "step_00000003", max_steps=5, checkpoint_every=3,
         keep_checkpoints=5, resume=str(run / "checkpoints" / "step_00000003"))  # logs 4 and 5 again
    steps = [r["step"] for r in read_metrics(run) if r["phase"] == "train"]
    assert steps == [1, 2, 3, 4, 5]


def _dino():
    import timm

    from medfound.pretrain.dino import DINOv2, DINOv2Settings

    from helpers import TINY_VIT

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, dynamic_img_size=True, **TINY_VIT)
    return DINOv2(vit, DINOv2Settings(out_dim=64, hidden_dim=32, bottleneck_dim=16))


def _views(same: bool):
    g = torch.Generator().manual_seed(0)

    def batches(epoch):
        def view(size):
            return torch.ones(4, 3, size, size) if same else torch.randn(4, 3, size, size, generator=g)
        return [{"crops": [view(32), view(32), view(16), view(16)], "key": list("abcd")} for _ in range(20)]
    return batches


def _fit_views(module, run, same, **trainer):
    t = TrainerConfig(**{**dict(output_dir=run, max_steps=4, checkpoint_every=100, log_every=1, progress=False,
                                loggers=[], clip_grad_norm=None), **trainer})
    return fit(module, _views(same), trainer=t, optim=OptimConfig(lr=1e-4, warmup_steps=0, schedule="constant"),
               lr=1e-4, run_dir=run, accelerator=Accelerator(cpu=True), config_text="kind: test\n")


def test_collapsed_features_warn_once_with_the_causes_and_stop_when_asked(tmp_path, capsys):
    """DINOv2 on identical images: its features are one point, which the loop's collapse guard (the objective's
    `collapse` hook on the logged feature std) reports once, with the step and the likely causes, logs under
    collapse/ and trains on; with trainer.stop_on_collapse it checkpoints and stops. Varied images never trip it."""
    from medfound.train.loop import CollapseError
    from medfound.train.logging import read_metrics

    _fit_views(_dino(), tmp_path / "varied", same=False)
    assert "collapsed" not in capsys.readouterr().out
    state = _fit_views(_dino(), tmp_path / "same", same=True)
    assert state.step == 4
    out = capsys.readouterr().out
    assert out.count("collapsed to one point") == 1 and re.search(r"step 1: the (student|teacher)'s features", out)
    assert "Likely causes: a learning rate too high" in out and "stop_on_collapse=true stops here" in out
    assert [r["collapsed_at_step"] for r in read_metrics(tmp_path / "same") if r["phase"] == "collapse"] == [1]
    with pytest.raises(CollapseError, match=r"step 1: .*Stopped \(trainer.stop_on_collapse\)"):
        _fit_views(_dino(), tmp_path / "stop", same=True, stop_on_collapse=True)
    assert latest_checkpoint(tmp_path / "stop" / "checkpoints").name == "step_00000001"


def test_the_small_data_dinov2_preset_trains_on_the_bundled_sets_without_collapse(shards, tmp_path):
    """pretrain/dinov2_small_data.yaml (its objective, schedule and guard; the backbone and crops shrunk for CPU) on
    the bundled fundus, chest X-ray and H&E sets with stop_on_collapse on and the representation monitor: it trains
    to the end, the monitor's features have not collapsed, and no collapse was logged."""
    from medfound.config import load_recipe
    from medfound.train.logging import read_metrics
    from medfound.workflows import run_pretrain

    out = tmp_path / "run"
    recipe = load_recipe(ROOT / "pretrain" / "dinov2_small_data.yaml", tiny_pretrain_overrides(
        shards, out, steps=12, objective="dinov2") + [
        "backbone.name=vit_tiny_patch16_224", "objective.teacher_temp_warmup_steps=6", "optim.warmup_steps=3",
        "trainer.log_every=2", f"monitor.shards={shards['pneumonia']}", "monitor.every=6", "monitor.split=test"])
    assert recipe.trainer.stop_on_collapse and recipe.objective.out_dim == 64  # tiny head from the helper
    summary = run_pretrain(recipe)
    assert summary["step"] == 12
    assert not [r for r in read_metrics(out) if r["phase"] == "collapse"]
    looks = [r for r in read_metrics(out) if r["phase"] == "monitor"]
    assert [r["step"] for r in looks] == [0, 6, 12] and not any(r["collapsed"] for r in looks)


def test_a_key_added_by_a_newer_medfound_at_its_default_is_not_a_change_on_resume(shards, tmp_path):
    """A checkpoint written before a key existed (its config.yaml lacks it) resumes under a recipe holding that key
    at its default (the earlier behaviour); the same key set to another value is a change that breaks exactness."""
    import yaml

    from medfound.config import dump_recipe
    from medfound.run.context import resume_changes

    recipe = load_recipe(ROOT / "pretrain" / "demo_dinov2_tiny.yaml", tiny_pretrain_overrides(shards, tmp_path / "r",
                                                                                   objective="dinov2"))
    text = dump_recipe(recipe)
    old = yaml.safe_load(text)
    del old["objective"]["head_warmup_steps"], old["trainer"]["stop_on_collapse"]  # as an earlier version wrote it
    assert resume_changes(yaml.safe_dump(old), text, recipe) == []
    changed = load_recipe(ROOT / "pretrain" / "demo_dinov2_tiny.yaml", tiny_pretrain_overrides(
        shards, tmp_path / "r", objective="dinov2") + ["objective.head_warmup_steps=5"])
    assert resume_changes(yaml.safe_dump(old), dump_recipe(changed), changed) == [
        ("objective.head_warmup_steps", None, 5, True)]
