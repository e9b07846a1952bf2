"""Pretraining throughput on one GPU: MAE and DINOv2 ViT-L/16 (and MAE ViT-H/14) under each `trainer.strategy`,
with and without activation checkpointing, bf16: images/s, peak memory, MFU.

Every configuration runs in its own process (under torch.distributed.run with one process, so fsdp and zero*
really wrap the model in a 1-rank group) through medfound's own strategies and training step (fused AdamW,
bf16, SDPA attention through timm) on synthetic batches already on the GPU, so the number is the model's.
Then it measures how many samples/s the data pipeline delivers on this machine's CPUs from real shards
(`--shards`, default: the bundled H&E slide tiled at 224 px), to show whether it can feed the GPU.

The default matrix (about 6-7 minutes on one H100/H200): MAE ViT-L/16 under ddp, fsdp, zero2, zero3, and
fsdp + activation checkpointing; DINOv2 ViT-L/16 under ddp and fsdp; MAE ViT-H/14 under fsdp + activation
checkpointing. `--strategy` / `--activation-checkpointing` / `--models` narrow it.

MFU = achieved model FLOP/s / peak. Model FLOPs (2 x MACs; training = 3 x forward):
- MAE: encoder on the visible tokens (+ class token), decoder (512-d x 8) on all tokens.
- DINOv2: student on 2 global (224 px) + 8 local (96 px) crops and the DINO head on each class token, plus the
  teacher's forward on the global crops (no backward); the iBOT head on masked patches is left out (small).
Peak: `--peak-tflops` (default 989, H100 SXM dense bf16).

    python benchmarks/gpu_pretrain.py                     # on a GPU machine, under 8 minutes
    python benchmarks/gpu_pretrain.py --tiny --steps 2    # exercises the script (and every strategy) on a CPU

Writes benchmarks/results/gpu_pretrain[_tiny].json. Measurements, not assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
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


ARCHS = {  # name -> timm model, arch kwargs, image size, local crop size
    "vitl16": ("vit_large_patch16_224", dict(embed_dim=1024, depth=24, num_heads=16, patch_size=16), 224, 96),
    "vith14": ("vit_huge_patch14_224", dict(embed_dim=1280, depth=32, num_heads=16, patch_size=14), 224, 98),
    "tiny": ("vit_large_patch16_224", dict(embed_dim=64, depth=2, num_heads=2, patch_size=8), 32, 16),
}
MATRIX = [("mae", "vitl16", "ddp", False), ("mae", "vitl16", "fsdp", False), ("mae", "vitl16", "zero2", False),
          ("mae", "vitl16", "zero3", False), ("mae", "vitl16", "fsdp", True), ("dinov2", "vitl16", "ddp", False),
          ("dinov2", "vitl16", "fsdp", False), ("mae", "vith14", "fsdp", True)]


def build(objective: str, arch: str, tiny: bool):
    """(module, batch builder, model FLOPs per image, batch size default)."""
    import timm

    from mae_step import mae_forward_flops
    from medfound.pretrain.dino import DINOv2
    from medfound.pretrain.mae import MAE

    name, kw, img, local = ARCHS["tiny" if tiny else arch]
    dim, depth, patch = kw["embed_dim"], kw["depth"], kw["patch_size"]
    torch.manual_seed(0)
    if objective == "mae":
        dec = (32, 1, 2) if tiny else (512, 8, 16)
        module = MAE(timm.create_model(name, num_classes=0, img_size=img, **kw), decoder_dim=dec[0],
                     decoder_depth=dec[1], decoder_heads=dec[2])
        flops = 3 * mae_forward_flops(img, patch, dim, depth, dec[0], dec[1])
        return module, lambda b, d: {"image": torch.randn(b, 3, img, img, device=d)}, flops
    heads = (64, 32, 256) if tiny else (2048, 256, 65536)
    module = DINOv2(timm.create_model(name, num_classes=0, img_size=img, dynamic_img_size=True, init_values=1e-5, **kw),
                    hidden_dim=heads[0], bottleneck_dim=heads[1], out_dim=heads[2])
    flops = dino_train_flops(dim, depth, patch, img, local, 2, 8, heads)
    return module, lambda b, d: {"crops": [torch.randn(b, 3, img, img, device=d) for _ in range(2)] +
                                          [torch.randn(b, 3, local, local, device=d) for _ in range(8)]}, flops


def worker(a: argparse.Namespace) -> None:
    """One configuration, in its own process group of one: medfound's strategy objects drive the step."""
    import torch.distributed as dist
    from accelerate import Accelerator

    from medfound.config import OptimConfig, TrainerConfig
    from medfound.train.optim import build_optimizer
    from medfound.train.loop import build_strategy

    gpu = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if gpu else "gloo")
    acc = Accelerator(cpu=not gpu, mixed_precision="bf16" if gpu else "no")
    trainer = TrainerConfig(output_dir=Path("unused"), max_steps=1000, strategy=a.strategy, loggers=[],
                            precision="bf16" if gpu else "fp32", progress=False,
                            activation_checkpointing=a.ac)
    module, make_batch, flops = build(a.objective, a.arch, a.tiny)
    strategy = build_strategy(acc, trainer)
    model, optimizer, inner, _ = strategy.setup(module, lambda m: build_optimizer(
        m, OptimConfig(lr=1e-4, weight_decay=0.05), 1e-4), None)
    batch = make_batch(a.batch, acc.device)

    def step():
        with strategy.gradient_sync(model, True):
            with acc.autocast():
                loss = model(batch)["loss"]
            strategy.backward(loss)
        strategy.step(optimizer)
        strategy.zero_grad(optimizer)
        hook = getattr(inner, "after_optimizer_step", None)
        if hook is not None:
            hook(0, 1000)

    rate, mem = measure(step, a.batch, a.steps, acc.device)
    Path(a.result).write_text(json.dumps({"images_per_s": rate, "peak_memory_gib": mem, "batch": a.batch,
                                          "model_tflops_per_image": flops / 1e12,
                                          "mfu": rate * flops / (a.peak_tflops * 1e12)}))


def run_config(objective: str, arch: str, strategy: str, ac: bool, a: argparse.Namespace) -> dict:
    batch = {"mae": a.mae_batch, "dinov2": a.dino_batch}[objective]
    if a.tiny:
        batch = min(batch, 16 if objective == "mae" else 8)
    elif arch == "vith14":
        batch = max(1, batch // 2)
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", __file__,
               "--worker", "--objective", objective, "--arch", arch, "--strategy", strategy, "--batch", str(batch),
               "--steps", str(a.steps), "--peak-tflops", str(a.peak_tflops), "--result", str(result)]
        cmd += ["--ac"] * ac + ["--tiny"] * a.tiny
        start = time.time()
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        if p.returncode != 0 or not result.is_file():
            return {"error": (p.stdout + p.stderr)[-1500:], "wall_s": time.time() - start}
        return {**json.loads(result.read_text()), "wall_s": round(time.time() - start, 1)}


def pipeline_rate(shards: Path | None, workers: int, img: int) -> float:
    """Samples/s the data pipeline delivers (decode + MAE augmentation + collation), uint8 batches."""
    from medfound.data.pipeline import Decoding, TrainOrder, make_loader, shard_urls
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
            for b in make_loader(urls, Decoding(transform), batch_size=32,
                                 order=TrainOrder(epoch=epoch, shuffle_buffer=128), num_workers=workers):
                seen += len(b["key"])
        return seen / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a tiny ViT, to exercise the script on a CPU")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--mae-batch", type=int, default=256)
    p.add_argument("--dino-batch", type=int, default=64)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    p.add_argument("--strategy", nargs="+", help="only these strategies (default: the matrix above)")
    p.add_argument("--activation-checkpointing", choices=["off", "on", "both"], help="only these settings")
    p.add_argument("--models", nargs="+", help="only these of mae-vitl16, dinov2-vitl16, mae-vith14")
    p.add_argument("--shards", type=Path, help="a shard set for the pipeline measurement (default: bundled slide)")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    p.add_argument("--out")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--objective", "--arch", "--result"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--ac", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        a.strategy = a.strategy[0]
        return worker(a)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results: dict = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU ({os.cpu_count()})",
                     "torch": torch.__version__, "tiny": a.tiny, "peak_tflops": a.peak_tflops, "runs": []}
    ac_keep = {"off": {False}, "on": {True}, "both": {False, True}, None: {False, True}}[a.activation_checkpointing]
    for objective, arch, strategy, ac in MATRIX:
        if (a.strategy and strategy not in a.strategy) or ac not in ac_keep or \
                (a.models and f"{objective}-{arch}" not in a.models):
            continue
        r = {"model": f"{objective}-{arch}", "strategy": strategy, "activation_checkpointing": ac,
             **run_config(objective, arch, strategy, ac, a)}
        results["runs"].append(r)
        label = f"{r['model']:14s} {strategy:5s} ac={'on ' if ac else 'off'}"
        if "error" in r:
            print(f"{label} failed: {r['error'][-400:]}", flush=True)
            continue
        print(f"{label} {r['images_per_s']:9.1f} images/s  batch {r['batch']}  peak {r['peak_memory_gib']:.1f} GiB  "
              f"MFU {100 * r['mfu']:.1f}% (of {a.peak_tflops} TFLOP/s)  [{r['wall_s']:.0f} s]", flush=True)
    base = {(r["model"]): r for r in results["runs"] if r["strategy"] == "ddp" and "error" not in r}
    for r in results["runs"]:
        if "error" not in r and r["model"] in base:
            b = base[r["model"]]
            r["speed_ratio_vs_ddp"] = r["images_per_s"] / b["images_per_s"]
            if b["peak_memory_gib"] == b["peak_memory_gib"]:  # not NaN (CPU)
                r["memory_ratio_vs_ddp"] = r["peak_memory_gib"] / b["peak_memory_gib"]
            print(f"{r['model']:14s} {r['strategy']:5s} ac={'on ' if r['activation_checkpointing'] else 'off'} "
                  f"speed ratio={r['speed_ratio_vs_ddp']:.2f}" +
                  (f"  memory ratio={r['memory_ratio_vs_ddp']:.2f}" if "memory_ratio_vs_ddp" in r else "") +
                  " (vs ddp)")
    results["pipeline_samples_per_s"] = pipeline_rate(a.shards, a.workers, ARCHS["tiny" if a.tiny else "vitl16"][2])
    results["pipeline_workers"] = a.workers
    mae = next((r for r in results["runs"] if r["model"] == "mae-vitl16" and r["strategy"] == "ddp"
                and "error" not in r), None)
    if mae is not None:
        feeds = results["pipeline_samples_per_s"] / mae["images_per_s"]
        results["pipeline_vs_mae"] = feeds
        print(f"data pipeline: {results['pipeline_samples_per_s']:.0f} samples/s with {a.workers} workers = "
              f"{feeds:.2f}x what MAE ViT-L/16 (ddp) consumes")
    out = Path(a.out or ROOT / "benchmarks" / "results" / f"gpu_pretrain{'_tiny' if a.tiny else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python " + " ".join(sys.argv), "machine": platform.machine(), **results},
                              indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
