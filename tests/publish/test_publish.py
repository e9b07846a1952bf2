"""Publishing: the export reloads through timm and reproduces the trained model; the card's numbers
are eval.json's; stale or tampered artifacts are refused; the card's loading snippet runs."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from huggingface_hub import ModelCard

from medfound.io import sha256_file
from medfound.publish.export import check_reload, max_output_diff
from medfound.workflows import publish_run, rebuild_trained


@pytest.fixture(scope="module")
def published(finetuned, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pub") / "model"
    publish_run(finetuned, out, name="tiny-demo")
    return out


def test_export_reproduces_the_checkpoint_through_timm(finetuned):
    reference = rebuild_trained(finetuned)  # from recipe + checkpoint, LoRA merged
    classifier = timm.create_model(f"local-dir:{finetuned / 'export'}", pretrained=True)
    assert classifier.num_classes == 5 and classifier.pretrained_cfg["label_names"] == [
        "no DR", "mild", "moderate", "severe", "proliferative"]
    diff = max_output_diff(reference, classifier, (3, 32, 32))
    assert diff["features"] < 1e-5 and diff["output"] < 1e-5
    backbone = timm.create_model(f"local-dir:{finetuned / 'export'}", pretrained=True, num_classes=0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(backbone.eval()(x), reference.eval().forward_head(reference.forward_features(x),
                                                                                 pre_logits=True), atol=1e-5)
    cfg = timm.data.resolve_data_config({}, model=classifier)
    assert cfg["input_size"] == (3, 32, 32) and tuple(cfg["mean"]) == (0.485, 0.456, 0.406)
    adapter = json.loads((finetuned / "export" / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and adapter["modules_to_save"] == ["head"]
    assert adapter["target_modules"] == sorted(adapter["target_modules"])  # byte-stable (peft writes a set)


def test_published_folder_and_card(published, finetuned):
    assert sorted(p.name for p in published.iterdir()) == ["README.md", "adapter", "config.json", "eval.json",
                                                         "model.safetensors", "preprocessing.json", "report",
                                                         "training_config.yaml"]
    evaluation = json.loads((finetuned / "eval.json").read_text())
    card = ModelCard.load(published / "README.md")
    assert card.data.library_name == "timm" and card.data.license == "cc-by-4.0"
    assert {"medfound", "fundus", "cxr", "pathology", "demo"} <= set(card.data.tags)
    results = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert results == {k: round(v, 4) for k, v in evaluation["metrics"].items()}
    text = card.text
    for k, v in evaluation["metrics"].items():  # the table holds eval.json's numbers, not typed ones
        assert re.search(rf"\| {k} \| {v:.4f} \|", text), k
    assert "not a clinical model" in text
    assert sha256_file(published / "model.safetensors") in text
    assert evaluation["dataset"]["manifest_digest"] in text
    assert "4 optimizer steps" in text and "3 optimizer steps" in text  # fine-tuning and pretraining stages


def test_published_files_have_the_umasks_normal_mode(published):
    """Weights (safetensors writes 0600) and the LoRA adapter are readable as every other file is."""
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    modes = {p.relative_to(published).as_posix(): p.stat().st_mode & 0o777 for p in published.rglob("*")
             if p.is_file()}
    assert "model.safetensors" in modes and "adapter/adapter_model.safetensors" in modes
    assert set(modes.values()) == {0o666 & ~mask}, modes


def test_card_loading_snippet_runs(published, tmp_path):
    text = ModelCard.load(published / "README.md").text
    snippet = text.split("## How to load it", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    scope: dict = {}
    from PIL import Image

    image = tmp_path / "fundus.png"
    Image.fromarray(np.full((28, 28, 3), 120, np.uint8)).save(image)
    exec(snippet.replace("PATH_TO_THIS_FOLDER", str(published)).replace("IMAGE.png", str(image)), scope)
    assert scope["model"].num_classes == 5 and scope["backbone"].num_classes == 0
    assert tuple(scope["x"].shape) == (1, 3, 32, 32)
    assert tuple(scope["probs"].shape) == (1, 5) and float(scope["probs"].sum()) == pytest.approx(1.0, abs=1e-5)
    assert tuple(scope["features"].shape) == (1, scope["backbone"].num_features)


def test_publish_refuses_stale_eval_and_existing_output(finetuned, published, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finetuned, run)
    ev = json.loads((run / "eval.json").read_text())
    ev["model"]["sha256"] = "0" * 64
    (run / "eval.json").write_text(json.dumps(ev))
    with pytest.raises(ValueError, match="computed on other weights"):
        publish_run(run, tmp_path / "out")
    with pytest.raises(FileExistsError, match="--overwrite"):
        publish_run(finetuned, published)
    (run / "eval.json").unlink()
    with pytest.raises(FileNotFoundError, match="medfound evaluate"):
        publish_run(run, tmp_path / "out")


def test_tampered_export_fails_the_reload_check(finetuned, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "export"
    shutil.copytree(finetuned / "export", bad)
    weights = load_file(str(bad / "model.safetensors"))
    reference = rebuild_trained(finetuned)
    assert check_reload(finetuned / "export", reference) == {"weights": 0.0, "features": 0.0, "output": 0.0}
    weights["blocks.0.mlp.fc1.weight"][0, 0] += 1e-3  # one weight, slightly: the features barely move
    save_file(weights, str(bad / "model.safetensors"))
    with pytest.raises(RuntimeError, match="does not reproduce the trained model"):
        check_reload(bad, reference)
    del weights["blocks.0.mlp.fc1.weight"]
    save_file(weights, str(bad / "model.safetensors"))
    with pytest.raises(RuntimeError):  # timm's strict load refuses a missing key before we compare
        check_reload(bad, reference)
