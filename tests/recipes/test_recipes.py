"""Every recipe in pretrain/ and adapt/ validates, says what it does and how to run it, and runs two
steps on the bundled real data (model shrunk and paths pointed at test shards through overrides)."""

from __future__ import annotations

from pathlib import Path

import pytest

from medfound.config import FinetuneRecipe, PretrainRecipe, load_recipe

from helpers import ROOT, tiny_finetune_overrides, tiny_pretrain_overrides

PRETRAIN = sorted((ROOT / "pretrain").glob("*.yaml"))
ADAPT = sorted((ROOT / "adapt").glob("*.yaml"))


def test_there_are_recipes():
    assert PRETRAIN and ADAPT


@pytest.mark.parametrize("path", PRETRAIN + ADAPT, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_validates_and_documents_its_command(path: Path):
    recipe = load_recipe(path)
    assert isinstance(recipe, PretrainRecipe if path.parent.name == "pretrain" else FinetuneRecipe)
    head = path.read_text().splitlines()
    comments = []
    for line in head:
        if not line.startswith("#"):
            break
        comments.append(line)
    assert len(comments) >= 2, f"{path.name} must open with a comment saying what it does and how to run it"
    verb = "pretrain" if path.parent.name == "pretrain" else "finetune"
    assert any(f"medfound {verb} {path.parent.name}/{path.name}" in c for c in comments), \
        f"{path.name}: the opening comment must give the exact command `medfound {verb} {path.parent.name}/{path.name}`"


@pytest.mark.parametrize("path", PRETRAIN, ids=lambda p: p.name)
def test_pretrain_recipe_runs_two_steps(path: Path, shards, tmp_path):
    from medfound.workflows import run_pretrain

    objective = load_recipe(path).objective.name
    recipe = load_recipe(path, tiny_pretrain_overrides(shards, tmp_path / "run", steps=2, objective=objective))
    summary = run_pretrain(recipe)
    assert summary["step"] == 2 and Path(summary["export"], "model.safetensors").is_file()


@pytest.mark.parametrize("path", ADAPT, ids=lambda p: p.name)
def test_adapt_recipe_runs_two_steps(path: Path, shards, pretrained, tmp_path):
    from medfound.workflows import run_finetune

    key = "pneumonia" if "pneumonia" in path.name else "retina"
    recipe = load_recipe(path, tiny_finetune_overrides(shards, pretrained / "export", tmp_path / "run", 2, key))
    summary = run_finetune(recipe)
    assert summary["step"] == 2 and summary["eval"]["auroc"] is not None
