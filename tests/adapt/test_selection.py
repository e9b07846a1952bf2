"""Validation-based model selection (eval.every / eval.select): the validation split is scored during training,
the best step becomes the export (equal to that step's weights, not the last), the test split is scored once on
it, eval.json, report.md and the card say which step won, publish's reload check passes, a preempted run keeps its
history, and selection does not change the training run's random draws."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from medfound.config import ConfigError, load_recipe
from medfound.workflows import publish_run, run_finetune

from helpers import ROOT, tiny_finetune_overrides


def _recipe(shards, pretrained, out, *extra):
    return load_recipe(ROOT / "adapt" / "demo_classify_lora.yaml",
                       tiny_finetune_overrides(shards, pretrained / "export", out, steps=6)
                       + ["trainer.checkpoint_every=2", "eval.bootstrap=20", *extra])


@pytest.fixture(scope="module")
def selected(shards, pretrained, tmp_path_factory):
    out = tmp_path_factory.mktemp("sel") / "run"
    summary = run_finetune(_recipe(shards, pretrained, out, "eval.every=2", "eval.select=accuracy"))
    return out, summary


def test_the_export_is_the_best_validation_step(selected):
    run, summary = selected
    record = json.loads((run / "selection" / "selection.json").read_text())
    assert [h["step"] for h in record["history"]] == [2, 4, 6] and record["split"] == "val"
    values = {h["step"]: h["metrics"]["accuracy"] for h in record["history"]}
    best = max(values, key=lambda s: (values[s], -s))  # ties keep the earlier step
    assert record["best_step"] == best == summary["selected_step"]
    # the export holds that step's trained tensors (LoRA + head), merged
    saved = load_file(str(run / "selection" / "best.safetensors"))
    assert saved and all("lora_" in k or "head" in k for k in saved)
    report = json.loads((run / "eval.json").read_text())
    assert report["selection"]["selected_step"] == best and report["selection"]["trained_steps"] == 6
    assert report["selection"]["scored_steps"] == [2, 4, 6] and report["dataset"]["split"] == "test"
    md = (run / "report" / "report.md").read_text()
    assert f"Model selection: the export is step {best} of 6, the best accuracy on split 'val'" in md
    # the validation curve reaches the run's logs beside the loss (metrics.jsonl here; TensorBoard and wandb alike)
    from medfound.train.logging import read_metrics

    curve = [r for r in read_metrics(run) if r["phase"] == "val"]
    assert [r["step"] for r in curve] == [2, 4, 6] and [r["accuracy"] for r in curve] == [values[s] for s in (2, 4, 6)]


def test_the_selected_export_reloads_and_publishes(selected, tmp_path):
    """publish rebuilds the model from the checkpoint plus the selected tensors and must reproduce the export."""
    from huggingface_hub import ModelCard

    from medfound.workflows import rebuild_trained
    import timm

    run, summary = selected
    ref = rebuild_trained(run)
    exported = timm.create_model(f"local-dir:{run / 'export'}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert float((ref.eval()(x) - exported(x)).abs().max()) < 1e-5
    publish_run(run, tmp_path / "pub")
    assert "Model selection: the export is step" in ModelCard.load(tmp_path / "pub" / "README.md").text


def test_selection_does_not_change_the_training_draws(selected, shards, pretrained, tmp_path):
    """The same recipe without eval.every trains to the same last-step weights: scoring forks the RNG."""
    from medfound.train.checkpoint import latest_checkpoint

    run, _ = selected
    plain = tmp_path / "plain"
    run_finetune(_recipe(shards, pretrained, plain, "eval.select=accuracy"))
    a = load_file(str(latest_checkpoint(run / "checkpoints") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(plain / "checkpoints") / "model.safetensors"))
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0


def test_selection_refuses_a_missing_split_the_test_split_and_an_unknown_metric(shards, pretrained, tmp_path):
    with pytest.raises(ConfigError, match="eval.select_split='tune' has no samples"):
        run_finetune(_recipe(shards, pretrained, tmp_path / "a", "eval.every=2", "eval.select_split=tune"))
    with pytest.raises(ConfigError, match="selecting on the split that reports the metrics"):
        run_finetune(_recipe(shards, pretrained, tmp_path / "b", "eval.every=2", "eval.select_split=test"))
    with pytest.raises(ConfigError, match="eval.select='f1' is not a metric"):
        run_finetune(_recipe(shards, pretrained, tmp_path / "c", "eval.every=2", "eval.select=f1"))
    with pytest.raises(ConfigError, match="unknown key 'eval'"):  # pretraining selects nothing (see `monitor:`)
        load_recipe(ROOT / "pretrain" / "demo_mae_tiny.yaml", ["eval.every=5"])


def test_a_resumed_run_keeps_its_validation_history(shards, pretrained, tmp_path):
    run = tmp_path / "run"
    run_finetune(_recipe(shards, pretrained, run, "eval.every=2", "trainer.max_steps=4"))
    run_finetune(_recipe(shards, pretrained, run, "eval.every=2", "trainer.resume=auto",
                         "trainer.resume_changes=allow"))
    record = json.loads((run / "selection" / "selection.json").read_text())
    assert [h["step"] for h in record["history"]] == [2, 4, 6]


def test_selected_tensors_must_be_exactly_the_modules_trainable_ones(tmp_path):
    """apply_selection loads with strict=False only because frozen tensors are not saved: a saved key the module
    lacks, or a trainable tensor the file lacks, raises naming them."""
    from safetensors.torch import save_file

    from medfound.run.selection import apply_selection, trainable_state

    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    net[0].requires_grad_(False)
    (tmp_path / "selection").mkdir()
    save_file(trainable_state(net), str(tmp_path / "selection" / "best.safetensors"), metadata={"step": "4"})
    assert apply_selection(tmp_path, net) == 4
    net[0].requires_grad_(True)  # now trainable but not in the file
    with pytest.raises(RuntimeError, match=r"trainable but not saved: \['0.bias', '0.weight'\]"):
        apply_selection(tmp_path, net)
    other = torch.nn.Sequential(torch.nn.Linear(3, 2))
    with pytest.raises(RuntimeError, match=r"not in the module's trainable tensors: \['1.bias', '1.weight'\]"):
        apply_selection(tmp_path, other)


def test_segmentation_selects_on_validation_dice_and_logs_the_curve(tmp_path):
    """eval.every for segmentation: the validation split is segmented whole by the evaluation's own path (native
    geometry) every N steps, Dice picks the export (the default metric), the curve reaches TensorBoard under val/,
    and eval.json / report.md say which step won."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from medfound.train.logging import read_metrics
    from medfound.workflows import shard

    from helpers import DATA, tiny_segment_overrides

    rows = ["path,mask,split", "images/amos_0004_75.png,masks/amos_0004_75_aorta_000.png,train",
            "images/s0114_111.png,masks/s0114_111_aorta_000.png,val",
            "images/amos_0006_90.png,masks/amos_0006_90_aorta_000.png,test"]
    (tmp_path / "aorta.csv").write_text("\n".join(rows) + "\n")
    shards = tmp_path / "shards"
    shard("images", DATA / "ct_organs", shards, table=tmp_path / "aorta.csv", name="ct_aorta", modality="ct",
          keep_names=True)
    run = tmp_path / "run"
    overrides = tiny_segment_overrides("unet", {"ct": shards}, None, run, steps=4) + [
        "eval.every=2", "eval.bootstrap=20", "trainer.loggers=[tensorboard]", "trainer.checkpoint_every=2"]
    summary = run_finetune(load_recipe(ROOT / "adapt" / "segment_unet.yaml", overrides))
    record = json.loads((run / "selection" / "selection.json").read_text())
    assert record["metric"] == "dice" and record["split"] == "val" and [h["step"] for h in record["history"]] == [2, 4]
    values = {h["step"]: h["metrics"]["dice"] for h in record["history"]}
    best = max(values, key=lambda s: (values[s], -s))
    assert record["best_step"] == best == summary["selected_step"]
    assert all("pixel_f1" in h["metrics"] and "hd95" not in h["metrics"] for h in record["history"])
    # the export is the selected step's network: its weights are the saved best tensors
    saved = load_file(str(run / "selection" / "best.safetensors"))
    exported = load_file(str(run / "export" / "segmenter.safetensors"))
    matched = [k for k in saved if k.removeprefix("model.") in exported]
    assert len(matched) == len(saved) and all(torch.equal(saved[k], exported[k.removeprefix("model.")])
                                              for k in matched)
    curve = [r for r in read_metrics(run) if r["phase"] == "val"]
    assert [r["step"] for r in curve] == [2, 4] and [r["dice"] for r in curve] == [values[2], values[4]]
    events = EventAccumulator(str(run / "logs" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("val/dice")] == [2, 4]
    # the test metrics of the selected export at the final step, and the hyperparameters beside them (HParams)
    report = json.loads((run / "eval.json").read_text())
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("test/dice")] == [(4, round(report["metrics"]["dice"], 6))]
    assert [r for r in read_metrics(run) if r["phase"] == "test"][0]["dice"] == report["metrics"]["dice"]
    assert [e.step for e in events.Scalars("hparam/dice")] == [4]
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")
    # the evaluation's pictures beside them: the test overlays (and the plots report.md shows)
    overlays = [t for t in events.Tags()["images"] if t.startswith("images/eval/report/overlay_internal")]
    assert overlays and [e.step for e in events.Images(overlays[0])] == [4]
    report = json.loads((run / "eval.json").read_text())
    assert report["selection"]["selected_step"] == best and report["dataset"]["split"] == "test"
    assert f"Model selection: the export is step {best} of 4, the best dice on split 'val'" in \
        (run / "report" / "report.md").read_text()


def test_box_prompts_select_on_validation_dice(organ_shards, pretrained, tmp_path):
    """eval.every for box prompts: every structure of the selection split predicted from its tight box by the
    evaluation's code; mean Dice (the default) picks the export. (The bundled set has train and test splits only, so
    this mechanics test selects on test and reports on train.)"""
    run = tmp_path / "run"
    overrides = [f"backbone.weights={pretrained / 'export'}", "backbone.model_args={img_size: 64}",
                 f"data.shards=[{organ_shards}]", "data.img_size=64", "data.batch_size=2", "head.dim=32",
                 "head.heads=2", "head.mlp_dim=64", f"trainer.output_dir={run}", "trainer.max_steps=4",
                 "trainer.progress=false", "trainer.loggers=[]", "tuning=lora", "eval.every=2",
                 "eval.select_split=test", "eval.split=train", "eval.bootstrap=0"]
    summary = run_finetune(load_recipe(ROOT / "adapt" / "medsam.yaml", overrides))
    record = json.loads((run / "selection" / "selection.json").read_text())
    assert record["metric"] == "dice" and [h["step"] for h in record["history"]] == [2, 4]
    assert all(0 <= h["metrics"]["dice"] <= 1 and "dice_by_structure_mean" in h["metrics"] for h in record["history"])
    values = {h["step"]: h["metrics"]["dice"] for h in record["history"]}
    assert summary["selected_step"] == max(values, key=lambda s: (values[s], -s))
    assert json.loads((run / "eval.json").read_text())["selection"]["selected_step"] == summary["selected_step"]


def test_mil_selects_on_validation_slides_and_logs_the_curve(bags, tmp_path):
    """eval.every for MIL: the validation slides scored by the evaluation's code every N steps, the curve in
    TensorBoard under val/, the best step exported (its head weights)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from helpers import two_class_bags, write_bags

    folder = tmp_path / "bags"
    index, s, neg = two_class_bags(bags, folder)
    write_bags(folder, index, [s, {**neg, "slide": "negated"}, {**s, "slide": "val_a", "split": "val"},
                               {**neg, "slide": "val_b", "split": "val"}])
    run = tmp_path / "run"
    overrides = [f"data.shards=[{folder}]", "eval.split=train", "head.hidden_dim=16", "head.attention_dim=8",
                 "head.dropout=0", "data.batch_size=2", "optim.lr=1e-2", "optim.warmup_steps=0",
                 f"trainer.output_dir={run}", "trainer.max_steps=6", "trainer.progress=false",
                 "trainer.loggers=[tensorboard]", "eval.every=2", "eval.bootstrap=0"]
    summary = run_finetune(load_recipe(ROOT / "adapt" / "uni_abmil.yaml", overrides))
    record = json.loads((run / "selection" / "selection.json").read_text())
    assert record["metric"] == "auroc" and record["split"] == "val"
    assert [h["step"] for h in record["history"]] == [2, 4, 6]
    values = {h["step"]: h["metrics"]["auroc"] for h in record["history"]}
    assert summary["selected_step"] == max(values, key=lambda s: (values[s], -s))
    saved = load_file(str(run / "selection" / "best.safetensors"))
    exported = load_file(str(run / "export" / "mil.safetensors"))
    assert saved and all(torch.equal(saved[k], exported[k.removeprefix("model.")]) for k in saved)
    events = EventAccumulator(str(run / "logs" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("val/auroc")] == [2, 4, 6]
    # the evaluation's attention heatmaps and ROC curve in TensorBoard's Images tab at the final step
    images = events.Tags()["images"]
    assert "images/eval/report/roc" in images, images
    assert len([t for t in images if t.startswith("images/eval/heatmaps/")]) == 2, images  # the two test slides


def test_mil_trains_on_a_fraction_of_the_slides(bags, tmp_path):
    """data.train_fraction for MIL: the labelled slides kept are drawn per class (as for images), recorded in the
    lineage and eval.json, and selection scores the same fraction of the validation slides."""
    from helpers import two_class_bags, write_bags

    folder = tmp_path / "bags"
    index, s, neg = two_class_bags(bags, folder)
    write_bags(folder, index, [{**s, "slide": "a0"}, {**s, "slide": "a1"}, {**neg, "slide": "b0"},
                               {**neg, "slide": "b1"}, {**s, "slide": "va0", "split": "val"},
                               {**s, "slide": "va1", "split": "val"}, {**neg, "slide": "vb0", "split": "val"},
                               {**neg, "slide": "vb1", "split": "val"}])
    run = tmp_path / "run"
    overrides = [f"data.shards=[{folder}]", "eval.split=train", "head.hidden_dim=16", "head.attention_dim=8",
                 "data.batch_size=2", f"trainer.output_dir={run}", "trainer.max_steps=2", "trainer.progress=false",
                 "trainer.loggers=[]", "eval.every=2", "eval.bootstrap=0", "data.train_fraction=0.5"]
    run_finetune(load_recipe(ROOT / "adapt" / "uni_abmil.yaml", overrides))
    report = json.loads((run / "eval.json").read_text())
    labels = report["train_labels"]
    assert labels["samples"] == 2 and labels["of_samples"] == 4 and labels["fraction"] == 0.5
    assert labels["per_class"] == {"benign": {"chosen": 1, "of": 2}, "malignant": {"chosen": 1, "of": 2}}
    selection = json.loads((run / "selection" / "selection.json").read_text())
    assert selection["subset"]["samples"] == 2 and selection["subset"]["of_samples"] == 4


def test_a_selection_whose_looks_all_tie_says_it_could_not_choose(tmp_path):
    """The 1% validation subset of PneumoniaMNIST has 5 images: AUROC 1.0 at every look. The record counts the tie and
    the report says selection could not choose."""
    from medfound.evaluate.markdown import evaluation_sections
    from medfound.evaluate.records import selection_summary
    from medfound.run.selection import Selection

    net = torch.nn.Linear(2, 2)
    sel = Selection(tmp_path, "auroc", "val", 2, lambda module: {"auroc": 1.0, "accuracy": 0.6})
    for step in (2, 4, 6):
        sel(step, net)
    record = sel.record()
    assert record["best_step"] == 2 and record["tied"] == 3
    summary = selection_summary({"selection": record, "steps": 6})
    text = "\n".join(evaluation_sections({"metrics": {"auroc": 0.9}, "selection": summary}))
    assert "Every look scored the same auroc on the validation samples, so selection could not choose" in text
    values = iter([0.7, 0.8])
    other = Selection(tmp_path / "b", "auroc", "val", 2, lambda module: {"auroc": next(values)})
    other(2, net)
    other(4, net)
    assert other.record()["tied"] == 1
    assert "could not choose" not in "\n".join(evaluation_sections(
        {"metrics": {"auroc": 0.9}, "selection": selection_summary({"selection": other.record(), "steps": 4})}))


def test_without_eval_every_the_record_says_the_last_step_was_fixed_in_advance():
    """Issue 26: eval.json says which policy picked the export, also when none did (steps fixed in advance)."""
    from medfound.evaluate.markdown import evaluation_sections
    from medfound.evaluate.records import selection_summary

    summary = selection_summary({"steps": 500})
    assert summary == {"policy": "fixed steps", "selected_step": 500, "trained_steps": 500}
    text = "\n".join(evaluation_sections({"metrics": {"auroc": 0.9}, "selection": summary}))
    assert "Model selection: none; the export is the last step (500), fixed in advance" in text
    assert selection_summary({}) is None  # no training record (nothing to say)
