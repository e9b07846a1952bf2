"""Continuing self-supervised pretraining from earlier weights (pretrain/continue_*.yaml): the objective's heads or
decoder come with the weights when they carry them, and new ones warm up alone with the backbone frozen."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from helpers import ROOT, tiny_pretrain_overrides


def _moved(a, b) -> float:
    """The largest change of any weight between two safetensors files with the same keys."""
    x, y = load_file(str(a)), load_file(str(b))
    assert set(x) == set(y)
    return max(float((x[k] - y[k]).abs().max()) for k in x)


FROZEN = 1e-6  # the EMA teacher of an unchanged student moves only by rounding (m t + (1 - m) t)


def test_dinov2_continues_with_the_exports_heads_or_warms_up_new_ones_on_a_frozen_backbone(shards, tmp_path):
    from medfound.config import load_recipe
    from medfound.workflows import build_objective, run_pretrain

    start = tmp_path / "start"
    run_pretrain(load_recipe(ROOT / "pretrain" / "demo_dinov2_tiny.yaml",
                             tiny_pretrain_overrides(shards, start, steps=2, objective="dinov2")))
    assert (start / "export" / "dino_heads.safetensors").is_file()  # the export keeps the teacher's heads

    def continued(out, *extra):
        return load_recipe(ROOT / "pretrain" / "continue_dinov2.yaml", tiny_pretrain_overrides(
            shards, out, steps=3, objective="dinov2") + [f"backbone.weights={start / 'export'}", *extra])

    # the heads come with the weights: loaded into student and teacher, and no warm-up for them
    objective = build_objective(continued(tmp_path / "c"))
    heads = load_file(str(start / "export" / "dino_heads.safetensors"))
    assert all(torch.equal(objective.teacher.state_dict()[k], v) for k, v in heads.items())
    assert objective.cfg["head_warmup_steps"] == 0 and objective.momentum(0, 3) == 0.999
    # Gram anchoring (objective.gram_weight): the anchor is the backbone the run starts from, the export's weights
    anchored = build_objective(continued(tmp_path / "g", "objective.gram_weight=2"))
    weights = load_file(str(start / "export" / "model.safetensors"))
    assert all(torch.equal(anchored.gram_teacher.state_dict()[k], v) for k, v in weights.items())
    assert "Gram anchoring x2.0 to the starting weights" in continued(tmp_path / "g", "objective.gram_weight=2") \
        .objective.describe()
    with pytest.raises(ValueError, match="objective.gram_weight anchors the student to the weights it starts from"):
        build_objective(load_recipe(ROOT / "pretrain" / "demo_dinov2_tiny.yaml", tiny_pretrain_overrides(
            shards, tmp_path / "s", objective="dinov2") + ["objective.gram_weight=2"]))
    # new heads (objective.fresh_heads) warm up alone: after 3 warm-up steps the backbone is still the start's
    # (a fast teacher, momentum 0.5, so that the exported teacher heads show the students' training)
    run_pretrain(continued(tmp_path / "fresh", "objective.fresh_heads=true", "objective.head_warmup_steps=3",
                           "objective.momentum=[0.5,0.5]"))
    assert _moved(tmp_path / "fresh" / "export" / "model.safetensors", start / "export" / "model.safetensors") < FROZEN
    assert _moved(tmp_path / "fresh" / "export" / "dino_heads.safetensors",
                  start / "export" / "dino_heads.safetensors") > 10 * FROZEN
    # and the run's lineage names where it started
    parent = json.loads((tmp_path / "fresh" / "export" / "config.json").read_text())["medfound"]["parent"]
    assert parent["stage"] == "pretraining" and parent["objective"].startswith("DINOv2")


def test_mae_continues_with_the_decoder_or_warms_up_a_new_one_on_a_frozen_encoder(shards, tmp_path):
    from medfound.config import load_recipe
    from medfound.workflows import run_pretrain

    start = tmp_path / "start"
    run_pretrain(load_recipe(ROOT / "pretrain" / "demo_mae_tiny.yaml", tiny_pretrain_overrides(shards, start, steps=2)))
    alone = tmp_path / "encoder_only"  # an encoder released without its decoder
    shutil.copytree(start / "export", alone)
    (alone / "mae_decoder.safetensors").unlink()

    def continued(weights, out):
        return load_recipe(ROOT / "pretrain" / "continue_mae.yaml", tiny_pretrain_overrides(shards, out, steps=2) + [
            f"backbone.weights={weights}", "objective.head_warmup_steps=2", "optim.blr=0.01"])  # visible steps

    run_pretrain(continued(alone, tmp_path / "new_decoder"))  # the new decoder trains, the encoder waits
    assert _moved(tmp_path / "new_decoder" / "export" / "model.safetensors",
                  start / "export" / "model.safetensors") == 0.0  # no teacher: not even rounding
    assert _moved(tmp_path / "new_decoder" / "export" / "mae_decoder.safetensors",
                  start / "export" / "mae_decoder.safetensors") > 10 * FROZEN
    run_pretrain(continued(start / "export", tmp_path / "with_decoder"))  # its own decoder: no warm-up, it trains
    assert _moved(tmp_path / "with_decoder" / "export" / "model.safetensors", start / "export" / "model.safetensors") > 10 * FROZEN
