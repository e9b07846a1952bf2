"""`medfound import SOURCE --format retfound|mae|uni|dinov2|dinov3|timm --out DIR`: existing weights -> a timm export.

Steps, each loud (docs/import.md lists the key layouts of every format):
1. Load without running code: safetensors, or `torch.load(weights_only=True)`. RETFound's checkpoints
   pickle their argparse arguments, so `argparse.Namespace` (a plain attribute bag) is the one class
   allowed; anything else is refused with the fix.
2. Unwrap containers (`model`, `state_dict`, `teacher`, `model_ema`) and strip wrapper prefixes (`module.`,
   `_orig_mod.`, `backbone.`, `encoder.`); from DINOv2 training checkpoints take `teacher.backbone.*` and
   flatten FSDP block chunks (`blocks.<chunk>.<i>.` -> `blocks.<i>.`).
3. Set aside what is not the backbone: the MAE decoder (kept in `mae_decoder.safetensors`, so MAE
   pretraining can continue from it), classifier heads of fine-tuned checkpoints and DINO/iBOT heads
   (dropped, and listed).
4. Build the timm ViT the weights describe (width, depth, patch size, image size, LayerScale, register
   tokens, qkv bias are read from the tensors; heads from the width; `--model`/`--model-args` override), run
   timm's own ViT checkpoint filter (DINOv2 conversion, position-embedding resampling to `--img-size`), then
   compare key sets and shapes: any missing, unexpected or mis-shaped key is an error listing them.
5. Export with timm's `save_for_hf` and verify the reload, like every other export.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any, Optional

import torch

from medfound.io import check_replaceable, sha256_file
from medfound.registry import IMPORT_FORMATS
from medfound.publish.export import export_model

FORMATS = tuple(IMPORT_FORMATS.names())  # registered in medfound/registry.py (torch-free, for the CLI)
CONTAINERS = ("model", "state_dict", "teacher", "model_ema", "module")
PREFIXES = ("module.", "_orig_mod.", "backbone.", "encoder.")
MAE_DECODER = ("decoder_embed.", "mask_token", "decoder_blocks.", "decoder_norm.", "decoder_pred.")
HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16, 1536: 24}
ARCH_BY_WIDTH = {192: "vit_tiny_patch16_224", 384: "vit_small_patch16_224", 768: "vit_base_patch16_224",
                 1024: "vit_large_patch16_224", 1280: "vit_huge_patch14_224"}


class CheckpointError(ValueError):
    """The checkpoint does not map onto a timm backbone; the message lists what differs."""


def load_weights(source: Path) -> dict[str, Any]:
    """The raw object stored at `source` (a file, or a timm/HF folder), loaded without executing code."""
    source = Path(source)
    if source.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
            if (source / name).is_file():
                return load_weights(source / name)
        raise FileNotFoundError(f"{source} has no model.safetensors or pytorch_model.bin")
    if not source.is_file():
        raise FileNotFoundError(f"checkpoint {source} not found")
    if source.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(source))
        except Exception as e:  # a bad header, a truncated file
            raise CheckpointError(f"{source} is not a readable safetensors file ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200]}): corrupt or truncated; download or export it "
                                  "again") from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError names the class the file wanted to create
        raise CheckpointError(f"{source} cannot be loaded safely (weights_only=True): {str(e).splitlines()[0]}. "
                           "It pickles objects other than tensors; load it yourself in a trusted session and "
                           "save just its state dict (torch.save(ckpt['model'], 'weights.pth')), then import that") from e


def unwrap(obj: Any, source: Path) -> dict[str, torch.Tensor]:
    """Find the state dict inside common checkpoint containers."""
    if isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values()):
        return obj
    if isinstance(obj, dict):
        for key in CONTAINERS:
            if isinstance(obj.get(key), dict):
                return unwrap(obj[key], source)
    keys = sorted(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
    raise CheckpointError(f"cannot find the weights in {source}: top level holds {keys}; expected a state dict, or one "
                       f"under {', '.join(CONTAINERS)}")


def dino_heads(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The teacher's DINO (and separate iBOT) heads of a DINOv2 training checkpoint in medfound's names (`dino.*`,
    `ibot.*`; the prototype layer's weight-normalised `weight_v` / `parametrizations.weight.original1` as
    `last_layer.weight`, whose rows medfound normalises itself), and notes on what could not be kept exactly."""
    heads, notes = {}, []
    for k, v in sd.items():
        for theirs, ours in (("teacher.dino_head.", "dino."), ("teacher.ibot_head.", "ibot.")):
            if not k.startswith(theirs):
                continue
            name = ours + k[len(theirs):]
            name = name.replace("last_layer.weight_v", "last_layer.weight").replace(
                "last_layer.parametrizations.weight.original1", "last_layer.weight")
            if name.endswith(("last_layer.weight_g", "last_layer.parametrizations.weight.original0")):
                if float((v - 1).abs().max()) > 1e-3:
                    notes.append(f"{k}: the prototype gains are not 1 (max |g - 1| {float((v - 1).abs().max()):.3g}); "
                                 "medfound's prototypes are unit rows, so the imported head scores differ by them")
                continue
            heads[name] = v
    return heads, notes


def normalise(sd: dict[str, torch.Tensor], fmt: str) -> tuple[dict, dict, list[str]]:
    """(backbone weights, MAE decoder weights, dropped key names) with wrappers and prefixes removed."""
    if any(k.startswith("teacher.backbone.") for k in sd):  # DINOv2 training checkpoint: the teacher is the model
        sd = {k[len("teacher.backbone."):]: v for k, v in sd.items() if k.startswith("teacher.backbone.")}
    changed = True
    while changed:
        changed = False
        for p in PREFIXES:
            if sd and all(k.startswith(p) for k in sd):
                sd = {k[len(p):]: v for k, v in sd.items()}
                changed = True
    sd = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in sd.items()}  # FSDP block chunks
    backbone, decoder, dropped = {}, {}, []
    for k, v in sd.items():
        if fmt in ("mae", "retfound") and k.startswith(MAE_DECODER):
            decoder[k] = v
        elif k == "decoder_pos_embed":
            dropped.append(k)  # fixed sin-cos in medfound's decoder
        elif k.startswith(("head.", "fc_norm.", "dino_head.", "ibot_head.", "head_drop.")):
            dropped.append(k)
        else:
            backbone[k] = v
    return backbone, decoder, sorted(dropped)


def infer_vit(sd: dict[str, torch.Tensor]) -> tuple[str, dict[str, Any]]:
    """timm architecture and arguments from the tensors themselves."""
    if "patch_embed.proj.weight" not in sd or not any(k.startswith("blocks.") for k in sd):
        raise CheckpointError("these weights are not a ViT (no patch_embed.proj.weight / blocks.*); pass --model and "
                           "--model-args for another timm architecture")
    if any(".mlp.w12." in k for k in sd):
        raise CheckpointError("SwiGLU ViTs (DINOv2 ViT-g) are not supported yet; import a ViT-S/B/L checkpoint")
    pe = sd["patch_embed.proj.weight"]
    width, patch = pe.shape[0], pe.shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    args: dict[str, Any] = {"embed_dim": width, "depth": depth, "patch_size": patch,
                            "num_heads": HEADS_BY_WIDTH.get(width, max(1, width // 64)),
                            "mlp_ratio": sd["blocks.0.mlp.fc1.weight"].shape[0] / width,
                            "qkv_bias": "blocks.0.attn.qkv.bias" in sd, "class_token": "cls_token" in sd}
    if any(".ls1.gamma" in k for k in sd):
        args["init_values"] = 1e-5  # LayerScale present (its values are loaded)
    prefix = 1 if "cls_token" in sd else 0
    if "register_tokens" in sd:  # DINOv2 with registers -> timm's no_embed_class layout
        args.update(reg_tokens=sd["register_tokens"].shape[1], no_embed_class=True)
    elif "reg_token" in sd:
        args["reg_tokens"] = sd["reg_token"].shape[1]
    if "pos_embed" in sd:
        n = sd["pos_embed"].shape[1]
        if prefix and math.isqrt(n - 1) ** 2 == n - 1:
            side = math.isqrt(n - 1)        # position embeddings include the class token (MAE, DINOv2, UNI)
        elif math.isqrt(n) ** 2 == n:
            side = math.isqrt(n)            # patch positions only
            args["no_embed_class"] = True
        else:
            raise CheckpointError(f"pos_embed has {n} positions, not a square grid (+1): pass --model-args")
        args["img_size"] = side * patch
    return ARCH_BY_WIDTH.get(width, "vit_base_patch16_224"), args


def transformers_to_timm(sd: dict[str, torch.Tensor]) -> tuple[dict, dict, list[str]]:
    """A transformers ViT (`Dinov2Model`, `ViTMAEForPreTraining`, `ViTModel`; `save_pretrained`) in timm's
    VisionTransformer names, and an MAE decoder in medfound's, both namings transformers has used (docs/import.md):
    `embeddings.{cls_token,register_tokens,position_embeddings,patch_embeddings.projection}`, blocks under
    `encoder.layer.N` / `layers.N` (decoder: `decoder_layers.N` / `decoder_encoder.layer.N`) with `attention.{q,k,v,o}_proj` or `attention.attention.{query,key,value}` +
    `attention.output.dense`, `norm1/2` or `layernorm_before/after`, `mlp.fc1/fc2` or `intermediate.dense` +
    `output.dense`, `layer_scale1/2.lambda1`, final `layernorm`; ViTMAE's `decoder.*` likewise. Returns (backbone,
    decoder, dropped keys)."""
    import re

    def block(k: str) -> str:
        k = (k.replace("attention.attention.query", "attention.q_proj").replace("attention.attention.key", "attention.k_proj")
             .replace("attention.attention.value", "attention.v_proj").replace("attention.output.dense", "attention.o_proj")
             .replace("intermediate.dense", "mlp.fc1").replace("output.dense", "mlp.fc2")
             .replace("layernorm_before", "norm1").replace("layernorm_after", "norm2")
             .replace("layer_scale1.lambda1", "ls1.gamma").replace("layer_scale2.lambda1", "ls2.gamma")
             .replace("attention.o_proj", "attn.proj"))
        return k

    def fuse(tree: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in tree.items():
            hit = re.match(r"(.*)\.attention\.([qkv])_proj\.(weight|bias)$", k)
            if not hit:
                out[k] = v
                continue
            name = f"{hit[1]}.attn.qkv.{hit[3]}"
            if name not in out:
                out[name] = torch.cat([tree[f"{hit[1]}.attention.{x}_proj.{hit[3]}"] for x in "qkv"])
        return out

    backbone, decoder, dropped = {}, {}, []
    for k, v in sd.items():
        k = re.sub(r"^(vit|dinov2|model)\.", "", k)
        if k.startswith("decoder."):
            k = k[len("decoder."):]
            if k == "decoder_pos_embed":
                dropped.append(k)  # fixed sin-cos in medfound's decoder
                continue
            decoder[block(re.sub(r"^(decoder_layers|decoder_encoder\.layer)\.(\d+)\.", r"decoder_blocks.\2.", k))] = v
            continue
        if k in ("embeddings.mask_token", "pooler.dense.weight", "pooler.dense.bias") or k.startswith("classifier."):
            dropped.append(k)
            continue
        k = (k.replace("embeddings.cls_token", "cls_token")
             .replace("embeddings.register_tokens", "register_tokens")  # DINOv2's own name: timm's filter converts it
             .replace("embeddings.position_embeddings", "pos_embed")
             .replace("embeddings.patch_embeddings.projection.", "patch_embed.proj."))
        k = re.sub(r"^(encoder\.layer|encoder\.layers|layers|layer)\.(\d+)\.", r"blocks.\2.", k)
        k = re.sub(r"^layernorm\.", "norm.", block(k))
        backbone[k] = v
    return fuse(backbone), fuse(decoder), dropped


def transformers_config(source: Path) -> dict[str, Any]:
    """A transformers folder's config.json ({} for a file, or a folder without one)."""
    cfg = Path(source) / "config.json" if Path(source).is_dir() else None
    return json.loads(cfg.read_text()) if cfg is not None and cfg.is_file() else {}


def transformers_heads(source: Path) -> Optional[int]:
    """The attention heads a transformers folder's config.json states (the tensors cannot say)."""
    heads = transformers_config(source).get("num_attention_heads")
    return int(heads) if heads else None


def is_transformers_layout(sd: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith(("embeddings.patch_embeddings.", "vit.embeddings.", "dinov2.embeddings.")) for k in sd)


DINOV3_ARCH = {(384, False): "vit_small_patch16_dinov3", (384, True): "vit_small_plus_patch16_dinov3",
               (768, False): "vit_base_patch16_dinov3", (1024, False): "vit_large_patch16_dinov3",
               (1280, True): "vit_huge_plus_patch16_dinov3", (4096, True): "vit_7b_patch16_dinov3"}
DINOV3_HEADS = {384: 6, 768: 12, 1024: 16, 1280: 20, 4096: 32}


def dinov3_to_timm(sd: dict[str, torch.Tensor], source: Path) -> tuple[dict, list[str], str, dict[str, Any]]:
    """A DINOv3 backbone in timm's `Eva` names (`vit_*_dinov3`), from either layout (docs/import.md lists both):
    - Meta's checkpoints (facebookresearch/dinov3): `storage_tokens` -> `reg_token`, `blocks.N.ls1/ls2.gamma` ->
      `gamma_1/gamma_2`, `attn.qkv.bias` -> `attn.q_bias` + `attn.v_bias` (the key bias is masked to zero there),
      SwiGLU `mlp.w1/w2/w3` -> `mlp.fc1_g/fc1_x/fc2`; `rope_embed.periods`, `qkv.bias_mask`, `mask_token`,
      `local_cls_norm` are not weights of the backbone (dropped, listed);
    - a transformers `DINOv3ViTModel` folder (`save_pretrained`): `embeddings.*`, `layer.N.attention.{q,k,v}_proj`
      (fused into `attn.qkv`), `o_proj`, `layer_scale1/2.lambda1`, `mlp.{gate,up,down}_proj`; its config.json gives
      the heads and the RoPE base, and a gated MLP must be SiLU (SwiGLU) as in timm.
    Returns (weights, dropped keys, timm architecture, model_args read from the tensors)."""
    import re

    hf = {}
    if source.is_dir() and (source / "config.json").is_file():
        hf = json.loads((source / "config.json").read_text())
    dropped: list[str] = []
    out: dict[str, torch.Tensor] = {}
    if any(k.startswith("embeddings.") for k in sd):  # transformers' layout
        if hf.get("use_gated_mlp") and hf.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{source}: a gated MLP with hidden_act={hf.get('hidden_act')!r}; timm's DINOv3 "
                                  "SwiGLU is SiLU-gated, so these weights would compute something else")
        qkv: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in sd.items():
            k = re.sub(r"^model\.", "", k)
            if k == "embeddings.mask_token":
                dropped.append(k)
                continue
            k = (k.replace("embeddings.cls_token", "cls_token").replace("embeddings.register_tokens", "reg_token")
                 .replace("embeddings.patch_embeddings.", "patch_embed.proj."))
            k = re.sub(r"^layer\.(\d+)\.", r"blocks.\1.", k)
            hit = re.match(r"blocks\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)$", k)
            if hit:
                qkv.setdefault(int(hit[1]), {})[hit[2] + hit[3][0]] = v
                continue
            k = (k.replace("layer_scale1.lambda1", "gamma_1").replace("layer_scale2.lambda1", "gamma_2")
                 .replace("attention.o_proj", "attn.proj").replace("mlp.gate_proj", "mlp.fc1_g")
                 .replace("mlp.down_proj", "mlp.fc2"))
            out[k] = v
        gated = any(".mlp.fc1_g." in k for k in out)
        for k in [k for k in out if ".mlp.up_proj." in k]:
            out[k.replace("up_proj", "fc1_x" if gated else "fc1")] = out.pop(k)
        for i, t in qkv.items():
            out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([t["qw"], t["kw"], t["vw"]])
            if "qb" in t:
                out[f"blocks.{i}.attn.q_bias"] = t["qb"]
                out[f"blocks.{i}.attn.v_bias"] = t.get("vb", torch.zeros_like(t["qb"]))
    else:  # Meta's layout
        for k, v in sd.items():
            if k.endswith((".periods", ".bias_mask")) or k == "mask_token" or k.startswith(("local_cls_norm",
                                                                                             "rope_embed.")):
                dropped.append(k)
                continue
            if k.endswith("attn.qkv.bias"):
                q, _, vb = v.chunk(3)
                out[k.replace("qkv.bias", "q_bias")], out[k.replace("qkv.bias", "v_bias")] = q, vb
                continue
            k = (k.replace("storage_tokens", "reg_token").replace("ls1.gamma", "gamma_1")
                 .replace("ls2.gamma", "gamma_2").replace("mlp.w1.", "mlp.fc1_g.").replace("mlp.w2.", "mlp.fc1_x.")
                 .replace("mlp.w3.", "mlp.fc2."))
            out[k] = v
    if "patch_embed.proj.weight" not in out or not any(k.startswith("blocks.") for k in out):
        raise CheckpointError(f"{source} is not a DINOv3 ViT (no patch embedding / blocks after mapping its keys); "
                              "check --format")
    pe = out["patch_embed.proj.weight"]
    width, patch = int(pe.shape[0]), int(pe.shape[-1])
    gated = any(".mlp.fc1_g." in k for k in out)
    hidden = out["blocks.0.mlp.fc1_g.weight" if gated else "blocks.0.mlp.fc1.weight"].shape[0]
    arch = DINOV3_ARCH.get((width, gated), "vit_small_plus_patch16_dinov3" if gated else "vit_small_patch16_dinov3")
    if "blocks.0.attn.q_bias" in out and arch + "_qkvb" in timm_models():
        arch += "_qkvb"
    args: dict[str, Any] = {"embed_dim": width, "patch_size": patch,
                            "depth": 1 + max(int(k.split(".")[1]) for k in out if k.startswith("blocks.")),
                            "num_heads": int(hf.get("num_attention_heads") or DINOV3_HEADS.get(width, max(1, width // 64))),
                            "mlp_ratio": hidden / width,
                            "num_reg_tokens": int(out["reg_token"].shape[1]) if "reg_token" in out else 0}
    if hf.get("rope_theta"):
        args["rope_temperature"] = float(hf["rope_theta"])
    return out, dropped, arch, args


def timm_models() -> set[str]:
    import timm

    return set(timm.list_models())


def import_checkpoint(source: str | Path, fmt: str, out: str | Path, *, model: Optional[str] = None,
                      model_args: Optional[dict[str, Any]] = None, img_size: Optional[int] = None,
                      license: str = "other", mean: tuple = (0.485, 0.456, 0.406), std: tuple = (0.229, 0.224, 0.225),
                      overwrite: bool = False) -> dict[str, Any]:
    """Map `source` into a timm backbone exported at `out`; return a summary (architecture, dropped keys...)."""
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    if fmt not in FORMATS:
        raise CheckpointError(f"unknown format {fmt!r}: choose {', '.join(FORMATS)}")
    source, out = Path(source), Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")
    if overwrite:
        check_replaceable(out, "model")
    if fmt == "timm" and source.is_dir() and (source / "config.json").is_file():
        cfg = json.loads((source / "config.json").read_text())
        model = model or cfg["architecture"]
        model_args = {**{k: v for k, v in cfg.get("model_args", {}).items() if k != "num_classes"}, **(model_args or {})}
        pc = cfg.get("pretrained_cfg", {})
        mean, std = tuple(pc.get("mean", mean)), tuple(pc.get("std", std))
    raw = unwrap(load_weights(source), source)
    heads, head_notes = dino_heads(raw) if fmt in ("dinov2", "dinov3") else ({}, [])
    if fmt != "dinov3" and is_transformers_layout(raw):  # a transformers folder (Dinov2Model, ViTMAEForPreTraining)
        backbone, decoder, dropped = transformers_to_timm(raw)
        if fmt not in ("mae", "retfound"):
            dropped, decoder = dropped + sorted(decoder), {}
    else:
        backbone, decoder, dropped = normalise(raw, fmt)
    converted = fmt == "dinov3"
    if converted:  # Meta's or transformers' names -> timm's Eva, and the architecture they describe
        backbone, more, inferred_model, inferred = dinov3_to_timm(backbone, source)
        dropped = sorted(dropped + more)
        model = model or inferred_model
        model_args = {**inferred, **(model_args or {})}
    if model is None:
        model, inferred = infer_vit(backbone)
        stated = transformers_heads(source) if is_transformers_layout(raw) else None
        model_args = {**inferred, **({"num_heads": stated} if stated else {}), **(model_args or {})}
    model_args = dict(model_args or {})
    if img_size is not None:
        model_args["img_size"] = img_size
    model_args.pop("num_classes", None)
    net = timm.create_model(model, pretrained=False, num_classes=0, **model_args)
    weights = checkpoint_filter_fn(dict(backbone), net) if hasattr(net, "patch_embed") and not converted else backbone
    own = net.state_dict()
    missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    shapes = [f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(weights)) if weights[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointError(f"{source} ({fmt}) does not map onto {model} {model_args}:\n"
                           f"  missing from the checkpoint ({len(missing)}): {missing[:12]}\n"
                           f"  unexpected in the checkpoint ({len(unexpected)}): {unexpected[:12]}\n"
                           f"  shape mismatches ({len(shapes)}): {shapes[:6]}\n"
                           "Check --format, or give --model / --model-args for this architecture")
    net.load_state_dict(weights, strict=True)
    extra, decoder_info = {}, None
    if decoder:
        from safetensors.torch import save
        extra["mae_decoder.safetensors"] = save({k: v.contiguous() for k, v in decoder.items()})
        decoder_info = {"decoder_dim": int(decoder["decoder_embed.weight"].shape[0]),
                        "decoder_depth": 1 + max(int(k.split(".")[1]) for k in decoder if k.startswith("decoder_blocks."))}
    heads_info = None
    if heads:  # a DINOv2 training checkpoint's teacher heads: pretraining continues with them (dino_heads.safetensors)
        from safetensors.torch import save
        extra["dino_heads.safetensors"] = save({k: v.contiguous() for k, v in heads.items()})
        heads_info = {"out_dim": int(heads["dino.last_layer.weight"].shape[0]),
                      "bottleneck_dim": int(heads["dino.last_layer.weight"].shape[1]),
                      "ibot_separate_head": any(k.startswith("ibot.") for k in heads), "notes": head_notes}
    size = net.patch_embed.img_size[0] if hasattr(net, "patch_embed") else model_args.get("img_size", 224)
    lineage = {"stage": "import", "objective": f"imported {fmt} checkpoint",
               "source": {"file": source.name, "format": fmt, "sha256": sha256_file(source) if source.is_file() else None,
                          "license": license},
               "dropped": dropped, **({"mae_decoder": decoder_info} if decoder_info else {}),
               **({"dino_heads": heads_info} if heads_info else {})}
    prep = argparse.Namespace(img_size=size, mean=mean, std=std)
    diff = export_model(net, out, data=prep, lineage=lineage, license=license, extra_files=extra)
    notes = list(heads_info["notes"]) if heads_info else []
    eps = transformers_config(source).get("layer_norm_eps") if is_transformers_layout(raw) else None
    if eps is not None and abs(float(eps) - 1e-6) > 1e-9 and fmt != "dinov3":
        notes.append(f"the source's LayerNorm eps is {eps:g}, timm's ViT uses 1e-6: tokens differ slightly (negligible "
                     "for trained weights, whose normalised inputs have unit-scale variance)")
    return {"out": str(out), "architecture": model, "model_args": model_args, "dropped": dropped, "notes": notes,
            "mae_decoder": decoder_info, "dino_heads": heads_info, "params": sum(p.numel() for p in net.parameters()),
            "reload_max_abs_diff": diff}
