"""One MAE training step: medfound's MAE against Hugging Face transformers' `ViTMAEForPreTraining`.

Same size (ViT-B/16 encoder, 512-d x 8-block decoder with 16 heads, mask ratio 0.75, per-patch normalised
pixel loss), batch 8, fp32, fused AdamW for both, on this CPU, in one process. Steps are interleaved
(medfound, HF-eager, HF-sdpa, medfound, ...) after a warm-up, and each side's time is the median of its
steps; HF's time is the faster of its eager and SDPA attention.

It also reports the achieved model FLOP/s as a fraction of this machine's fp32 matrix-multiply peak,
measured in the same run with a large torch.mm. Model FLOPs = 3 x forward (backward ~ 2 x forward), forward
= 2 x MACs with the encoder counted on the visible tokens (and the class token) and the decoder on all.

    python benchmarks/mae_step.py [--steps 5] [--batch 8]

Last line: `ratio=<medfound time / HF time> peak_fraction=<medfound model FLOP/s / mm peak>`; results also
in benchmarks/results/mae_step.json. A measurement of this machine, not an assertion.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def mae_forward_flops(img: int = 224, patch: int = 16, dim: int = 768, depth: int = 12, dec_dim: int = 512,
                      dec_depth: int = 8, mlp_ratio: float = 4.0, mask_ratio: float = 0.75, chans: int = 3) -> float:
    """Forward FLOPs (2 x MACs) of one image through MAE."""
    n = (img // patch) ** 2
    t_enc = int(round(n * (1 - mask_ratio))) + 1
    t_dec = n + 1

    def block(t: int, d: int) -> float:
        return 4 * t * d * d + 2 * mlp_ratio * t * d * d + 2 * t * t * d  # qkv + proj, MLP, QK^T and AV

    macs = n * patch * patch * chans * dim               # patch embedding (all patches, as timm/HF do)
    macs += depth * block(t_enc, dim)                    # encoder on visible tokens
    macs += t_enc * dim * dec_dim                        # decoder embedding
    macs += dec_depth * block(t_dec, dec_dim)            # decoder on all tokens
    macs += n * dec_dim * patch * patch * chans          # pixel prediction
    return 2.0 * macs


def mm_peak(n: int = 2048, repeats: int = 5) -> float:
    """fp32 FLOP/s of a large square matrix multiply on this machine (best of `repeats`)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best


def build(batch: int):
    import timm
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    from medfound.pretrain.mae import MAE

    torch.manual_seed(0)
    ours = MAE(timm.create_model("vit_base_patch16_224", num_classes=0), decoder_dim=512, decoder_depth=8,
               decoder_heads=16, mask_ratio=0.75, norm_pix_loss=True)
    cfg = ViTMAEConfig(norm_pix_loss=True, mask_ratio=0.75)
    models = {"medfound": ours}
    for attn in ("eager", "sdpa"):
        models[f"hf_{attn}"] = ViTMAEForPreTraining._from_config(cfg, attn_implementation=attn)
    images = torch.randn(batch, 3, 224, 224)
    steps = {}
    for name, model in models.items():
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # what medfound's loop (and HF's Trainer) use

        def step(model=model, opt=opt, name=name):
            if name == "medfound":
                loss = model({"image": images})["loss"]
            else:
                loss = model(pixel_values=images).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        steps[name] = step
    return steps, {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mae_step.json"))
    a = p.parse_args()
    steps, params = build(a.batch)
    for fn in steps.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(a.steps):
        for name, fn in steps.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    peak = mm_peak()
    med = {k: statistics.median(v) for k, v in times.items()}
    hf_best = min(("hf_eager", "hf_sdpa"), key=lambda k: med[k])
    flops = 3 * mae_forward_flops() * a.batch
    achieved = flops / med["medfound"]
    for k, v in med.items():
        print(f"{k:9s} {v * 1000:8.1f} ms/step  ({params[k] / 1e6:.1f} M parameters; steps: "
              f"{', '.join(f'{x * 1000:.0f}' for x in times[k])})")
    print(f"model FLOPs per step {flops / 1e9:.1f} G; medfound {achieved / 1e9:.1f} GFLOP/s; fp32 mm peak "
          f"{peak / 1e9:.1f} GFLOP/s on {torch.get_num_threads()} threads")
    ratio, fraction = med["medfound"] / med[hf_best], achieved / peak
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({
        "command": "python " + " ".join(sys.argv), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "settings": vars(a),
        "step_seconds": times, "median_seconds": med, "hf_reference": hf_best, "parameters": params,
        "model_flops_per_step": flops, "mm_peak_flops": peak, "ratio": ratio, "peak_fraction": fraction}, indent=2))
    print(f"ratio={ratio:.3f} peak_fraction={fraction:.3f}")


if __name__ == "__main__":
    main()
