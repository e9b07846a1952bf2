"""Segmentation heads x tuning strategies: shapes (2-D and 3-D, odd sizes), gradients reach exactly the
trainable parameters, LoRA merged == unmerged, layer-wise lr decay, geometry read from the backbone."""

from __future__ import annotations

import pytest
import torch

from medfound.adapt.heads.unetr import default_indices
from medfound.adapt.tasks import SegmentationTask
from medfound.adapt.tasks import build_segmentation_task as build_task
from medfound.adapt.tuning import merged_segmenter
from medfound.config import ConfigError, FinetuneRecipe, OptimConfig
from medfound.registry import HEADS as HEAD_REGISTRY

from helpers import TINY_VIT, assert_gradients_only_where_trainable, moved_by_step

VIT = {"name": "vit_tiny_patch16_224", "model_args": {**TINY_VIT, "depth": 3}}
BASE = {"kind": "finetune", "data": {"shards": ["unused"], "batch_size": 2}, "optim": {"lr": 1e-3},
        "trainer": {"output_dir": "unused", "max_steps": 1}}
TINY = {"unetr": {"feature_size": 8}, "transunet": {"decoder_channels": [32, 16, 8]}, "unet": {"channels": [8, 16, 32]},
        "attention_unet": {"channels": [8, 16, 32]}}  # small widths; a new head runs at its defaults
TINY_3D = {"unet": {"strides": [[2, 2, 1], 2]}}  # anisotropic pooling, as `medfound plan` writes for volumes
HEADS = {  # every registered segmentation head in every dimension it allows -> (head section, dims, uses a ViT)
    e.name + ("3d" if sd == 3 and len(e.config.spatial_dims) > 1 else ""):
        ({"type": e.name, **TINY.get(e.name, {}), **(TINY_3D.get(e.name, {}) if sd == 3 else {})}, sd,
         e.config.backbone == "vit")
    for e in HEAD_REGISTRY if e.config.task == "segmentation" for sd in e.config.spatial_dims}
CASES = [(h, t) for h, (section, _, _) in HEADS.items() for t in HEAD_REGISTRY.get(section["type"]).config.tunings]
VIT_HEADS = [h for h, (_, _, vit) in HEADS.items() if vit]
ODD = {2: (37, 45), 3: (19, 30, 21)}


def recipe(name: str, tuning: str, num_classes: int = 3, **extra) -> FinetuneRecipe:
    section, sd, vit = HEADS[name]
    patch = [32, 32] if sd == 2 else [16, 32, 32]
    return FinetuneRecipe(**{**BASE, "tuning": tuning, "last_k": 1, "head": extra.pop("head", section),
                             **({"backbone": VIT} if vit else {}),
                             "segment": {"spatial_dims": sd, "patch_size": patch, "num_classes": num_classes},
                             "lora": {"r": 4, "alpha": 8}, **extra})


def task_for(head: str, tuning: str) -> SegmentationTask:
    torch.manual_seed(0)
    task = build_task(recipe(head, tuning))
    for n, p in task.named_parameters():  # peft starts B at zero, and timm's ResNet its last BN in each block
        if "lora_B" in n or (p.ndim == 1 and not p.detach().any()):  # (zero_init_last): move off those inits
            torch.nn.init.normal_(p, mean=0.0 if "lora_B" in n else 1.0, std=0.02)
    return task


def batch(sd: int, k: int = 3, size=None) -> dict:
    g = torch.Generator().manual_seed(1)
    size = size or ODD[sd]
    image = torch.randn(2, 3 if sd == 2 else 1, *size, generator=g)
    return {"image": image, "mask": torch.randint(0, k, (2, 1, *size), generator=g)}


@pytest.mark.parametrize("head,tuning", CASES, ids=[f"{h}-{t}" for h, t in CASES])
def test_shapes_and_gradients_reach_exactly_the_trainable_parameters(head, tuning):
    task = task_for(head, tuning)
    sd = HEADS[head][1]
    task.train()
    out = task(batch(sd))
    assert out["logits"].shape == (2, 3, *ODD[sd])  # odd sizes are padded inside and cropped back
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert_gradients_only_where_trainable(task, f"{head}/{tuning}")
    unused_in_3d = (".vit.patch_embed.", ".vit.pos_embed")  # replaced by the inflated 3-D embeddings
    vit = {n for n, _ in task.named_parameters() if ".encoder.vit." in n
           and not (sd == 3 and any(u in n for u in unused_in_3d))}
    trainable_vit = {n for n in vit if dict(task.named_parameters())[n].requires_grad}
    decoder = {n for n, p in task.named_parameters() if ".encoder.vit." not in n}
    assert all(dict(task.named_parameters())[n].requires_grad for n in decoder), "the decoder always trains"
    if tuning == "linear_probe":
        assert not trainable_vit
    elif tuning == "last_k":
        last = HEADS[head][2] and len(task.vit.blocks) - 1
        assert trainable_vit and all(f"blocks.{last}." in n or ".norm." in n for n in trainable_vit)
    elif tuning == "lora":
        assert trainable_vit and all("lora_" in n for n in trainable_vit)
    elif tuning == "full":
        assert trainable_vit == vit


@pytest.mark.parametrize("head", VIT_HEADS)
def test_lora_merged_equals_unmerged(head):
    task = task_for(head, "lora")
    for n, p in task.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    task.eval()
    x = batch(HEADS[head][1], size=(32, 32) if HEADS[head][1] == 2 else (16, 32, 32))["image"]
    with torch.no_grad():
        before = task.model(x)
        merged = merged_segmenter(task.model).eval()
        after = merged(x)
    assert not any("lora_" in k for k in merged.state_dict())
    assert torch.allclose(before, after, atol=1e-5), float((before - after).abs().max())
    # and the LoRA actually changed the output (the comparison is not vacuous)
    with torch.no_grad():
        base = build_task(recipe(head, "full")).model.eval()
        torch.manual_seed(0)
        plain = task_for(head, "full").model.eval()(x)
    assert not torch.allclose(plain, after, atol=1e-4)
    del base


def test_cnn_heads_refuse_backbone_tuning_strategies():
    with pytest.raises(ValueError, match="tuning=full"):
        recipe("unet", "lora")


def test_unetr_reads_geometry_from_the_backbone():
    assert default_indices(12, 4) == [2, 5, 8, 11]  # UNETR's z3, z6, z9, z12 for ViT-B/16
    assert default_indices(24, 4) == [5, 11, 17, 23]
    assert default_indices(2, 3) == [0, 1, 1] and default_indices(2, 4) == [0, 0, 1, 1]
    task = task_for("unetr", "full")
    net = task.model.net
    assert net.levels == 3 and net.indices == [0, 1, 2]  # patch 8 -> 3 levels over 3 blocks
    assert task.model.divisor == (8, 8)
    r = recipe("unetr", "full", backbone={"name": "vit_tiny_patch16_224", "model_args": {"img_size": 32, "depth": 2,
                                                                                      "embed_dim": 32, "num_heads": 2}})
    net16 = build_task(r).model.net
    assert net16.levels == 4 and net16.encoder.embed_dim == 32
    with pytest.raises(ValueError, match="head.indices"):
        build_task(recipe("unetr", "full", head={"type": "unetr", "indices": [0, 1]}))


def test_wrong_dimensionality_is_a_clear_error():
    task = task_for("unet", "full")
    with pytest.raises(ValueError, match="2-D input"):
        task.model(torch.zeros(1, 1, 8, 8, 8))


def test_layer_decay_under_full_fine_tuning():
    task = task_for("unetr", "full")
    groups = task.param_groups(OptimConfig(lr=1e-3, layer_decay=0.5))
    scales = sorted({round(g["lr_scale"], 6) for g in groups})
    assert len(scales) >= 4 and max(scales) == 1.0 and min(scales) < 0.2  # embeddings decayed most
    vit_ids = {id(p) for p in task.vit.parameters()}
    for g in groups:
        if not any(id(p) in vit_ids for p in g["params"]):
            assert g["lr_scale"] == 1.0  # decoder at the full lr
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == sum(1 for p in task.parameters() if p.requires_grad)
    plain = task_for("unetr", "lora").param_groups(OptimConfig(lr=1e-3, layer_decay=0.5))
    assert {g.get("lr_scale", 1.0) for g in plain} == {1.0}  # LoRA: no layer decay


def test_recipe_checks_are_clear():
    with pytest.raises(ValueError, match="segment section"):
        FinetuneRecipe(**{**BASE, "tuning": "full", "head": {"type": "unet"}})
    with pytest.raises(ValueError, match="spatial_dims=3"):
        FinetuneRecipe(**{**BASE, "tuning": "full", "head": {"type": "vnet"},
                          "segment": {"patch_size": [32, 32]}})
    with pytest.raises(ValueError, match="2 entries"):
        FinetuneRecipe(**{**BASE, "tuning": "full", "head": {"type": "unet"},
                          "segment": {"patch_size": [32, 32, 8]}})
    with pytest.raises(ValueError, match="backbone section"):
        FinetuneRecipe(**{**BASE, "head": {"type": "unetr"}, "segment": {"patch_size": [32, 32]}})
    from medfound.config import load_recipe
    from helpers import ROOT
    with pytest.raises(ConfigError, match="segment.patch_size"):
        load_recipe(ROOT / "adapt" / "segment_unet.yaml", ["segment.patch_siz=[64,64]"])


@pytest.mark.parametrize("head", list(HEADS))
def test_every_segmentation_head_draws_image_truth_and_prediction(head):
    """trainer.visualize_every: one row per image, three panels (image | truth | prediction), 2-D and 3-D alike."""
    _, sd, _ = HEADS[head]
    task = task_for(head, HEAD_REGISTRY.get(HEADS[head][0]["type"]).config.tunings[0]).eval()
    b = batch(sd, size=(32, 32) if sd == 2 else (16, 32, 32))
    with torch.no_grad():
        picture = task.visualize(b, task(b))
    h, w = b["image"].shape[2:4]
    k = -(-160 // w)  # enlarged (nearest) to at least 160 px a panel, under an 18-px header naming the columns
    assert picture.size == (3 * w * k, 2 * h * k + 18)
    import numpy as np
    panels = np.asarray(picture)[18::k, ::k].reshape(2, h, 3, w, 3)
    assert not (panels[:, :, 1] == panels[:, :, 0]).all()  # the truth is painted over the image
    assert (np.asarray(picture)[:18] < 128).any()  # the titles are written


def test_visualize_every_runs_for_segmentation_and_is_refused_where_nothing_draws(seg_shards, tmp_path):
    from medfound.config import load_recipe
    from medfound.workflows import run_finetune

    from helpers import ROOT, tiny_segment_overrides

    run = tmp_path / "unet"
    run_finetune(load_recipe(ROOT / "adapt" / "segment_unet.yaml", tiny_segment_overrides(
        "unet", seg_shards, None, run, steps=2) + ["trainer.visualize_every=1", "eval.bootstrap=20"]))
    assert sorted(p.name for p in (run / "logs" / "images").iterdir()) == ["step_00000001.png", "step_00000002.png"]
    for recipe, why in (("demo_classify_lora", "head.type=classify draws no training pictures"),
                        ("demo_dinov2_tiny", "objective.name=dinov2 draws no training pictures"),
                        ("uni_abmil", "head.type=abmil draws no training pictures")):
        folder = "pretrain" if "dinov2" in recipe else "adapt"
        with pytest.raises(ConfigError, match=f"trainer.visualize_every=5: {why} .*remove it from the recipe"):
            load_recipe(ROOT / folder / f"{recipe}.yaml", ["trainer.visualize_every=5"])


def test_head_warmup_holds_the_vit_while_the_decoder_learns():
    """head_warmup_steps reaches the segmentation task from the recipe: the ViT's LoRA adapters hold for the
    warm-up steps while the UNETR decoder learns, then train."""
    torch.manual_seed(0)
    task = build_task(recipe("unetr", "lora", head_warmup_steps=2, trainer={"output_dir": "unused", "max_steps": 5}))
    for n, p in task.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    assert task.head_warmup_steps == 2 and task.touches_gradients
    moved = moved_by_step(task, batch(2, size=(32, 32)), 3)
    vit = {n for n, p in task.named_parameters() if p.requires_grad and ".vit." in n}
    assert vit and not moved[0] & vit and not moved[1] & vit and moved[0]
    assert vit <= moved[2]
