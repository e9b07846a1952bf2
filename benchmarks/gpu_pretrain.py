"""Pretraining throughput on one GPU: MAE ViT-L/16 and DINOv2 ViT-L/16, bf16, images/s, peak memory, MFU.

Runs medfound's own objectives and training step (fused AdamW, bf16 autocast, SDPA attention through timm)
on synthetic batches already on the GPU, so the number is the model's; then measures how many samples/s
the data pipeline delivers on this machine's CPUs from real shards (`--shards`, default: the bundled H&E
slide tiled at 224 px), to show whether it can feed the GPU.

MFU = achieved model FLOP/s / peak. Model FLOPs (2 x MACs; training = 3 x forward):
- MAE: encoder on the visible tokens (+ class token), decoder (512-d x 8) on all tokens.
- DINOv2: student on 2 global (224 px) + 8 local (96 px) crops and the DINO head on each class token, plus the
  teacher's forward on the global crops (no backward); the iBOT head on masked patches is left out (small).
Peak: `--peak-tflops` (default 989, H100 SXM dense bf16).

    python benchmarks/gpu_pretrain.py                     # on a GPU machine, about 3-5 minutes
    python benchmarks/gpu_pretrain.py --tiny --steps 2    # exercises the script on a CPU

Writes benchmarks/results/gpu_pretrain[_tiny].json. Measurements, not assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def vit_forward_flops(tokens: int, dim: int, depth: int, mlp_ratio: float = 4.0) -> float:
    return 2.0 * depth * (4 * tokens * dim * dim + 2 * mlp_ratio * tokens * dim * dim + 2 * tokens * tokens * dim)


def dino_train_flops(dim: int, depth: int, patch: int, img: int, local: int, globals_: int, locals_: int,
                     head: tuple[int, int, int]) -> float:
    hidden, bottleneck, out = head
    t_g, t_l = (img // patch) ** 2 + 1, (local // patch) ** 2 + 1
    head_f = 2.0 * (dim * hidden + hidden * hidden + hidden * bottleneck + bottleneck * out)
    student = globals_ * vit_forward_flops(t_g, dim, depth) + locals_ * vit_forward_flops(t_l, dim, depth) \
        + (globals_ + locals_) * head_f
    teacher = globals_ * (vit_forward_flops(t_g, dim, depth) + head_f)
    return 3.0 * student + teacher


def measure(step, batch: int, steps: int, device: torch.device) -> tuple[float, float]:
    """(images/s, peak memory GiB) over `steps` timed steps after 3 warm-up steps."""
    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
    return batch / statistics.median(times), peak


def make_step(objective: torch.nn.Module, batch: dict, device: torch.device, compile_: bool):
    from medfound.config import OptimConfig
    from medfound.train.optim import build_optimizer

    objective.to(device).train()
    opt = build_optimizer(objective, OptimConfig(lr=1e-4, weight_decay=0.05), 1e-4)
    model = torch.compile(objective) if compile_ else objective
    use_bf16 = device.type == "cuda"

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = model(batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if hasattr(objective, "after_optimizer_step"):
            objective.after_optimizer_step(0, 1000)
    return step


def pipeline_rate(shards: Path | None, workers: int, img: int) -> float:
    """Samples/s the data pipeline delivers (decode + MAE augmentation + collation), uint8 batches."""
    from medfound.data.pipeline import make_loader, shard_urls
    from medfound.data.transforms import build_transform
    from medfound.workflows import shard

    with tempfile.TemporaryDirectory() as tmp:
        if shards is None:
            shards = Path(tmp) / "he"
            shard("wsi", ROOT / "data" / "wsi" / "CMU-1-Small-Region.svs", shards, modality="pathology", mpp=0.5,
                  tile_size=img, min_tissue=0.0, keep_names=True, max_count=32)
        urls, _ = shard_urls([shards], "train")
        transform = build_transform("mae", img, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), normalize=False)
        seen, start = 0, time.perf_counter()
        for epoch in range(3):
            for b in make_loader(urls, transform=transform, batch_size=32, labelled=False, train=True, epoch=epoch,
                                 num_workers=workers, shuffle_buffer=128):
                seen += len(b["key"])
        return seen / (time.perf_counter() - start)


def main() -> None:
    import timm

    from medfound.pretrain.dino import DINOv2
    from medfound.pretrain.mae import MAE
    from mae_step import mae_forward_flops

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a tiny ViT, to exercise the script on a CPU")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--mae-batch", type=int, default=256)
    p.add_argument("--dino-batch", type=int, default=64)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--shards", type=Path, help="a shard set for the pipeline measurement (default: bundled slide)")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    p.add_argument("--out")
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if a.tiny:
        arch = dict(embed_dim=64, depth=2, num_heads=2, patch_size=8)
        img, local, dims, heads = 32, 16, (64, 2, 8), (64, 32, 256)
        a.mae_batch, a.dino_batch = min(a.mae_batch, 16), min(a.dino_batch, 8)
    else:
        arch = dict(embed_dim=1024, depth=24, num_heads=16, patch_size=16)
        img, local, dims, heads = 224, 96, (1024, 24, 16), (2048, 256, 65536)
    results: dict = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU ({os.cpu_count()})",
                     "torch": torch.__version__, "tiny": a.tiny, "compile": a.compile, "peak_tflops": a.peak_tflops}

    torch.manual_seed(0)
    mae = MAE(timm.create_model("vit_large_patch16_224", num_classes=0, img_size=img, **arch), decoder_dim=512 if not
              a.tiny else 32, decoder_depth=8 if not a.tiny else 1, decoder_heads=16 if not a.tiny else 2)
    batch = {"image": torch.randn(a.mae_batch, 3, img, img, device=device)}
    rate, mem = measure(make_step(mae, batch, device, a.compile), a.mae_batch, a.steps, device)
    flops = 3 * mae_forward_flops(img, dims[2], dims[0], dims[1], 512 if not a.tiny else 32, 8 if not a.tiny else 1)
    results["mae_vitl16"] = {"images_per_s": rate, "peak_memory_gib": mem, "batch": a.mae_batch,
                             "model_tflops_per_image": flops / 1e12, "mfu": rate * flops / (a.peak_tflops * 1e12)}
    del mae, batch
    if device.type == "cuda":
        torch.cuda.empty_cache()

    dino = DINOv2(timm.create_model("vit_large_patch16_224", num_classes=0, img_size=img, dynamic_img_size=True,
                                    init_values=1e-5, **arch), hidden_dim=heads[0], bottleneck_dim=heads[1],
                  out_dim=heads[2])
    crops = [torch.randn(a.dino_batch, 3, img, img, device=device) for _ in range(2)] + \
        [torch.randn(a.dino_batch, 3, local, local, device=device) for _ in range(8)]
    rate, mem = measure(make_step(dino, {"crops": crops}, device, a.compile), a.dino_batch, a.steps, device)
    flops = dino_train_flops(dims[0], dims[1], dims[2], img, local, 2, 8, heads)
    results["dinov2_vitl16"] = {"images_per_s": rate, "peak_memory_gib": mem, "batch": a.dino_batch,
                                "model_tflops_per_image": flops / 1e12, "mfu": rate * flops / (a.peak_tflops * 1e12)}

    results["pipeline_samples_per_s"] = pipeline_rate(a.shards, a.workers, img)
    results["pipeline_workers"] = a.workers
    for k in ("mae_vitl16", "dinov2_vitl16"):
        r = results[k]
        print(f"{k:14s} {r['images_per_s']:9.1f} images/s  batch {r['batch']}  peak {r['peak_memory_gib']:.1f} GiB  "
              f"MFU {100 * r['mfu']:.1f}% (of {a.peak_tflops} TFLOP/s)")
    feeds = results["pipeline_samples_per_s"] / results["mae_vitl16"]["images_per_s"]
    print(f"data pipeline: {results['pipeline_samples_per_s']:.0f} samples/s with {a.workers} workers = {feeds:.2f}x "
          "what MAE consumes")
    results["pipeline_vs_mae"] = feeds
    out = Path(a.out or ROOT / "benchmarks" / "results" / f"gpu_pretrain{'_tiny' if a.tiny else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python " + " ".join(sys.argv), "machine": platform.machine(), **results},
                              indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
