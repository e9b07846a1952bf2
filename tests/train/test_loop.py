"""The one loop: run-directory layout, overfitting a fixed batch, exact resume after preemption,
NaN detection, loss normalisation under gradient accumulation, the learning-rate schedule."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import timm
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from medfound.adapt.heads import attach_classifier
from medfound.adapt.tasks import ClassificationTask
from medfound.adapt.tuning import apply_tuning
from medfound.config import OptimConfig, TrainerConfig
from medfound.data.manifest import read_manifest
from medfound.data.pipeline import Decoding, TrainOrder, make_loader, shard_urls
from medfound.data.transforms import build_transform
from medfound.pretrain.mae import MAE
from medfound.train.checkpoint import latest_checkpoint
from medfound.train.loop import fit, resolve_resume
from medfound.train.optim import lr_at

from helpers import TINY_VIT


def _task(shards, seed: int = 0, **vit) -> ClassificationTask:
    """A tiny classifier over RetinaMNIST's label schema (only the tests that train ask for the shards)."""
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, **{**TINY_VIT, **vit})
    head = attach_classifier(model, 5)
    return ClassificationTask(apply_tuning(model, "full", head), head, read_manifest(shards["retina"]).label_schema)


def _loader_factory(shards, augment="light", batch_size=16):
    urls, _ = shard_urls([shards["retina"]], "train")
    t = build_transform(augment, 32, (0.5,) * 3, (0.5,) * 3, train=True)
    return lambda epoch: make_loader(urls, Decoding(t, labelled=True), batch_size=batch_size,
                                     order=TrainOrder(seed=3, epoch=epoch, shuffle_buffer=100))


def _trainer(out: Path, **kw) -> TrainerConfig:
    base = dict(output_dir=out, max_steps=12, checkpoint_every=4, log_every=2, progress=False, loggers=[])
    return TrainerConfig(**{**base, **kw})


def _fit(module, make_loader, trainer, lr=1e-3, resume=None, **optim):
    return fit(module, make_loader, trainer=trainer, optim=OptimConfig(lr=lr, warmup_steps=2, **optim), lr=lr,
               run_dir=trainer.output_dir, accelerator=Accelerator(cpu=True), config_text="kind: test\n",
               resume_from=resume)


def test_pretrain_run_directory(pretrained):
    run = pretrained
    assert (run / "config.yaml").read_text().startswith("# resolved by medfound")
    assert "global_batch_size: 16" in (run / "config.yaml").read_text()
    lines = [json.loads(x) for x in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]
    assert all({"loss", "lr", "images_per_s"} <= set(x) for x in lines)
    ckpt = latest_checkpoint(run / "checkpoints")
    assert ckpt.name == "step_00000003" and (run / "checkpoints" / "last").read_text().strip() == ckpt.name
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.yaml", "model.safetensors", "optimizer.pt",
                                                      "rng.safetensors", "trainer_state.json"]
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["images_seen"] == 48
    torch.load(ckpt / "optimizer.pt", weights_only=True)  # loads without unpickling code
    assert not list(run.rglob("*.tmp"))
    m = timm.create_model(f"local-dir:{run / 'export'}", pretrained=True)
    assert m.num_classes == 0 and m.pretrained_cfg["input_size"] == (3, 32, 32)
    weights = load_file(str(ckpt / "model.safetensors"))
    assert torch.equal(m.state_dict()["patch_embed.proj.weight"], weights["encoder.patch_embed.proj.weight"])


def _fixed(make_loader):
    batch = next(iter(make_loader(0)))
    return lambda epoch: [batch]


def test_finetune_overfits_a_fixed_batch(shards, tmp_path):
    task = _task(shards)
    loader = _fixed(_loader_factory(shards, augment="none"))
    batch = next(iter(loader(0)))
    with torch.no_grad():
        first = float(task.eval()(batch)["loss"])
    _fit(task.train(), loader, _trainer(tmp_path / "ft", max_steps=150, checkpoint_every=1000), lr=1e-3,
         weight_decay=0.0, schedule="constant")
    with torch.no_grad():
        last = float(task.eval()(batch)["loss"])
    assert last < first / 100, (first, last)  # 16 real fundus images memorised: 1.64 -> ~0.002


def test_mae_overfits_a_fixed_batch(shards, tmp_path):
    torch.manual_seed(0)
    mae = MAE(timm.create_model("vit_tiny_patch16_224", num_classes=0, **TINY_VIT), decoder_dim=64, decoder_depth=1,
              decoder_heads=2)
    loader = _fixed(_loader_factory(shards, augment="none"))
    batch = next(iter(loader(0)))
    with torch.no_grad():
        torch.manual_seed(1)
        first = float(mae.eval()(batch)["loss"])
    _fit(mae.train(), loader, _trainer(tmp_path / "mae", max_steps=150, checkpoint_every=1000), lr=1e-3,
         weight_decay=0.0, schedule="constant")
    with torch.no_grad():
        torch.manual_seed(1)  # the same masks as the first measurement
        last = float(mae.eval()(batch)["loss"])
    assert last < first / 3, (first, last)


def _weights(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_resume_after_preemption_is_exact(shards, tmp_path):
    make_loader = _loader_factory(shards)
    full = _task(shards, drop_path_rate=0.1)  # drop-path and augmentation use the RNG that resume must restore
    _fit(full, make_loader, _trainer(tmp_path / "full"))
    reference = _weights(full)

    fetched = {"n": 0}

    def preempting(epoch):
        for batch in make_loader(epoch):
            fetched["n"] += 1
            if fetched["n"] == 7:
                os.kill(os.getpid(), signal.SIGTERM)  # as SLURM does before preemption
            yield batch

    run = tmp_path / "interrupted"
    first = _task(shards, drop_path_rate=0.1)
    state = _fit(first, preempting, _trainer(run))
    assert state.preempted and state.step == 7
    assert latest_checkpoint(run / "checkpoints").name == "step_00000007"
    saved = json.loads((latest_checkpoint(run / "checkpoints") / "trainer_state.json").read_text())
    assert saved["ranks"][0]["data_position"]  # so the resume skips the consumed batches without decoding them
    second = _task(shards, seed=123, drop_path_rate=0.1)  # different init: everything must come from the checkpoint
    state = _fit(second, make_loader, _trainer(run, resume="auto"),
                 resume=resolve_resume(_trainer(run, resume="auto"), run))
    assert state.step == 12 and state.epoch == reference_epoch(shards)
    resumed = _weights(second)
    assert max(float((reference[k] - resumed[k]).abs().max()) for k in reference) <= 1e-6
    steps = [json.loads(x)["step"] for x in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8, 10, 12]  # one continuous log across the restart


def reference_epoch(shards):
    n = read_manifest(shards["retina"]).counts["by_split"]["train"]
    return (12 * 16) // ((n // 16) * 16)


def test_existing_run_needs_resume(tmp_path, shards):
    run = tmp_path / "r"
    _fit(_task(shards), _fixed(_loader_factory(shards)), _trainer(run, max_steps=2))
    with pytest.raises(FileExistsError, match="trainer.resume=auto"):
        resolve_resume(_trainer(run), run)
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        resolve_resume(_trainer(run, resume=str(tmp_path)), run)
    assert resolve_resume(_trainer(tmp_path / "new", resume="auto"), tmp_path / "new") is None


class _Flaky(torch.nn.Module):
    """A linear model whose loss is NaN on the optimizer steps listed in `bad` (all of them if None)."""

    def __init__(self, bad=None):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))
        self.bad, self.calls, self.history = bad, 0, []

    def forward(self, batch):
        x = batch["image"].float().mean(dim=(2, 3))                 # [B, 3]
        loss = ((x * self.w).sum(1) - 1.0).pow(2).mean()
        poisoned = self.bad is None or self.calls in self.bad
        self.calls += 1
        return {"loss": loss * float("nan") if poisoned else loss}

    def after_optimizer_step(self, step, max_steps):
        self.history.append(self.w.detach().clone())


def test_non_finite_steps_are_skipped_and_counted(tmp_path, shards):
    model = _Flaky(bad={2, 3})
    before = []
    model.register_forward_pre_hook(lambda m, a: before.append(m.w.detach().clone()))
    state = _fit(model, _fixed(_loader_factory(shards)), _trainer(tmp_path / "flaky", max_steps=6, log_every=1))
    assert state.step == 6 and state.skipped_steps == 2 and model.calls == 8
    assert torch.isfinite(model.w).all()
    assert torch.equal(before[2], before[3]) and torch.equal(before[3], before[4])  # skipped: no update
    lines = [json.loads(x) for x in (tmp_path / "flaky" / "logs" / "metrics.jsonl").read_text().splitlines()]
    skipped = [x for x in lines if x["phase"] == "nonfinite"]
    assert len(skipped) == 2 and "loss nan at step 2" in skipped[0]["skipped_step"]


def test_too_many_non_finite_steps_stop_the_run_with_the_last_good_checkpoint(tmp_path, shards):
    run = tmp_path / "nan"
    _fit(_Flaky(bad=set()), _fixed(_loader_factory(shards)), _trainer(run, max_steps=2, checkpoint_every=2))
    good = latest_checkpoint(run / "checkpoints")
    digest = (good / "model.safetensors").read_bytes()
    with pytest.raises(FloatingPointError, match=r"3 steps in a row had a non-finite loss.*last: loss nan at step 2 "
                                                 r"\(epoch .*first keys \['retina.*last good checkpoint is .*step_00000002 "
                                                 r"\(intact\)"):
        _fit(_Flaky(), _fixed(_loader_factory(shards)), _trainer(run, max_steps=10, max_bad_steps=3, resume="auto"),
             resume=good)
    assert (good / "model.safetensors").read_bytes() == digest


def test_gradient_accumulation_equals_one_big_batch(shards, tmp_path):
    big = _loader_factory(shards, augment="none", batch_size=16)
    small = _loader_factory(shards, augment="none", batch_size=8)
    a, b = _task(shards), _task(shards)
    _fit(a, big, _trainer(tmp_path / "a", max_steps=3, checkpoint_every=100))
    _fit(b, small, _trainer(tmp_path / "b", max_steps=3, checkpoint_every=100, grad_accum_steps=2))
    wa, wb = _weights(a), _weights(b)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5


def test_lr_schedule_is_a_pure_function_of_the_step():
    kw = dict(base_lr=1.0, max_steps=110, warmup_steps=10, min_lr=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)
    assert lr_at(110, **kw) == pytest.approx(0.1)
    assert lr_at(50, schedule="constant", **kw) == 1.0


def test_wandb_is_opt_in_and_named_when_missing(tmp_path):
    from medfound.train.logging import MetricsLogger, read_metrics

    pytest.importorskip("torch.utils.tensorboard")
    try:
        import wandb  # noqa: F401
        pytest.skip("wandb is installed here; the missing-package message cannot be exercised")
    except ImportError:
        pass
    with pytest.raises(ImportError, match=r"pip install medfound\[wandb\]"):
        MetricsLogger(tmp_path, ["wandb"])
    log = MetricsLogger(tmp_path, ["tensorboard"])
    log.log(3, {"loss": 0.5, "note": "text values stay in the JSONL only"})
    log.close()
    (record,) = read_metrics(tmp_path)
    assert (record["step"], record["phase"], record["loss"]) == (3, "train", 0.5) and record["note"].startswith("text")
    assert list((tmp_path / "logs" / "tensorboard").glob("events.out.tfevents.*"))


def test_checkpoint_that_does_not_fit_the_model_is_refused(pretrained):
    from medfound.train.checkpoint import load_checkpoint

    ckpt = latest_checkpoint(pretrained / "checkpoints")
    deeper = MAE(timm.create_model("vit_tiny_patch16_224", num_classes=0, **{**TINY_VIT, "depth": 3}),
                 decoder_dim=32, decoder_depth=1, decoder_heads=2)
    with pytest.raises(RuntimeError, match=r"missing \['encoder.blocks.2.*Was the recipe changed"):
        load_checkpoint(ckpt, deeper)
    wider_decoder = MAE(timm.create_model("vit_tiny_patch16_224", num_classes=0, **TINY_VIT), decoder_dim=32,
                        decoder_depth=2, decoder_heads=2)
    with pytest.raises(RuntimeError, match=r"missing \['decoder_blocks.1"):
        load_checkpoint(ckpt, wider_decoder)


def test_an_epoch_too_small_for_the_workers_names_them(shards, tmp_path):
    """A resampled epoch of 40 samples over 2 DataLoader workers gives each worker 20, below the batch of 32: no batch
    although the split holds more than 32; the error says the workers split the epoch and how to fix it."""
    urls, _ = shard_urls([shards["retina"]], "train")
    t = build_transform("none", 32, (0.5,) * 3, (0.5,) * 3, train=True)

    def loader(workers):
        return lambda epoch: make_loader(urls, Decoding(t, labelled=True), batch_size=32, num_workers=workers,
                                         order=TrainOrder(seed=3, epoch=epoch, resampled=True, samples_per_epoch=40))

    with pytest.raises(ValueError, match="data.num_workers=2 each worker batches its own share.*samples_per_epoch"):
        _fit(_task(shards), loader(2), _trainer(tmp_path / "two", max_steps=2, checkpoint_every=2))
    assert _fit(_task(shards), loader(0), _trainer(tmp_path / "none", max_steps=2, checkpoint_every=2)) is not None
