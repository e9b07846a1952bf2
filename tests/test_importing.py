"""`medfound import`: checkpoints built here with the real key layouts of each format (docs/import.md) map
onto timm backbones exactly; anything unexpected is refused with a readable diff."""

from __future__ import annotations

import argparse
import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from medfound.cli import main
from medfound.importing import CheckpointError, import_checkpoint
from medfound.pretrain.mae import MAE

VIT = dict(embed_dim=64, depth=2, num_heads=2, patch_size=8, img_size=32)


def _vit(**kw):
    torch.manual_seed(0)
    return timm.create_model("vit_base_patch16_224", num_classes=0, **{**VIT, **kw})


def _equal(export_dir, reference: dict[str, torch.Tensor]) -> None:
    got = load_file(str(export_dir / "model.safetensors"))
    assert set(got) == set(reference)
    for k, v in reference.items():
        assert torch.equal(got[k], v), k


def _mae_checkpoint(finetuned: bool = False) -> tuple[dict, MAE]:
    """facebookresearch/mae and RETFound layout: encoder keys at the top, decoder_* beside them, the fixed
    decoder_pos_embed, and (RETFound) the argparse arguments pickled next to the weights."""
    mae = MAE(_vit(), decoder_dim=32, decoder_depth=2, decoder_heads=2)
    sd = {k.removeprefix("encoder."): v for k, v in mae.state_dict().items()}
    sd["decoder_pos_embed"] = torch.zeros(1, 17, 32)
    if finetuned:  # RETFound fine-tuned: DDP prefix and a classifier
        sd = {f"module.{k}": v for k, v in sd.items() if not k.startswith(("decoder", "mask_token"))}
        sd.update({"module.head.weight": torch.zeros(5, 64), "module.head.bias": torch.zeros(5),
                   "module.fc_norm.weight": torch.ones(64), "module.fc_norm.bias": torch.zeros(64)})
    ckpt = {"model": sd, "epoch": 799, "args": argparse.Namespace(model="mae_vit_large_patch16", mask_ratio=0.75)}
    return ckpt, mae


def test_retfound_checkpoint_with_decoder_and_pickled_args(tmp_path):
    ckpt, mae = _mae_checkpoint()
    torch.save(ckpt, tmp_path / "RETFound_cfp_weights.pth")
    r = import_checkpoint(tmp_path / "RETFound_cfp_weights.pth", "retfound", tmp_path / "out")
    assert r["mae_decoder"] == {"decoder_dim": 32, "decoder_depth": 2} and r["dropped"] == ["decoder_pos_embed"]
    _equal(tmp_path / "out", mae.encoder.state_dict())
    fresh = MAE(_vit(), decoder_dim=32, decoder_depth=2, decoder_heads=2)
    fresh.load_decoder(tmp_path / "out" / "mae_decoder.safetensors")
    assert all(torch.equal(fresh.decoder_state()[k], v) for k, v in mae.decoder_state().items())
    wrong = MAE(_vit(), decoder_dim=16, decoder_depth=2, decoder_heads=2)
    with pytest.raises(ValueError, match="does not fit this MAE decoder"):
        wrong.load_decoder(tmp_path / "out" / "mae_decoder.safetensors")
    model = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True)
    assert model.num_classes == 0 and model.patch_embed.patch_size == (8, 8)


def test_finetuned_checkpoint_drops_its_head(tmp_path):
    ckpt, mae = _mae_checkpoint(finetuned=True)
    torch.save(ckpt, tmp_path / "ft.pth")
    r = import_checkpoint(tmp_path / "ft.pth", "mae", tmp_path / "out")
    assert r["dropped"] == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"] and r["mae_decoder"] is None
    _equal(tmp_path / "out", mae.encoder.state_dict())


def _dinov2_state(registers: int = 0, depth: int = VIT["depth"]) -> tuple[dict, dict]:
    """facebookresearch/dinov2 hub layout: cls_token, pos_embed incl. the class position, mask_token,
    optional register_tokens, LayerScale ls1/ls2.gamma."""
    vit = _vit(init_values=1e-5, depth=depth)
    ref = vit.state_dict()
    sd = {**ref, "mask_token": torch.zeros(1, 64)}
    if registers:
        sd["register_tokens"] = torch.randn(1, registers, 64)
    return sd, ref


def test_dinov2_hub_weights_and_position_resampling(tmp_path):
    sd, ref = _dinov2_state()
    torch.save(sd, tmp_path / "dinov2_vits14_pretrain.pth")
    r = import_checkpoint(tmp_path / "dinov2_vits14_pretrain.pth", "dinov2", tmp_path / "out")
    assert r["model_args"]["init_values"] == 1e-5
    _equal(tmp_path / "out", ref)
    r = import_checkpoint(tmp_path / "dinov2_vits14_pretrain.pth", "dinov2", tmp_path / "big", img_size=48)
    big = load_file(str(tmp_path / "big" / "model.safetensors"))
    assert big["pos_embed"].shape == (1, 1 + 36, 64)  # 4x4 grid resampled to 6x6
    assert torch.equal(big["pos_embed"][:, 0], ref["pos_embed"][:, 0])  # the class position is kept


def test_dinov2_with_registers(tmp_path):
    sd, ref = _dinov2_state(registers=4)
    torch.save(sd, tmp_path / "reg.pth")
    r = import_checkpoint(tmp_path / "reg.pth", "dinov2", tmp_path / "out")
    assert r["model_args"]["reg_tokens"] == 4 and r["model_args"]["no_embed_class"] is True
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.equal(got["reg_token"], sd["register_tokens"])
    assert torch.equal(got["cls_token"], ref["cls_token"] + ref["pos_embed"][:, 0])  # timm's conversion


def test_dinov2_training_checkpoint_teacher_and_block_chunks(tmp_path):
    sd, ref = _dinov2_state(depth=4)
    chunked = {}
    assert len({k.split(".")[1] for k in sd if k.startswith("blocks.")}) >= 3  # chunk index != block index
    for k, v in sd.items():  # FSDP block chunks: blocks.<chunk>.<i>, two blocks per chunk
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            k = f"blocks.{i // 2}.{i}." + k.split(".", 2)[2]
        chunked[f"teacher.backbone.{k}"] = v
        chunked[f"student.backbone.{k}"] = v * 0
    # the teacher's DINO head, weight-normalised prototypes as DINOv2 saves them (gain 1, direction v)
    head = {"mlp.0.weight": torch.randn(8, 64), "mlp.0.bias": torch.randn(8), "mlp.2.weight": torch.randn(8, 8),
            "mlp.2.bias": torch.randn(8), "mlp.4.weight": torch.randn(4, 8), "mlp.4.bias": torch.randn(4),
            "last_layer.weight_g": torch.ones(10, 1), "last_layer.weight_v": torch.randn(10, 4)}
    chunked.update({f"teacher.dino_head.{k}": v for k, v in head.items()})
    chunked.update({f"student.dino_head.{k}": v * 0 for k, v in head.items()})
    torch.save({"model": chunked, "iteration": 1000}, tmp_path / "model_0001000.rank_0.pth")
    r = import_checkpoint(tmp_path / "model_0001000.rank_0.pth", "dinov2", tmp_path / "out")
    _equal(tmp_path / "out", ref)
    # the teacher's heads are kept for continued pretraining, in medfound's names (the gain of 1 folded away)
    heads = load_file(str(tmp_path / "out" / "dino_heads.safetensors"))
    assert set(heads) == {f"dino.{k}" for k in head if not k.endswith("weight_g")} - {"dino.last_layer.weight_v"} | \
        {"dino.last_layer.weight"}
    assert torch.equal(heads["dino.last_layer.weight"], head["last_layer.weight_v"])
    assert r["dino_heads"] == {"out_dim": 10, "bottleneck_dim": 4, "ibot_separate_head": False, "notes": []}
    from medfound.pretrain.dino import DINOv2, DINOv2Settings

    dino = DINOv2(_vit(), DINOv2Settings(out_dim=10, hidden_dim=8, bottleneck_dim=4))
    dino.load_heads(tmp_path / "out" / "dino_heads.safetensors")  # they fit a DINO objective of those sizes
    assert torch.equal(dino.teacher["dino"].mlp[4].bias, head["mlp.4.bias"])


def test_uni_and_timm_folders(tmp_path):
    vit = _vit(init_values=1e-5)
    torch.save(vit.state_dict(), tmp_path / "pytorch_model.bin")  # UNI: a plain timm state dict
    import_checkpoint(tmp_path / "pytorch_model.bin", "uni", tmp_path / "uni")
    _equal(tmp_path / "uni", vit.state_dict())
    from timm.models import save_for_hf
    save_for_hf(vit, str(tmp_path / "hf"), safe_serialization=True)
    r = import_checkpoint(tmp_path / "hf", "timm", tmp_path / "timm")
    assert r["architecture"] == "vit_base_patch16_224"
    _equal(tmp_path / "timm", vit.state_dict())


def test_unexpected_and_missing_keys_are_listed(tmp_path):
    sd = _vit().state_dict()
    sd["blocks.0.attn.q_norm.weight"] = torch.ones(32)  # a key this architecture does not have
    del sd["blocks.1.mlp.fc2.bias"]
    torch.save(sd, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError) as e:
        import_checkpoint(tmp_path / "odd.pth", "timm", tmp_path / "out")
    msg = str(e.value)
    assert "missing from the checkpoint (1): ['blocks.1.mlp.fc2.bias']" in msg
    assert "unexpected in the checkpoint (1): ['blocks.0.attn.q_norm.weight']" in msg
    assert not (tmp_path / "out").exists()


class Payload:
    pass


def test_pickled_objects_are_refused_with_the_fix(tmp_path, capsys):
    torch.save({"model": _vit().state_dict(), "trainer": Payload()}, tmp_path / "unsafe.pth")
    with pytest.raises(CheckpointError, match="cannot be loaded safely .*save just its state dict"):
        import_checkpoint(tmp_path / "unsafe.pth", "mae", tmp_path / "out")
    torch.save({"weights": {"a": 1}}, tmp_path / "odd.pth")
    assert main(["import", str(tmp_path / "odd.pth"), "--format", "mae", "--out", str(tmp_path / "o")]) == 1
    assert "cannot find the weights" in capsys.readouterr().err


def test_cli_and_continued_pretraining_from_an_import(tmp_path, shards, capsys):
    ckpt, mae = _mae_checkpoint()
    torch.save(ckpt, tmp_path / "mae.pth")
    assert main(["import", str(tmp_path / "mae.pth"), "--format", "mae", "--license", "cc-by-nc-4.0",
                 "--out", str(tmp_path / "imp")]) == 0
    assert "MAE decoder kept" in capsys.readouterr().out
    card_lineage = json.loads((tmp_path / "imp" / "config.json").read_text())["medfound"]
    assert card_lineage["stage"] == "import" and card_lineage["source"]["file"] == "mae.pth"

    from helpers import ROOT, tiny_pretrain_overrides
    from medfound.config import load_recipe
    from medfound.workflows import build_objective, run_pretrain
    over = tiny_pretrain_overrides(shards, tmp_path / "run", steps=2)
    over = [o for o in over if not o.startswith(("backbone.", "objective."))] + [
        f"backbone.weights={tmp_path / 'imp'}", "backbone.name=null", "backbone.model_args={}", "objective.decoder_dim=32",
        "objective.decoder_depth=2", "objective.decoder_heads=2"]
    recipe = load_recipe(ROOT / "pretrain" / "demo_mae_tiny.yaml", over)
    continued = build_objective(recipe)
    assert all(torch.equal(continued.decoder_state()[k], v) for k, v in mae.decoder_state().items())
    assert run_pretrain(recipe)["step"] == 2
    assert json.loads((tmp_path / "run" / "export" / "config.json").read_text())["medfound"]["parent"]["stage"] == "import"
    # the card names the starting weights (file, sha256, licence) and carries their non-commercial terms
    from medfound.publish.check import check_card
    from medfound.workflows import publish_run

    with pytest.raises(ValueError, match="less restrictive than what the model was made from: imported weights"):
        publish_run(tmp_path / "run", tmp_path / "pub")  # the recipe's cc-by-4.0 would drop the NC terms
    publish_run(tmp_path / "run", tmp_path / "pub", license="cc-by-nc-4.0")
    card = (tmp_path / "pub" / "README.md").read_text()
    sha = card_lineage["source"]["sha256"]
    assert f"`mae.pth` (sha256 `{sha}`), licence `cc-by-nc-4.0`" in card and check_card(tmp_path / "pub") == []


def _hf_dinov3(gated: bool):
    """A tiny transformers DINOv3ViTModel (the library's own RoPE, register tokens, LayerScale; SwiGLU when gated)
    with non-trivial biases and layer scales, so a wrong mapping shows."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.DINOv3ViTConfig(patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=96 if gated else 128, use_gated_mlp=gated,
                                       hidden_act="silu" if gated else "gelu", num_register_tokens=4, image_size=32)
    model = transformers.DINOv3ViTModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name or "lambda" in name:
                p.normal_(0, 0.2)
    return model


def _meta_layout(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same weights under the key names of Meta's DINOv3 checkpoints (dinov3_vit*_pretrain_*.pth): the key
    bias inside a fused qkv bias with its mask, `storage_tokens`, `ls1/ls2.gamma`, SwiGLU `w1/w2/w3`, the RoPE
    periods buffer."""
    sd = {k.removeprefix("model."): v for k, v in hf_state.items()}
    out = {"cls_token": sd["embeddings.cls_token"], "storage_tokens": sd["embeddings.register_tokens"],
           "mask_token": sd["embeddings.mask_token"][0], "rope_embed.periods": torch.ones(8),
           "patch_embed.proj.weight": sd["embeddings.patch_embeddings.weight"],
           "patch_embed.proj.bias": sd["embeddings.patch_embeddings.bias"],
           "norm.weight": sd["norm.weight"], "norm.bias": sd["norm.bias"]}
    gated = any("gate_proj" in k for k in sd)
    for i in range(2):
        a, b = f"layer.{i}.", f"blocks.{i}."
        q, k, v = (sd[f"{a}attention.{x}_proj.weight"] for x in "qkv")
        out[b + "attn.qkv.weight"] = torch.cat([q, k, v])
        qb, vb = sd[f"{a}attention.q_proj.bias"], sd[f"{a}attention.v_proj.bias"]
        out[b + "attn.qkv.bias"] = torch.cat([qb, torch.zeros_like(qb), vb])
        out[b + "attn.qkv.bias_mask"] = torch.cat([torch.ones_like(qb), torch.zeros_like(qb), torch.ones_like(vb)])
        for x in ("weight", "bias"):
            out[f"{b}attn.proj.{x}"] = sd[f"{a}attention.o_proj.{x}"]
            out[f"{b}norm1.{x}"], out[f"{b}norm2.{x}"] = sd[f"{a}norm1.{x}"], sd[f"{a}norm2.{x}"]
            if gated:
                out[f"{b}mlp.w1.{x}"], out[f"{b}mlp.w2.{x}"] = sd[f"{a}mlp.gate_proj.{x}"], sd[f"{a}mlp.up_proj.{x}"]
                out[f"{b}mlp.w3.{x}"] = sd[f"{a}mlp.down_proj.{x}"]
            else:
                out[f"{b}mlp.fc1.{x}"], out[f"{b}mlp.fc2.{x}"] = sd[f"{a}mlp.up_proj.{x}"], sd[f"{a}mlp.down_proj.{x}"]
        out[b + "ls1.gamma"], out[b + "ls2.gamma"] = sd[a + "layer_scale1.lambda1"], sd[a + "layer_scale2.lambda1"]
    return out


@pytest.mark.parametrize("gated", [False, True])
def test_dinov3_from_transformers_and_metas_layout_computes_the_sources_features(tmp_path, gated):
    """`--format dinov3` maps a transformers DINOv3ViTModel folder and Meta's checkpoint layout onto timm's
    vit_*_dinov3 (Eva): strict keys, and the exported backbone's tokens equal transformers' own forward on the same
    image (max abs diff <= 1e-5); the buffers that are not weights are dropped and listed."""
    hf = _hf_dinov3(gated)
    hf.save_pretrained(tmp_path / "hf")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = hf(pixel_values=x).last_hidden_state
    torch.save({"model": _meta_layout(hf.state_dict())}, tmp_path / "dinov3_meta.pth")
    # Meta's checkpoints do not state the heads: read from the width for the released sizes, else --model-args
    for name, source, args in (("from_hf", tmp_path / "hf", None),
                               ("from_meta", tmp_path / "dinov3_meta.pth", {"num_heads": 2})):
        r = import_checkpoint(source, "dinov3", tmp_path / name, img_size=32, model_args=args)
        assert r["architecture"] == ("vit_small_plus_patch16_dinov3_qkvb" if gated else
                                     "vit_small_patch16_dinov3_qkvb"), r
        assert r["model_args"]["num_reg_tokens"] == 4 and r["reload_max_abs_diff"]["features"] == 0.0
        backbone = timm.create_model(f"local-dir:{tmp_path / name}", pretrained=True, num_classes=0).eval()
        with torch.no_grad():
            got = backbone.forward_features(x)
        assert (got - want).abs().max() <= 1e-5, name
        assert "mask_token" in " ".join(r["dropped"])
    assert {"rope_embed.periods", "blocks.0.attn.qkv.bias_mask"} <= set(r["dropped"])
    # a gated MLP that is not SiLU is not timm's SwiGLU: refused, not silently wrong
    if gated:
        cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
        (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu"}))
        with pytest.raises(CheckpointError, match="hidden_act='gelu'"):
            import_checkpoint(tmp_path / "hf", "dinov3", tmp_path / "gelu")


def _legacy_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 4.x names of the same weights (most Hub checkpoints were saved with them)."""
    out = {}
    for k, v in sd.items():
        k = k.replace("encoder.layers.", "encoder.layer.").replace(".attention.q_proj", ".attention.attention.query")
        k = k.replace(".attention.k_proj", ".attention.attention.key").replace(".attention.v_proj",
                                                                              ".attention.attention.value")
        out[k.replace(".attention.o_proj", ".attention.output.dense")] = v
    return out


@pytest.mark.parametrize("registers", [0, 4])
def test_transformers_dinov2_imports_and_computes_the_libraries_features(tmp_path, registers):
    """A transformers Dinov2Model folder (save_pretrained; with and without registers), and the same weights under
    transformers 4.x key names, import as a timm ViT whose tokens equal transformers' own forward within 1e-5."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    cfg = transformers.Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                                    patch_size=8, image_size=32, num_register_tokens=registers, layerscale_value=0.5)
    hf = transformers.Dinov2Model(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    save_file({k: v.contiguous() for k, v in _legacy_names(hf.state_dict()).items()}, str(tmp_path / "legacy.safetensors"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = hf(pixel_values=x).last_hidden_state
    # a lone file does not state the heads: --model-args, as for any width outside the released sizes
    for name, source, args in (("from_hf", tmp_path / "hf", None),
                               ("from_legacy", tmp_path / "legacy.safetensors", {"num_heads": 2})):
        r = import_checkpoint(source, "dinov2", tmp_path / name, model_args=args)
        assert r["dropped"] == ["embeddings.mask_token"] and r["model_args"]["img_size"] == 32
        backbone = timm.create_model(f"local-dir:{tmp_path / name}", pretrained=True, num_classes=0).eval()
        with torch.no_grad():
            got = backbone.forward_features(x)
        assert got.shape == want.shape and (got - want).abs().max() <= 1e-5, name


def test_transformers_vit_mae_imports_with_its_decoder(tmp_path):
    """A transformers ViTMAEForPreTraining folder: the encoder's tokens (all patches, in order) equal transformers'
    ViTMAEModel within 1e-5, and the decoder is kept in medfound's names, loadable by an MAE of its size."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ViTMAEConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                                    patch_size=8, image_size=32, decoder_hidden_size=32, decoder_num_hidden_layers=1,
                                    decoder_num_attention_heads=2, decoder_intermediate_size=128, mask_ratio=0.0,
                                    layer_norm_eps=1e-6)  # timm's ViT eps (the default 1e-12 is noted at import)
    hf = transformers.ViTMAEForPreTraining(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # mask ratio 0 and an increasing noise: every patch, in its own order
        want = hf.vit(pixel_values=x, noise=torch.arange(16.0).expand(2, 16)).last_hidden_state
    r = import_checkpoint(tmp_path / "hf", "mae", tmp_path / "out")
    assert r["mae_decoder"] == {"decoder_dim": 32, "decoder_depth": 1} and r["notes"] == []
    backbone = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True, num_classes=0).eval()
    with torch.no_grad():
        got = backbone.forward_features(x)
    assert (got - want).abs().max() <= 1e-5
    mae = MAE(backbone, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    mae.load_decoder(tmp_path / "out" / "mae_decoder.safetensors")  # strict: every key and shape
    assert torch.equal(mae.decoder_pred.weight, hf.decoder.decoder_pred.weight)
    cfg_json = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg_json, "layer_norm_eps": 1e-12}))
    r = import_checkpoint(tmp_path / "hf", "mae", tmp_path / "eps")
    assert "LayerNorm eps is 1e-12, timm's ViT uses 1e-6" in r["notes"][0]


@pytest.mark.parametrize("arch", ["vit_small_patch14_reg4_dinov2", "vit_small_plus_patch16_dinov3"])
def test_timm_dinov2_and_dinov3_state_dicts_and_folders_import_exactly(tmp_path, arch):
    """timm's own DINOv2 (registers) and DINOv3 (Eva: RoPE, SwiGLU) weights, as a state dict with --model and as a
    save_for_hf folder: the imported backbone computes the source model's tokens exactly."""
    from timm.models import save_for_hf

    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2)
    source = timm.create_model(arch, num_classes=0, **args).eval()
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    save_for_hf(source, str(tmp_path / "folder"), safe_serialization=True)
    x = torch.randn(2, 3, 32, 32)
    for name, path, kw in (("file", tmp_path / "weights.pth", dict(model=arch, model_args=args)),
                           ("dir", tmp_path / "folder", {})):
        import_checkpoint(path, "timm", tmp_path / name, **kw)
        backbone = timm.create_model(f"local-dir:{tmp_path / name}", pretrained=True, num_classes=0).eval()
        with torch.no_grad():
            assert torch.equal(backbone.forward_features(x), source.forward_features(x)), name
