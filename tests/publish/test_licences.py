"""The published licence follows the data and weights a model was made from: a model of CC BY-NC-SA data is never
Apache-2.0 unless the publisher states their rights, and `card check` holds the card to that."""

from __future__ import annotations

import json
import shutil

import pytest

from medfound.cli import main
from medfound.publish.check import check_card
from medfound.publish.licences import required, terms, weaker_than

from helpers import DATA, ROOT, tiny_finetune_overrides


def test_licences_are_read_as_their_restrictions():
    assert terms("CC-BY-NC-SA-4.0") == {"nc", "sa"} and terms("cc0-1.0") == set() and terms("Apache-2.0") == set()
    assert terms("cc-by-nc-nd-4.0") == {"nc", "nd"} and terms("GPL-3.0") == {"sa"} and terms("other") == {"custom"}
    assert terms(None) is None
    assert required([("data a", "CC-BY-4.0"), ("data b", "CC0-1.0")]) == "apache-2.0"
    assert required([("data a", "CC-BY-4.0"), ("data b", None)]) == "apache-2.0"
    assert required([("data a", "CC-BY-NC-SA-4.0"), ("data b", "CC-BY-4.0")]) == "cc-by-nc-sa-4.0"
    assert required([("data a", "CC-BY-SA-4.0"), ("weights w", "cc-by-nc-4.0")]) == "cc-by-nc-sa-4.0"
    assert required([("data a", "CC-BY-SA-4.0"), ("weights w", "cc-by-nc-nd-4.0")]) == "other"
    assert required([("weights w", "dinov3-license")]) == "dinov3-license"
    found = [("data a", "CC-BY-NC-SA-4.0")]
    assert weaker_than("apache-2.0", found) == found and weaker_than("cc-by-nc-4.0", found) == found
    assert weaker_than("cc-by-nc-sa-4.0", found) == [] and weaker_than("other", found) == []


@pytest.fixture(scope="module")
def nc_run(pretrained, tmp_path_factory):
    """A tiny LoRA run on RetinaMNIST sharded with --license CC-BY-NC-SA-4.0, from the tiny pretraining export."""
    from medfound.config import load_recipe
    from medfound.workflows import run_finetune, shard

    root = tmp_path_factory.mktemp("nc")
    shard("npz", DATA / "medmnist" / "retinamnist_demo.npz", root / "shards", name="retinamnist_nc",
          modality="fundus", label_type="ordinal", license="CC-BY-NC-SA-4.0", max_count=256)
    overrides = tiny_finetune_overrides({"retina": root / "shards"}, pretrained / "export", root / "run", steps=2)
    run_finetune(load_recipe(ROOT / "adapt" / "demo_classify_lora.yaml", overrides + ["card.license=null"]))
    return root / "run"


def test_a_model_of_non_commercial_data_is_published_under_its_terms(nc_run, tmp_path, capsys):
    cfg = json.loads((nc_run / "export" / "config.json").read_text())
    assert cfg["pretrained_cfg"]["license"] == "cc-by-nc-sa-4.0"  # recorded at export already
    out = tmp_path / "model"
    assert main(["publish", str(nc_run), "--out", str(out)]) == 0
    assert "under licence cc-by-nc-sa-4.0" in capsys.readouterr().out
    text = (out / "README.md").read_text()
    assert "license: cc-by-nc-sa-4.0" in text and "data retinamnist_nc: CC-BY-NC-SA-4.0" in text
    assert json.loads((out / "config.json").read_text())["pretrained_cfg"]["license"] == "cc-by-nc-sa-4.0"
    assert check_card(out) == []
    # a hand-edited card claiming Apache-2.0 is caught
    edited = tmp_path / "edited"
    shutil.copytree(out, edited)
    (edited / "README.md").write_text(text.replace("license: cc-by-nc-sa-4.0", "license: apache-2.0", 1))
    assert any("licence apache-2.0 is less restrictive than data retinamnist_nc (CC-BY-NC-SA-4.0)" in p
               for p in check_card(edited))


def test_a_less_restrictive_licence_needs_a_stated_right(nc_run, tmp_path, capsys):
    assert main(["publish", str(nc_run), "--out", str(tmp_path / "refused"), "--license", "apache-2.0"]) == 1
    err = capsys.readouterr().err
    assert "licence apache-2.0 is less restrictive than what the model was made from: data retinamnist_nc " \
           "(CC-BY-NC-SA-4.0)" in err and "--rights-cleared" in err
    assert not (tmp_path / "refused").exists()
    statement = "written permission of the data owner, 2026-11-30"
    assert main(["publish", str(nc_run), "--out", str(tmp_path / "cleared"), "--license", "apache-2.0",
                 "--rights-cleared", statement]) == 0
    text = (tmp_path / "cleared" / "README.md").read_text()
    assert "license: apache-2.0" in text and statement in text and "on the publisher's statement" in text
    assert check_card(tmp_path / "cleared") == []


def test_imported_weights_carry_their_licence(pretrained, shards, tmp_path, capsys):
    from medfound.config import load_recipe
    from medfound.workflows import run_finetune

    assert main(["import", str(pretrained / "export" / "model.safetensors"), "--format", "timm", "--out",
                 str(tmp_path / "imported"), "--model", "vit_tiny_patch16_224", "--model-args",
                 json.dumps(json.loads((pretrained / "export" / "config.json").read_text())["model_args"]),
                 "--license", "cc-by-nc-4.0"]) == 0
    run = tmp_path / "run"
    run_finetune(load_recipe(ROOT / "adapt" / "demo_classify_lora.yaml", tiny_finetune_overrides(
        shards, tmp_path / "imported", run, steps=2) + ["card.license=null"]))
    assert main(["publish", str(run), "--out", str(tmp_path / "model")]) == 0
    text = (tmp_path / "model" / "README.md").read_text()
    assert "license: cc-by-nc-4.0" in text and "imported weights model.safetensors: cc-by-nc-4.0" in text
