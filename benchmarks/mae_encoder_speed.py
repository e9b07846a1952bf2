"""MAE training step: medfound's visible-tokens-only encoder vs. a full-sequence encoder, side by side.

The alternative a user would otherwise write with timm is masked image modelling over the whole
sequence: replace masked patch embeddings by a mask token and run `forward_features` on all N tokens
(as SimMIM/BEiT do), with the same light decoder and loss. MAE's point (He et al. 2022, sec. 3) is that
the encoder only needs the ~25% visible tokens; this measures what that buys in images/s and peak
memory for one optimizer step (forward + backward + AdamW), each variant in its own process.

    python benchmarks/mae_encoder_speed.py                        # ViT-S/16 at 224 px, CPU-sized defaults
    python benchmarks/mae_encoder_speed.py --model vit_base_patch16_224 --batch 64 --steps 20   # on a GPU

Prints one line per variant and the ratios. Numbers are measurements of this machine, not assertions.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def run_variant(variant: str, model: str, img: int, batch: int, steps: int, warmup: int, mask_ratio: float) -> dict:
    import timm
    import torch

    from medfound.pretrain.mae import MAE

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    enc = timm.create_model(model, img_size=img, num_classes=0)
    mae = MAE(enc, decoder_dim=512, decoder_depth=8, decoder_heads=16, mask_ratio=mask_ratio).to(device)
    if variant == "full_sequence":
        mask_embed = torch.nn.Parameter(torch.zeros(1, 1, enc.embed_dim, device=device))

        def encode(images, keep):  # every token through the encoder; masked ones replaced by a learned token
            x = enc.patch_embed(images)
            b, n, d = x.shape
            visible = torch.zeros(b, n, 1, device=device)
            visible.scatter_(1, keep.unsqueeze(-1), 1.0)
            x = x * visible + mask_embed.expand(b, n, d) * (1 - visible)
            x = enc.norm(enc.blocks(enc.norm_pre(enc._pos_embed(x))))
            p = mae.geometry.num_prefix_tokens
            kept = torch.gather(x[:, p:], 1, keep.unsqueeze(-1).expand(-1, -1, d))  # decoder input as in MAE
            return torch.cat([x[:, :p], kept], 1)
        mae.encode_visible = encode
        params = list(mae.parameters()) + [mask_embed]
    else:
        params = list(mae.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    images = torch.randn(batch, 3, img, img, device=device)
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = mae({"image": images})["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"variant": variant, "device": str(device), "images_per_s": batch * len(times) / sum(times),
            "step_s": sum(times) / len(times), "peak_mb": peak,
            "peak_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process max RSS"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--out", default="benchmarks/results/mae_encoder_speed.json", help="where to write the results")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.variant:
        print(json.dumps(run_variant(a.variant, a.model, a.img, a.batch, a.steps, a.warmup, a.mask_ratio)))
        return
    results = {}
    for variant in ("full_sequence", "medfound_mae"):
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--model", a.model, "--img", str(a.img),
                              "--batch", str(a.batch), "--steps", str(a.steps), "--warmup", str(a.warmup),
                              "--mask-ratio", str(a.mask_ratio)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results[variant] = r
        print(f"{variant:14s} {r['device']}: {r['images_per_s']:8.1f} images/s  {r['step_s'] * 1000:8.1f} ms/step  "
              f"peak {r['peak_mb']:8.0f} MB ({r['peak_kind']})")
    f, m = results["full_sequence"], results["medfound_mae"]
    speed, memory = m["images_per_s"] / f["images_per_s"], m["peak_mb"] / f["peak_mb"]
    print(f"{a.model} {a.img}px batch {a.batch}, mask ratio {a.mask_ratio}: medfound MAE is {speed:.2f}x the "
          f"images/s and {memory:.2f}x the peak memory of the full-sequence encoder")
    import os
    import platform
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump({"command": "python " + " ".join(sys.argv), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                   "settings": {k: v for k, v in vars(a).items() if k not in ("variant", "out")},
                   "results": results, "speed_ratio": speed, "memory_ratio": memory}, fh, indent=2)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
