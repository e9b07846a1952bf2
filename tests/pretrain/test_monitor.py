"""The representation monitor of pretraining: k-NN and collapse signals every N steps, in metrics.jsonl and
TensorBoard, in the export's lineage and the card; a collapsed backbone is flagged."""

from __future__ import annotations

import json

import pytest
import torch

from medfound.config import ConfigError, load_recipe

from helpers import ROOT, tiny_pretrain_overrides


def test_pretraining_logs_knn_and_collapse_signals_where_users_look(shards, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from medfound.publish.check import check_card
    from medfound.train.logging import read_metrics
    from medfound.workflows import publish, run_pretrain

    run = tmp_path / "run"
    overrides = tiny_pretrain_overrides(shards, run, steps=4) + [
        f"monitor.shards={shards['retina']}", "monitor.every=2", "monitor.split=val", "monitor.max_bank=200",
        "trainer.loggers=[tensorboard]"]
    summary = run_pretrain(load_recipe(ROOT / "pretrain" / "demo_mae_tiny.yaml", overrides))
    looks = [r for r in read_metrics(run) if r["phase"] == "monitor"]
    assert [r["step"] for r in looks] == [0, 2, 4]  # step 0: the starting weights, before any update
    assert all(0 <= r["knn_auroc"] <= 1 and r["feature_std"] > 0 and r["effective_rank"] >= 1 and
               r["collapsed"] == 0 for r in looks)
    events = EventAccumulator(str(run / "logs" / "tensorboard"))
    events.Reload()
    assert {"monitor/knn_auroc", "monitor/effective_rank", "monitor/feature_std"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("monitor/knn_auroc")] == [0, 2, 4]
    lineage = json.loads((run / "export" / "config.json").read_text())["medfound"]
    assert lineage["monitor"]["last_step"] == 4 and lineage["monitor"]["last"] == {k: v for k, v in looks[-1].items()
                                                                                  if k not in ("step", "time", "phase")}
    assert summary["monitor"]["knn_accuracy"] == looks[-1]["knn_accuracy"]
    publish(run, tmp_path / "model")
    card = (tmp_path / "model" / "README.md").read_text()
    assert "Representation monitor at step 4 (k-NN, k = 20, from split `train` to `val`" in card
    assert check_card(tmp_path / "model") == []


def test_a_constant_backbone_is_flagged_as_collapsed(shards, tmp_path, capsys):
    import timm

    from medfound.run.monitor import build_monitor

    recipe = load_recipe(ROOT / "pretrain" / "demo_mae_tiny.yaml", tiny_pretrain_overrides(shards, tmp_path / "r") + [
        f"monitor.shards={shards['retina']}", "monitor.every=1", "monitor.max_bank=100", "monitor.max_queries=60"])
    monitor = build_monitor(recipe)
    vit = timm.create_model(recipe.backbone.name, num_classes=0, **recipe.backbone.model_args)
    with torch.no_grad():
        for p in vit.parameters():
            p.zero_()  # every image -> the same embedding

    class Objective(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = vit

        def export_backbone(self):
            return self.encoder

    values = monitor(7, Objective())
    assert values["collapsed"] == 1.0 and values["feature_std"] < 1e-4 and values["effective_rank"] <= 1.5
    assert "step 7: the features collapsed" in capsys.readouterr().out
    assert monitor.record()["warnings"] and monitor.record()["last_step"] == 7


def test_monitor_settings_are_checked_before_any_work(shards, tmp_path):
    from medfound.run.monitor import build_monitor

    base = tiny_pretrain_overrides(shards, tmp_path / "r")
    with pytest.raises(ConfigError, match=r"has no split \['validation'\]"):
        build_monitor(load_recipe(ROOT / "pretrain" / "demo_mae_tiny.yaml",
                                  base + [f"monitor.shards={shards['retina']}", "monitor.every=5",
                                          "monitor.split=validation"]))
    with pytest.raises(ConfigError, match="labels none: k-NN needs single-label|is none: k-NN needs single-label"):
        build_monitor(load_recipe(ROOT / "pretrain" / "demo_mae_tiny.yaml",
                                  base + [f"monitor.shards={shards['he']}", "monitor.every=5"]))
    with pytest.raises(ConfigError, match="monitor.every"):
        load_recipe(ROOT / "pretrain" / "demo_mae_tiny.yaml", base + [f"monitor.shards={shards['retina']}"])


def test_export_best_exports_the_best_look_and_the_card_says_so(shards, tmp_path):
    """monitor.export=best: the export (and its DINO heads) is the state of the look with the highest k-NN AUROC,
    the lineage names that step, the card says so, and publish's reload check (the rebuild from the checkpoint plus
    the kept look) reproduces the export."""
    from safetensors.torch import load_file

    from medfound.publish.check import check_card
    from medfound.workflows import publish, run_pretrain

    run = tmp_path / "run"
    overrides = tiny_pretrain_overrides(shards, run, steps=3, objective="dinov2") + [
        f"monitor.shards={shards['retina']}", "monitor.every=1", "monitor.max_bank=200", "monitor.max_queries=100",
        "monitor.export=best", "optim.lr=0.05"]  # a high lr: the looks differ
    summary = run_pretrain(load_recipe(ROOT / "pretrain" / "demo_dinov2_tiny.yaml", overrides))
    record = json.loads((run / "monitor" / "monitor.json").read_text())
    looks = {h["step"]: h["knn_auroc"] for h in record["history"]}
    assert sorted(looks) == [0, 1, 2, 3]
    best = max(sorted(looks), key=lambda s: looks[s])  # the first of the highest
    lineage = json.loads((run / "export" / "config.json").read_text())["medfound"]["monitor"]
    assert lineage["export"] == "best" and lineage["best_step"] == best and lineage["exported_step"] == best
    assert summary["monitor_step"] == best and summary["monitor"]["knn_auroc"] == looks[best]
    kept = load_file(str(run / "monitor" / "best.safetensors"))
    exported = load_file(str(run / "export" / "model.safetensors"))
    teacher = {k.removeprefix("teacher.backbone."): v for k, v in kept.items() if k.startswith("teacher.backbone.")}
    assert set(exported) == set(teacher) and all(torch.equal(exported[k], teacher[k]) for k in exported)
    heads = load_file(str(run / "export" / "dino_heads.safetensors"))
    assert heads and all(any(torch.equal(v, w) for w in kept.values() if w.shape == v.shape) for v in heads.values())
    publish(run, tmp_path / "model")
    card = (tmp_path / "model" / "README.md").read_text()
    assert f"The export holds the monitor's best look (`monitor.export: best`, by knn_auroc): step {best}," in card
    assert check_card(tmp_path / "model") == []


def test_a_collapsed_look_is_never_the_best_and_the_history_survives_a_restart(shards, tmp_path):
    import timm

    from medfound.run.monitor import Monitor, apply_monitor_best, build_monitor

    recipe = load_recipe(ROOT / "pretrain" / "demo_mae_tiny.yaml", tiny_pretrain_overrides(shards, tmp_path / "r") + [
        f"monitor.shards={shards['retina']}", "monitor.every=1", "monitor.max_bank=100", "monitor.max_queries=60",
        "monitor.export=best"])
    run_dir = tmp_path / "r"
    monitor = build_monitor(recipe, run_dir)

    class Objective(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = timm.create_model(recipe.backbone.name, num_classes=0, **recipe.backbone.model_args)

        def export_backbone(self):
            return self.encoder

    objective = Objective()
    start = {k: v.clone() for k, v in objective.state_dict().items()}
    first = monitor(0, objective)
    with torch.no_grad():
        for p in objective.parameters():
            p.zero_()  # collapsed: every image -> the same embedding, and k-NN ties at chance or better
    assert monitor(5, objective)["collapsed"] == 1.0
    assert monitor.best() == (0, first["knn_auroc"])
    again = Monitor(recipe, run_dir)  # a resumed run reads the looks back
    assert again.history == monitor.history and again.best() == (0, first["knn_auroc"])
    block, summary = again.finish(objective)  # loads the best look's state
    assert block["monitor"]["exported_step"] == 0 and summary["monitor_step"] == 0
    assert all(torch.equal(objective.state_dict()[k], v) for k, v in start.items())
    depth = recipe.backbone.model_args["depth"]
    shallower = torch.nn.Module()  # the kept state was written for `depth` blocks, read by one fewer
    shallower.encoder = timm.create_model(recipe.backbone.name, num_classes=0,
                                          **{**recipe.backbone.model_args, "depth": depth - 1})
    with pytest.raises(RuntimeError, match=rf"does not fit the objective the recipe builds \(not in its state: "
                                           rf"\['encoder\.blocks\.{depth - 1}\."):
        apply_monitor_best(run_dir, shallower)
    with pytest.raises(ValueError, match="monitor.export=best keeps the best look's state in RUN_DIR/monitor"):
        Monitor(recipe)
