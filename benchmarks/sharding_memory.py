"""Memory per rank and step time of one MAE ViT-B/16 training step under ddp / fsdp / zero2 / zero3, 1, 2, 4 processes.

Each configuration runs under torch.distributed.run (gloo on CPU, nccl on GPUs) through medfound's own strategies
(medfound/train/strategy.py, zero.py: the code `trainer.strategy` selects), on random 224-px images:

- held: the bytes of parameters + AdamW state (+ DeepSpeed's fp32 master partitions) this rank holds after a step,
  counted from the tensors themselves (a DTensor's local shard, a ZeRO-3 partition);
- peak RSS of the process (CPU) and, on GPU, torch.cuda.max_memory_allocated;
- median step time over the timed steps (after one warm-up).

Printed beside ddp with the same number of processes (`ratio=`: held bytes, expected about 1/N for fsdp and zero3;
step time). Measurements, not assertions. On this 2-core CPU machine 4 processes share 2 cores, so step times
at 4 processes say little; the memory columns do not depend on that.

    python benchmarks/sharding_memory.py                        # all strategies at 1, 2, 4 processes
    python benchmarks/sharding_memory.py --procs 2 --strategies ddp fsdp --model vit_small_patch16_224

Writes benchmarks/results/sharding_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _held_bytes(strategy, model, optimizer) -> dict[str, int]:
    import torch

    from medfound.train.strategy import local

    def nbytes(t: torch.Tensor) -> int:
        t = local(t)
        return t.numel() * t.element_size()

    if strategy.name.startswith("zero"):
        params = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() if hasattr(p, "ds_tensor") else nbytes(p)
                     for p in strategy.engine.module.parameters())
        inner = strategy.engine.optimizer.optimizer
        master = sum(nbytes(p) for g in inner.param_groups for p in g["params"])
        state = sum(nbytes(v) for st in inner.state.values() for v in st.values() if torch.is_tensor(v))
        return {"params": params, "master": master, "optimizer": state}
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    params = sum(nbytes(p) for p in model.parameters())
    state = sum(nbytes(v) for st in inner.state.values() for v in st.values() if torch.is_tensor(v))
    return {"params": params, "master": 0, "optimizer": state}


def worker(args: argparse.Namespace) -> None:
    import timm
    import torch
    from accelerate import Accelerator

    from medfound.config import OptimConfig, TrainerConfig
    from medfound.pretrain.mae import MAE
    from medfound.train.optim import build_optimizer
    from medfound.train.loop import build_strategy

    gpu = torch.cuda.is_available()
    acc = Accelerator(cpu=not gpu, mixed_precision="bf16" if gpu else "no")
    trainer = TrainerConfig(output_dir=Path("unused"), max_steps=args.steps, strategy=args.strategy,
                            precision="bf16" if gpu else "fp32", loggers=[], progress=False,
                            activation_checkpointing=args.activation_checkpointing)
    torch.manual_seed(0)
    encoder = timm.create_model(args.model, num_classes=0)
    module = MAE(encoder, decoder_dim=512, decoder_depth=8, decoder_heads=16, mask_ratio=0.75)
    strategy = build_strategy(acc, trainer)
    model, optimizer, inner, _ = strategy.setup(module, lambda m: build_optimizer(m, OptimConfig(lr=1e-4), 1e-4), None)
    g = torch.Generator().manual_seed(acc.process_index)
    images = torch.rand(args.batch, 3, 224, 224, generator=g).to(acc.device)
    times = []
    for i in range(args.steps + 1):
        t0 = time.perf_counter()
        with strategy.gradient_sync(model, True):
            with acc.autocast():
                loss = model({"image": images})["loss"]
            strategy.backward(loss)
        strategy.step(optimizer)
        strategy.zero_grad(optimizer)
        if gpu:
            torch.cuda.synchronize()
        if i > 0:
            times.append(time.perf_counter() - t0)
    held = _held_bytes(strategy, model, optimizer)
    row = {"rank": acc.process_index, "world": acc.num_processes, "strategy": args.strategy,
           "held_bytes": held, "held_total": sum(held.values()),
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "step_s": statistics.median(times), "loss": float(loss.detach())}
    if gpu:
        row["max_memory_allocated"] = torch.cuda.max_memory_allocated()
    (Path(args.result_dir) / f"rank{acc.process_index}.json").write_text(json.dumps(row))


def run(strategy: str, procs: int, args: argparse.Namespace) -> list[dict]:
    import tempfile

    result_dir = tempfile.mkdtemp(prefix="sharding_memory_")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", __file__,
           "--worker", "--result-dir", result_dir, "--strategy", strategy, "--model", args.model, "--batch", str(args.batch),
           "--steps", str(args.steps)] + (["--activation-checkpointing"] if args.activation_checkpointing else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // procs)), "TQDM_DISABLE": "1"}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    rows = [json.loads(f.read_text()) for f in Path(result_dir).glob("rank*.json")]
    if p.returncode != 0 or len(rows) != procs:
        print(f"  {strategy} x{procs} failed (rc {p.returncode}): {(p.stdout + p.stderr)[-1500:]}")
        return []
    return sorted(rows, key=lambda r: r["rank"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--strategy", default="ddp", help=argparse.SUPPRESS)
    ap.add_argument("--result-dir", help=argparse.SUPPRESS)
    ap.add_argument("--strategies", nargs="+", default=["ddp", "fsdp", "zero2", "zero3"])
    ap.add_argument("--procs", nargs="+", type=int, default=[1, 2, 4])
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--batch", type=int, default=2, help="images per process")
    ap.add_argument("--steps", type=int, default=2, help="timed steps (after one warm-up)")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sharding_memory.json")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    results = []
    gib = 2.0 ** 30
    for procs in args.procs:
        base = None
        for strategy in args.strategies:
            rows = run(strategy, procs, args)
            if not rows:
                continue
            held = max(r["held_total"] for r in rows)
            rss = max(r["peak_rss_bytes"] for r in rows)
            step = max(r["step_s"] for r in rows)
            if strategy == "ddp":
                base = (held, rss, step)
            entry = {"strategy": strategy, "procs": procs, "held_bytes_per_rank": held, "peak_rss_bytes": rss,
                     "step_s": step, "ranks": rows}
            line = (f"{strategy:>5} x{procs}: params+optimizer held {held / gib:6.3f} GiB/rank, peak RSS "
                    f"{rss / gib:6.2f} GiB, step {step:6.2f} s")
            if base is not None:
                entry.update(held_ratio=held / base[0], rss_ratio=rss / base[1], step_ratio=step / base[2])
                line += (f"   held ratio={held / base[0]:.3f}  rss ratio={rss / base[1]:.3f}  "
                         f"step ratio={step / base[2]:.2f}  (vs ddp x{procs})")
            if "max_memory_allocated" in rows[0]:
                entry["max_memory_allocated"] = max(r["max_memory_allocated"] for r in rows)
                line += f"  GPU peak {entry['max_memory_allocated'] / gib:.2f} GiB"
            print(line, flush=True)
            results.append(entry)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    import torch

    args.out.write_text(json.dumps({
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "model": args.model, "batch_per_process": args.batch, "steps": args.steps,
        "activation_checkpointing": args.activation_checkpointing,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "results": results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
