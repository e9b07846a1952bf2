"""Every recipe in pretrain/ and adapt/ validates, says what it does and how to run it, and runs two
steps on the bundled real data (model shrunk and paths pointed at test shards through overrides)."""

from __future__ import annotations

from pathlib import Path

import pytest

from medfound.config import FinetuneRecipe, PretrainRecipe, load_recipe

from helpers import ROOT, tiny_finetune_overrides, tiny_pretrain_overrides, tiny_segment_overrides

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

    shipped = load_recipe(path)
    # a continuation recipe names weights only (backbone.weights): its two steps start from a tiny timm ViT instead
    name = ["backbone.name=vit_tiny_patch16_224"] if shipped.backbone.name is None else []
    recipe = load_recipe(path, tiny_pretrain_overrides(shards, tmp_path / "run", steps=2,
                                                       objective=shipped.objective.name) + name)
    summary = run_pretrain(recipe)
    assert summary["step"] == 2 and Path(summary["export"], "model.safetensors").is_file()


OVERFIT_STEPS = 200  # 150 reached Dice 0.89-0.94 over trainer.seed 0-2 (per-sample augmentation seeds); 200: 0.96
CLASSIFY = [p for p in ADAPT if load_recipe(p).task == "classification"]
SEGMENT = [p for p in ADAPT if load_recipe(p).task == "segmentation"]
PROMPT = [p for p in ADAPT if load_recipe(p).task == "box_prompt"]
MIL = [p for p in ADAPT if load_recipe(p).task == "mil"]
CNN = ["backbone.weights=null", "data.img_size=32", "data.batch_size=8"]
# recipes that need other data than the RetinaMNIST shards, or keep their own CNN architecture (shrunk input)
SPECIAL = {
    "chexnet.yaml": ("findings", CNN),
    "gulshan_referable_dr.yaml": ("retina", ["backbone.weights=null", "data.img_size=75", "data.batch_size=4"]),
    "mckinney_screening.yaml": ("views", CNN + ["data.spacing_mm=12.5"]),  # the view table's stated spacing
}


def test_the_seed_systems_have_recipes():
    names = {p.name for p in ADAPT}
    assert {"chexnet.yaml", "gulshan_referable_dr.yaml", "mckinney_screening.yaml", "retfound_finetune.yaml",
            "uni_linear_probe.yaml", "uni_abmil.yaml", "medsam.yaml"} <= names


@pytest.mark.parametrize("path", CLASSIFY, ids=lambda p: p.name)
def test_adapt_recipe_runs_two_steps(path: Path, shards, findings_shards, view_shards, pretrained, tmp_path):
    import json

    from medfound.workflows import run_finetune

    data = dict(shards, findings=findings_shards, views=view_shards)
    key, extra = SPECIAL.get(path.name, ("pneumonia" if "pneumonia" in path.name else "retina", []))
    overrides = tiny_finetune_overrides(data, pretrained / "export", tmp_path / "run", 2, key) + extra
    recipe = load_recipe(path, overrides)
    summary = run_finetune(recipe)
    assert summary["step"] == 2 and summary["eval"]["auroc"] is not None
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    if recipe.eval.aggregate is not None:  # per breast: pairs of views -> half as many units
        assert report["units"]["n"] == report["dataset"]["num_samples"] // 2
    if recipe.head.binary_threshold is not None:
        assert report["class_names"] == ["below moderate", "moderate or worse"]


@pytest.mark.parametrize("path", PROMPT, ids=lambda p: p.name)
def test_prompt_recipe_runs_two_steps(path: Path, organ_shards, pretrained, tmp_path):
    """Two steps of box-prompt training on the bundled CT structures, then Dice per structure from tight boxes."""
    import json

    from medfound.workflows import run_finetune

    overrides = [f"backbone.weights={pretrained / 'export'}", "backbone.model_args={img_size: 64}",
                 f"data.shards=[{organ_shards}]", "data.img_size=64", "data.batch_size=2", "head.dim=32",
                 "head.heads=2", "head.mlp_dim=64", f"trainer.output_dir={tmp_path / 'run'}", "trainer.max_steps=2",
                 "trainer.progress=false", "trainer.loggers=[]", "trainer.log_every=1"]
    summary = run_finetune(load_recipe(path, overrides))
    assert summary["step"] == 2
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert report["dataset"]["num_samples"] == 11 and "aorta" in report["per_structure"]
    assert 0.0 <= report["metrics"]["dice"] <= 1.0


@pytest.mark.parametrize("path", MIL, ids=lambda p: p.name)
def test_mil_recipe_runs_two_steps(path: Path, bags, tmp_path):
    import json

    from medfound.workflows import run_finetune

    overrides = [f"data.shards=[{bags}]", "eval.split=train", "head.hidden_dim=32", "head.attention_dim=16",
                 "head.max_tiles=64", "data.batch_size=1", f"trainer.output_dir={tmp_path / 'run'}",
                 "trainer.max_steps=2", "trainer.progress=false", "trainer.loggers=[]", "trainer.log_every=1"]
    with pytest.warns(UserWarning, match="single class"):
        summary = run_finetune(load_recipe(path, overrides))
    assert summary["step"] == 2
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert report["task"] == "mil" and report["slides"][0]["slide"] == "CMU-1-Small-Region"
    assert (tmp_path / "run" / "heatmaps" / "CMU-1-Small-Region.png").is_file()


def test_every_segmentation_head_has_a_recipe():
    heads = {(load_recipe(p).head.type, load_recipe(p).segment.spatial_dims) for p in SEGMENT}
    assert heads >= {("unet", 2), ("attention_unet", 2), ("unet", 3), ("vnet", 3), ("transunet", 2), ("unetr", 2)}


@pytest.mark.parametrize("path", SEGMENT, ids=lambda p: p.name)
def test_segment_recipe_runs_two_steps(path: Path, seg_shards, pretrained, tmp_path):
    """Two steps on the bundled CT slices (aorta masks) or breast MRI volume, then sliding-window evaluation."""
    import json

    from medfound.workflows import run_finetune

    full = load_recipe(path)
    head = "unet3d" if full.head.type == "unet" and full.segment.spatial_dims == 3 else full.head.type
    recipe = load_recipe(path, tiny_segment_overrides(head, seg_shards, pretrained / "export", tmp_path / "run"))
    summary = run_finetune(recipe)
    assert summary["step"] == 2
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert report["task"] == "segmentation" and report["dataset"]["num_samples"] >= 1
    assert set(report["metrics"]) >= {"dice", "hd95", "pixel_f1", "pixel_auc"}
    assert report["definitions"]["dice"].startswith("per image")
    assert (tmp_path / "run" / "export" / "segmenter.safetensors").is_file()
    if full.backbone is not None:  # the adapted ViT is also a timm backbone
        import timm
        timm.create_model(f"local-dir:{tmp_path / 'run' / 'export' / 'backbone'}", pretrained=True)
    from medfound.workflows import evaluate as evaluate_run
    again = evaluate_run(tmp_path / "run")  # rebuilt from the recipe + export alone: the same numbers
    assert again["metrics"] == report["metrics"]
    assert again["intervals"]["dice"] is None or again["intervals"]["dice"][0] <= again["metrics"]["dice"] + 1e-4  # 4-decimal intervals
    assert (tmp_path / "run" / "report" / "report.md").is_file()
    assert list((tmp_path / "run" / "report").glob("overlay_internal_*.png"))
    _publish_and_run_the_card_snippet(tmp_path / "run", tmp_path / "pub")


def _publish_and_run_the_card_snippet(run: Path, out: Path) -> dict:
    """Publish a network run: the folder passes `card check`, and the card's loading snippet runs on it."""
    from medfound.publish.check import check_card
    from medfound.workflows import publish_run

    publish_run(run, out)
    assert check_card(out) == []
    text = (out / "README.md").read_text()
    snippet = text.split("## How to load it", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(snippet.replace("PATH_TO_THIS_FOLDER", str(out)), scope)
    assert (out / "export").is_dir() and (out / "config.yaml").is_file() and (out / "preprocessing.json").is_file()
    return scope


@pytest.mark.slow
def test_3d_unet_overfits_the_bundled_breast_volume(seg_shards, tmp_path):
    """Correctness of the 3-D path end to end (crops, axis order, spacing, sliding windows, Dice): a small 3-D
    U-Net must learn the one bundled lesion (143 voxels in 45x120x21) to Dice >= 0.9."""
    import json

    from medfound.workflows import run_finetune

    overrides = tiny_segment_overrides("unet3d", seg_shards, None, tmp_path / "run", steps=OVERFIT_STEPS)
    overrides += ["head.channels=[16,32,64]", "segment.patch_size=[32,64,16]", "segment.foreground_fraction=0.8",
                  "segment.intensity_jitter=0", "segment.flips=false", "optim.lr=3e-3", "trainer.log_every=50"]
    run_finetune(load_recipe(ROOT / "adapt" / "segment_unet3d.yaml", overrides))
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert report["metrics"]["dice"] >= 0.9, report["metrics"]
    assert report["per_image"][0]["hd95/tumour"] is not None  # in mm: the volume carries its spacing


def test_a_segmentation_export_that_does_not_fit_its_recipe_is_refused(seg_shards, tmp_path):
    from safetensors.torch import load_file, save_file

    from medfound.workflows import evaluate as evaluate_run
    from medfound.workflows import run_finetune

    run_finetune(load_recipe(ROOT / "adapt" / "segment_unet.yaml",
                             tiny_segment_overrides("unet", seg_shards, None, tmp_path / "run")))
    weights = tmp_path / "run" / "export" / "segmenter.safetensors"
    state = load_file(str(weights))
    state.pop(next(iter(state)))
    save_file(state, str(weights))
    with pytest.raises(RuntimeError, match="does not fit the network"):
        evaluate_run(tmp_path / "run")
