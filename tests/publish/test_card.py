"""The model card cannot drift: every section renders, `medfound card check` passes on a fresh folder and fails,
naming the mismatch, when a number in the card is edited or the weights change; pushing checks first, lists files
on a dry run and fails fast without a token or a network."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from medfound.cli import main
from medfound.publish.check import check_card
from medfound.publish.hub import push_folder
from medfound.workflows import publish_run

SECTIONS = ["## Model details", "## Preprocessing", "## Intended use and out-of-scope use", "## Training data",
            "## Training procedure", "## Evaluation", "## Bias, risks and limitations", "## Environmental impact",
            "## How to load it", "## Citation"]


@pytest.fixture(scope="module")
def card_folder(finetuned, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("card") / "model"
    publish_run(finetuned, out, name="tiny-card")
    return out


def _copy(folder: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(folder, dst)
    return dst


def test_card_renders_every_section_with_intervals_and_preprocessing(card_folder):
    text = (card_folder / "README.md").read_text()
    positions = [text.index(s) for s in SECTIONS]
    assert positions == sorted(positions)
    evaluation = json.loads((card_folder / "eval.json").read_text())
    lo, hi = evaluation["intervals"]["auroc"]
    assert f"| auroc | {evaluation['metrics']['auroc']:.4f} | {lo:.4f} – {hi:.4f} |" in text
    assert "Per class" in text and "research" in text and "distribution shift" in text
    assert "De-identification" in text and "CPU-hours" in text
    prep = json.loads((card_folder / "preprocessing.json").read_text())
    assert prep["input_size"] == [3, 32, 32] and prep["mean"] == [0.485, 0.456, 0.406]
    assert set(prep["modality"]) == {"fundus", "cxr", "pathology"} and prep["microns_per_pixel"] == 1.0
    card = ModelCard.load(card_folder / "README.md")
    assert card.data.pipeline_tag == "image-classification" and card.data.library_name == "timm"
    assert (card_folder / "report" / "roc.png").is_file() and (card_folder / "report" / "reliability.png").is_file()
    assert "![ROC with 95% bootstrap bands](report/roc.png)" in text and "](report/confusion.png)" in text


def test_card_check_passes_on_a_fresh_folder(card_folder, capsys):
    assert check_card(card_folder) == []
    assert main(["card", "check", str(card_folder)]) == 0
    assert "matches" in capsys.readouterr().out


def test_card_check_fails_when_a_number_is_edited(card_folder, tmp_path, capsys):
    folder = _copy(card_folder, tmp_path)
    evaluation = json.loads((folder / "eval.json").read_text())
    true = f"{evaluation['metrics']['accuracy']:.4f}"
    readme = folder / "README.md"
    text = readme.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| accuracy |"))
    readme.write_text(text.replace(row, row.replace(f"| {true} |", "| 0.9900 |")))
    problems = check_card(folder)
    assert len(problems) == 1 and f"says 0.9900 where eval.json gives {true}" in problems[0]
    assert main(["card", "check", str(folder)]) == 1
    assert "0.9900" in capsys.readouterr().err


def test_card_check_fails_when_an_interval_or_the_model_index_is_edited(card_folder, tmp_path):
    folder = _copy(card_folder, tmp_path)
    evaluation = json.loads((folder / "eval.json").read_text())
    readme = folder / "README.md"
    text = readme.read_text()
    lo = f"{evaluation['intervals']['auroc'][0]:.4f}"
    row = next(line for line in text.splitlines() if line.startswith("| auroc |"))
    readme.write_text(text.replace(row, row.replace(lo, "0.0001")))
    assert any("0.0001" in p for p in check_card(folder))
    readme.write_text(text.replace(f"value: {round(evaluation['metrics']['auroc'], 4)}", "value: 0.99", 1))
    problems = check_card(folder)
    assert problems and "model-index auroc" in problems[0] and "0.99" in problems[0]


def test_card_check_fails_when_the_weights_change(card_folder, tmp_path):
    folder = _copy(card_folder, tmp_path)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    problems = check_card(folder)
    assert any(p.startswith("weights model.safetensors: the card says sha256") for p in problems)
    assert any("eval.json scored weights" in p for p in problems)
    (folder / "eval.json").unlink()
    assert any("eval.json is missing" in p for p in check_card(folder))


def test_dry_run_lists_the_files_without_network(card_folder, capsys):
    out = push_folder(card_folder, "org/model", dry_run=True)
    paths = {f["path"] for f in out["files"]}
    assert {"README.md", "model.safetensors", "config.json", "eval.json", "preprocessing.json"} <= paths
    assert out["bytes"] == sum(f["bytes"] for f in out["files"]) and out["dry_run"] is True
    assert main(["card", "push", str(card_folder), "--repo", "org/model", "--dry-run"]) == 0
    assert "would upload" in capsys.readouterr().out


def test_push_fails_fast_without_token_or_network(card_folder, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(RuntimeError, match="no Hugging Face token.*medfound card push"):
        push_folder(card_folder, "org/model")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_fake")
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on port 9
    start = time.time()
    with pytest.raises(ConnectionError, match="cannot reach http://127.0.0.1:9"):
        push_folder(card_folder, "org/model")
    assert time.time() - start < 10
    folder = _copy(card_folder, tmp_path)  # a drifted card is never pushed
    (folder / "README.md").write_text((folder / "README.md").read_text().replace("| auroc | ", "| auroc | 9"))
    with pytest.raises(ValueError, match="not pushed"):
        push_folder(folder, "org/model", dry_run=True)


def test_gated_access_fields(finetuned, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finetuned, run)
    cfg = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(cfg.replace("gated_prompt: null", "gated_prompt: Research use only."))
    publish_run(run, tmp_path / "out")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.extra_gated_prompt == "Research use only."
    assert "Affiliation" in card.data.extra_gated_fields


def test_a_pretraining_run_publishes_a_feature_extractor_card(pretrained, tmp_path):
    from PIL import Image

    out = tmp_path / "backbone"
    publish_run(pretrained, out)
    assert check_card(out) == []
    card = ModelCard.load(out / "README.md")
    assert card.data.pipeline_tag == "image-feature-extraction" and not card.data.eval_results
    text = card.text
    assert "not evaluated on a labelled task" in text and "Masked Autoencoders" in text
    snippet = text.split("## How to load it", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    assert "model = " not in snippet  # no classifier to load
    image = tmp_path / "tile.png"
    Image.new("RGB", (40, 40), (200, 120, 180)).save(image)
    scope: dict = {}
    exec(snippet.replace("PATH_TO_THIS_FOLDER", str(out)).replace("IMAGE.png", str(image)), scope)
    assert tuple(scope["features"].shape) == (1, scope["backbone"].num_features)
    assert (out / "mae_decoder.safetensors").is_file() and not (out / "eval.json").exists()


def test_training_data_lists_dicom_sources_modalities_sites_and_deidentification():
    from medfound.publish.card import _deid_text, training_datasets

    deid = {"method": "allow-list: only these tags are read into meta; all others are dropped",
            "patient_token": "HMAC-SHA256(salt, PatientID), first 16 hex digits", "files_deidentified": 1234}
    lineage = {"stage": "fine-tuning", "split": "train", "datasets": [
        {"name": "cxr_archive", "modality": "mixed", "site": "hospital-A", "digest": "abc",
         "counts": {"by_split": {"train": 900, "test": 334}, "by_modality": {"cr": 700, "dx": 534},
                    "by_site": {"hospital-A": 1234}},
         "source": {"files": 1234}, "deidentification": deid}]}
    (d,) = training_datasets(lineage)
    assert d["source"] == "1,234 files" and d["site"] == "hospital-A"
    assert "trained on the 900 'train' samples" in d["counts"] and "per modality cr 700, dx 534" in d["counts"]
    assert "per site hospital-A 1,234" in d["counts"]
    text = _deid_text(deid)
    assert text.startswith("allow-list") and "patient IDs replaced by HMAC" in text and "1,234 files" in text


def test_preprocessing_records_stain_normalisation_and_mpp():
    from types import SimpleNamespace

    from medfound.publish.card import preprocessing

    recipe = SimpleNamespace(data=SimpleNamespace(stain_normalize=True, window=None))
    prep = preprocessing({"patch_size": [128, 128]}, [{"modality": "pathology", "mpp": 0.5}], recipe)
    assert prep["stain_normalization"].startswith("Macenko") and prep["microns_per_pixel"] == 0.5
    assert prep["patch_size"] == [128, 128] and prep["modality"] == ["pathology"]
    recipe.data.stain_normalize = False
    assert "stain_normalization" not in preprocessing({}, [{"modality": "ct"}], recipe)


def test_card_check_fails_when_preprocessing_drifts(card_folder, tmp_path):
    folder = _copy(card_folder, tmp_path)
    prep = json.loads((folder / "preprocessing.json").read_text())
    prep["mean"] = [0.5, 0.5, 0.5]
    (folder / "preprocessing.json").write_text(json.dumps(prep))
    problems = check_card(folder)
    assert any("card preprocessing 'mean'" in p for p in problems)
    assert any("differs from config.json pretrained_cfg" in p for p in problems)


@pytest.mark.parametrize("folder", sorted(p.parent for p in (Path(__file__).parents[2] / "model_cards").glob("*/README.md")),
                         ids=lambda p: p.name)
def test_committed_model_cards_match_their_records(folder):
    """The cards in model_cards/ are published cards whose weights stay out of git: everything but the weights must
    still check out (evaluation numbers against their eval.json, preprocessing, model-index)."""
    problems = check_card(folder)
    assert problems and all("which is not in" in p for p in problems), problems
    text = (folder / "README.md").read_text()
    assert all(s in text for s in SECTIONS)


def test_card_check_catches_reversed_label_names_and_a_swapped_adapter(card_folder, tmp_path):
    folder = _copy(card_folder, tmp_path)
    config = folder / "config.json"
    cfg = json.loads(config.read_text())
    assert cfg["label_names"] == json.loads((folder / "eval.json").read_text())["class_names"]
    cfg["label_names"] = cfg["label_names"][::-1]
    config.write_text(json.dumps(cfg))
    problems = check_card(folder)
    assert any(p.startswith("config.json names the classes") for p in problems)
    assert any("config file config.json: its sha256 differs" in p for p in problems)

    folder = _copy(card_folder, tmp_path / "b")
    adapter = next((folder / "adapter").glob("*.safetensors"))
    data = bytearray(adapter.read_bytes())
    data[-1] ^= 1  # another adapter's weights under the same name
    adapter.write_bytes(bytes(data))
    (folder / "adapter" / "extra.safetensors").write_bytes(b"x")
    problems = check_card(folder)
    assert any(f"adapter file adapter/{adapter.name}: its sha256 differs" in p for p in problems)
    assert any("adapter file adapter/extra.safetensors is not described by the card" in p for p in problems)
