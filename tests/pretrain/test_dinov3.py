"""DINOv3-family backbones (timm's `Eva`: rotary position embeddings, register tokens, SwiGLU, LayerScale) through
the objectives and heads: one token forward (`backbones.vit_tokens`) for plain ViTs and RoPE ViTs, MAE and DINOv2
pretraining, LoRA targets read from the model, and a DINOv3 export fine-tuned, published, loaded and predicted."""

from __future__ import annotations

import pytest
import timm
import torch

from medfound.backbones import vit_tokens

from helpers import ROOT

# a tiny member of each family: plain ViT, DINOv3 with SwiGLU (vit_small_plus), DINOv3 with a plain MLP, and a
# ViT with depth- and head-dependent ("mixed") RoPE
FAMILIES = ["vit_tiny_patch16_224", "vit_small_patch14_reg4_dinov2", "vit_small_plus_patch16_dinov3", "vit_small_patch16_dinov3",
            "vit_base_patch16_rope_mixed_224"]
TINY = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}
DINOV3_ARGS = "backbone.model_args={img_size: 32, patch_size: 8, depth: 2, embed_dim: 64, num_heads: 2}"


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_forward_equals_timms_and_keeps_each_token_at_its_position(name):
    """vit_tokens is timm's forward_features, exactly; MAE's visible tokens given in any order come out as the full
    forward's tokens in that order: the rotary embedding travels with its token (were the kept tokens given the
    positions of their slots, the permuted tokens would differ)."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=0, **TINY).eval()
    for n, prm in model.named_parameters():  # LayerScale starts at 1e-5: let attention (and RoPE) show
        if "gamma" in n:
            prm.data.fill_(1.0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = model.forward_features(x)
        assert torch.equal(vit_tokens(model, x), full)
        p, n = model.num_prefix_tokens, 16
        order = torch.stack([torch.randperm(n) for _ in range(2)])
        shuffled = vit_tokens(model, x, keep=order)
    assert torch.allclose(shuffled[:, :p], full[:, :p], atol=1e-5)
    assert torch.allclose(shuffled[:, p:], torch.gather(full[:, p:], 1, order[..., None].expand(-1, -1, 64)),
                          atol=1e-5)
    if getattr(model, "rope", None) is not None:  # given the positions of their slots, the tokens would differ
        mixed = bool(getattr(model, "rope_mixed", False))
        with torch.no_grad():
            tokens, rope = model._pos_embed(model.patch_embed(x))
            visible = torch.gather(tokens[:, p:], 1, order[..., None].expand(-1, -1, 64))
            y = model.norm_pre(torch.cat([tokens[:, :p], visible], dim=1))
            for i, block in enumerate(model.blocks):
                y = block(y, rope=rope[i] if mixed else rope)
        expected = torch.gather(full[:, p:], 1, order[..., None].expand(-1, -1, 64))
        assert (model.norm(y)[:, p:] - expected).abs().max() > 1e-4  # 10x the tolerance of the equalities above


def test_lora_targets_are_read_from_the_model():
    """target_modules=[auto] adapts every attention and MLP layer of the blocks, whatever the class names them
    (SwiGLU: fc1_g, fc1_x); a given list that leaves block layers out says which; nothing matched is an error."""
    from medfound.adapt.tuning import lora_targets
    from medfound.config import LoraConfig

    swiglu = timm.create_model("vit_small_plus_patch16_dinov3", num_classes=0, **TINY)
    names = lora_targets(swiglu, ["auto"])
    assert {n.split(".")[-1] for n in names} == {"qkv", "proj", "fc1_g", "fc1_x", "fc2"} and len(names) == 2 * 5
    plain = timm.create_model("vit_tiny_patch16_224", num_classes=0, **TINY)
    assert lora_targets(plain, ["auto"]) == lora_targets(plain, ["qkv", "proj", "fc1", "fc2"])  # same as before
    with pytest.warns(UserWarning, match="leaves the transformer blocks' fc1_g, fc1_x without adapters"):
        lora_targets(swiglu, ["qkv", "proj", "fc1", "fc2"])
    with pytest.raises(ValueError, match="matched no nn.Linear layer of ResNet inside transformer blocks"):
        lora_targets(timm.create_model("resnet18", num_classes=0), ["auto"])
    with pytest.raises(ValueError, match="`auto` stands alone"):
        LoraConfig(target_modules=["auto", "qkv"])


def test_dinov3_backbones_pretrain_finetune_publish_and_predict(shards, seg_shards, organ_shards, tmp_path):
    """A tiny DINOv3 (SwiGLU, 4 register tokens, RoPE) pretrained with MAE and with DINOv2+iBOT (exports reload
    exactly), its FSDP units found, then LoRA-tuned for classification from the MAE export (adapters on fc1_g and
    fc1_x too), published, loaded from the published folder and used by predict; the same export under UNETR and
    TransUNet decoders, a box-prompt head and MIL tile extraction."""
    import json

    from PIL import Image

    import medfound
    from medfound.config import load_recipe
    from medfound.publish.check import check_card
    from medfound.train.strategy import transformer_blocks
    from medfound.workflows import build_objective, publish_run, run_finetune, run_pretrain

    from helpers import tiny_finetune_overrides, tiny_pretrain_overrides

    arch = ["backbone.name=vit_small_plus_patch16_dinov3", DINOV3_ARGS]
    mae = run_pretrain(load_recipe(ROOT / "pretrain" / "demo_mae_tiny.yaml",
                                   tiny_pretrain_overrides(shards, tmp_path / "mae", steps=2) + arch))
    assert mae["reload_max_abs_diff"] == {"weights": 0.0, "features": 0.0, "output": 0.0}
    recipe = load_recipe(ROOT / "pretrain" / "demo_dinov2_tiny.yaml",
                         tiny_pretrain_overrides(shards, tmp_path / "dino", steps=2, objective="dinov2") + arch)
    dino = run_pretrain(recipe)
    assert dino["reload_max_abs_diff"] == {"weights": 0.0, "features": 0.0, "output": 0.0}
    units = [type(u).__name__ for u in transformer_blocks(build_objective(recipe))]
    assert units.count("EvaBlock") == 4  # student and teacher, two blocks each
    anchored = build_objective(load_recipe(ROOT / "pretrain" / "demo_dinov2_tiny.yaml", tiny_pretrain_overrides(
        shards, tmp_path / "gram", objective="dinov2") + arch + ["objective.gram_weight=2",
                                                                  "objective.gram_refresh_steps=10"]))
    assert [type(u).__name__ for u in transformer_blocks(anchored)].count("EvaBlock") == 6  # + the Gram teacher's
    views = {"crops": [torch.randn(2, 3, 32, 32) for _ in range(2)] + [torch.randn(2, 3, 16, 16) for _ in range(2)]}
    out = anchored(views)  # Gram anchoring on RoPE patch tokens (the register tokens are not patches)
    assert torch.isfinite(out["gram_loss"]) and out["gram_loss"] > 0

    run = tmp_path / "lora"
    summary = run_finetune(load_recipe(ROOT / "adapt" / "demo_classify_lora.yaml",
                                       tiny_finetune_overrides(shards, tmp_path / "mae" / "export", run, steps=2)))
    targets = json.loads((run / "export" / "adapter" / "adapter_config.json").read_text())["target_modules"]
    assert {t.split(".")[-1] for t in targets} == {"qkv", "proj", "fc1_g", "fc1_x", "fc2"}
    assert json.loads((run / "export" / "config.json").read_text())["architecture"] == "vit_small_plus_patch16_dinov3"
    assert 0 <= summary["eval"]["auroc"] <= 1
    publish_run(run, tmp_path / "pub")
    assert check_card(tmp_path / "pub") == []
    image = tmp_path / "fundus.png"
    Image.new("RGB", (28, 28), (120, 60, 30)).save(image)
    rows = medfound.load(tmp_path / "pub").predict([image])
    assert len(rows) == 1 and abs(sum(float(v) for k, v in rows[0].items() if k.startswith("p_")) - 1) < 1e-4

    from medfound.adapt.extract import extract_bags

    from helpers import tiny_segment_overrides

    export = tmp_path / "mae" / "export"
    for head, recipe in (("unetr", "segment_vit_unetr_lora.yaml"), ("transunet", "segment_transunet.yaml")):
        seg = run_finetune(load_recipe(ROOT / "adapt" / recipe, tiny_segment_overrides(
            head, seg_shards, export, tmp_path / head, steps=1) + ["eval.bootstrap=0"]))
        assert 0 <= seg["eval"]["dice"] <= 1, head
    box = run_finetune(load_recipe(ROOT / "adapt" / "medsam.yaml", [
        f"backbone.weights={export}", "backbone.model_args={img_size: 64}", f"data.shards=[{organ_shards}]",
        "data.img_size=64", "data.batch_size=2", "head.dim=32", "head.heads=2", "head.mlp_dim=64",
        f"trainer.output_dir={tmp_path / 'box'}", "trainer.max_steps=1", "trainer.progress=false",
        "trainer.loggers=[]", "eval.bootstrap=0"]))
    assert 0 <= box["eval"]["dice"] <= 1
    bags = extract_bags(shards["he"], export, tmp_path / "bags")
    assert bags["backbone"]["architecture"] == "vit_small_plus_patch16_dinov3" and bags["backbone"]["feature_dim"] == 64
