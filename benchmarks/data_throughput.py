"""Samples/s of the medfound pipeline against torchvision ImageFolder and against decode only.

Same real images three ways, same DataLoader worker count and batch size, repeats interleaved
(medfound, ImageFolder, decode-only, medfound, ...) so drift on the machine hits all variants alike:

- medfound:     WebDataset shards -> shuffle buffer -> PNG decode -> MAE augmentation at 224 px (32 for medmnist)
                (RandomResizedCrop 0.2-1, flip) -> uint8 batches -> normalise in the main process, as the
                training loop does after moving a batch to the device   (`medfound.data.pipeline`)
- imagefolder:  the same images as PNG files, torchvision `ImageFolder` + the same augmentation,
                `DataLoader(shuffle=True)`: what a user would write otherwise
- decode-only:  the same shards, decode to a uint8 tensor and batch, no augmentation: the ceiling

Images (`--source`): `he` - 224-px H&E tiles at 0.5 µm/px cut from the bundled CC0 slide (all of the slide,
tissue or not, so there are enough); `drive` - the 40 DRIVE colour fundus photographs (565x584) from
../shared/data/drive; `medmnist` - the bundled PneumoniaMNIST demo images (28 px, trained at 32 px, as the
label-efficiency benchmark does), where the per-sample work of the pipeline, not pixels, sets the rate. Each is
repeated `--epochs` times per measurement.

    python benchmarks/data_throughput.py [--source he|drive|medmnist] [--workers 2] [--repeats 3]
    python benchmarks/data_throughput.py --verify-overhead [--source he|drive]
    python benchmarks/data_throughput.py --remote [--source he|drive]

Prints samples/s per variant (median of the repeats) and the ratios; writes
benchmarks/results/data_throughput.json. Measurements of this machine, not assertions.

`--verify-overhead` instead measures what streaming verification costs (docs/data.md): the same shard files read
with no manifest beside them (nothing to check: the baseline), at `verify=size` (byte size before, sample count
after each shard: the default on every read) and at `verify=sha256`; once for the raw tar stage alone (the
worst case: no decoding to hide behind) and once for the full training pipeline (decode + MAE augmentation).
Prints `ratio=` (verified / unverified time) for each.

`--remote` instead streams the same shard set from local disk, from an HTTP server and from an S3-compatible
server (both on 127.0.0.1, started here: Python's http.server and moto[server]), through the full training pipeline
(decode + MAE augmentation) at verify=size and at verify=sha256, and prints images/s and `ratio=` (remote / local).
On one machine this measures medfound's remote reading path (fsspec, read-ahead, the spooled sha256 download), not a
network: a real object store adds its latency and bandwidth.
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
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def prepare(work: Path, source: str = "he") -> tuple[list[str], Path, int]:
    from medfound.data.pipeline import shard_urls
    from medfound.workflows import shard

    shards = work / "shards"
    if source == "medmnist":  # 28-px chest X-rays, resized to 32 px: per-sample overhead, not pixels, is the cost
        m, _ = shard("npz", ROOT / "data" / "medmnist" / "pneumoniamnist_demo.npz", shards, modality="cxr")
    elif source == "he":
        m, _ = shard("wsi", ROOT / "data" / "wsi" / "CMU-1-Small-Region.svs", shards, modality="pathology", mpp=0.5,
                     tile_size=224, min_tissue=0.0, keep_names=True, max_count=64)
    else:
        drive = ROOT.parent / "shared" / "data" / "drive"
        if not drive.is_dir():
            raise SystemExit(f"{drive} is absent: --source drive needs the shared DRIVE data")
        rows = [f"{p.relative_to(drive)},train" for p in sorted(drive.glob("*/images/*.tif"))]
        (work / "drive.csv").write_text("path,split\n" + "\n".join(rows) + "\n")
        m, _ = shard("images", drive, shards, table=work / "drive.csv", modality="fundus", max_count=8)
    urls, _ = shard_urls([shards], "train")
    folder = work / "imagefolder" / "tiles"
    folder.mkdir(parents=True)
    import tarfile
    for url in urls:  # the very same PNG bytes as files
        with tarfile.open(url) as t:
            for member in t.getmembers():
                if member.name.endswith(".png"):
                    (folder / member.name).write_bytes(t.extractfile(member).read())
    return urls, folder.parent, m.counts["total"]


SIZES = {"he": 224, "drive": 224, "medmnist": 32}  # the training size per source


def mae_augment(size: int = 224):
    from torchvision.transforms import v2 as T
    return T.Compose([T.ToImage(), T.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC,
                                                       antialias=True), T.RandomHorizontalFlip(),
                      T.ToDtype(torch.float32, scale=True), T.Normalize(MEAN, STD)])


def loaders(urls: list[str], folder: Path, batch: int, workers: int, epoch: int, size: int = 224) -> dict:
    import torchvision
    from torchvision.transforms import v2 as T

    from medfound.data.pipeline import Decoding, TrainOrder, make_loader
    from medfound.data.transforms import build_transform

    return {
        "medfound": make_loader(urls, Decoding(build_transform("mae", size, MEAN, STD, normalize=False)),
                                batch_size=batch, order=TrainOrder(seed=0, epoch=epoch, shuffle_buffer=256),
                                num_workers=workers),
        "imagefolder": DataLoader(torchvision.datasets.ImageFolder(str(folder), transform=mae_augment(size)),
                                  batch_size=batch, shuffle=True, num_workers=workers, drop_last=True),
        "decode_only": make_loader(urls, Decoding(lambda s: {"image": T.ToImage()(s["image"].convert("RGB"))}),
                                   batch_size=batch, order=TrainOrder(seed=0, epoch=epoch, shuffle_buffer=256),
                                   num_workers=workers),
    }


def verify_overhead(urls: list[str], work: Path, repeats: int, epochs: int, batch: int) -> dict:
    """Seconds to stream the shards with no manifest (no checks), verify=size and verify=sha256, interleaved."""
    import shutil

    from medfound.data.pipeline import Decoding, Reading, TrainOrder, make_loader
    from medfound.data.tario import tar_samples
    from medfound.data.transforms import build_transform

    bare = work / "bare"
    bare.mkdir()
    plain = [str(shutil.copy2(u, bare / Path(u).name)) for u in urls]  # the same bytes, no manifest.json beside
    transform = build_transform("mae", 224, MEAN, STD, normalize=False)
    runs = {"raw": {}, "pipeline": {}}
    variants = {"unverified": (plain, "size"), "size": (urls, "size"), "sha256": (urls, "sha256")}
    for r in range(repeats + 1):
        for name, (files, level) in variants.items():
            start = time.perf_counter()
            n = 0
            for _ in range(epochs * 20):  # the raw stage is ~50x faster: more passes for a stable time
                n += sum(1 for _ in tar_samples(iter({"url": u} for u in files), level))
            raw = time.perf_counter() - start
            start = time.perf_counter()
            m = 0
            for e in range(epochs):
                m += sum(len(b["key"]) for b in make_loader(files, Decoding(transform), batch_size=batch,
                                                            order=TrainOrder(seed=0, epoch=e, shuffle_buffer=64),
                                                            reading=Reading(verify=level)))
            pipe = time.perf_counter() - start
            if r:  # the first round warms the page cache
                runs["raw"].setdefault(name, []).append(raw)
                runs["pipeline"].setdefault(name, []).append(pipe)
    out = {}
    for stage, times in runs.items():
        med = {k: statistics.median(v) for k, v in times.items()}
        for level in ("size", "sha256"):
            ratio = med[level] / med["unverified"]
            out[f"{stage}_{level}"] = ratio
            print(f"{stage:8s} verify={level:6s} {med[level]:.3f} s vs unverified {med['unverified']:.3f} s  "
                  f"ratio={ratio:.3f} (overhead {100 * (ratio - 1):+.1f}%)")
    return {"median_seconds": {k: {n: statistics.median(v) for n, v in t.items()} for k, t in runs.items()},
            "ratios": out}


def remote_throughput(work: Path, repeats: int, epochs: int, batch: int, workers: int) -> dict:
    """images/s of the training pipeline over local, HTTP and S3 copies of one shard set, interleaved."""
    import socket
    import subprocess

    import boto3

    from medfound.data.pipeline import Decoding, Reading, TrainOrder, make_loader, shard_urls
    from medfound.data.transforms import build_transform

    def free_port() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    # both servers in their own processes, as a real server would be (not competing for this process's GIL)
    http_port, s3_port = free_port(), free_port()
    servers = [subprocess.Popen([sys.executable, "-m", "http.server", str(http_port), "--bind", "127.0.0.1",
                                 "--directory", str(work)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
               subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{s3_port}")
    for port in (http_port, s3_port):
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.05)
    client = boto3.client("s3")
    client.create_bucket(Bucket="medfound-bench")
    for f in sorted((work / "shards").iterdir()):
        client.upload_file(str(f), "medfound-bench", f"shards/{f.name}")
    sets = {"local": str(work / "shards"), "http": f"http://127.0.0.1:{http_port}/shards",
            "s3": "s3://medfound-bench/shards"}
    transform = build_transform("mae", 224, MEAN, STD, normalize=False)
    rates: dict = {}
    try:
        for r in range(repeats + 1):
            for level in ("size", "sha256"):
                for name, where in sets.items():
                    urls, _ = shard_urls([where], "train")
                    seen, start = 0, time.perf_counter()
                    # one loader over the shards listed `epochs` times: one long epoch, as in real training, so the
                    # workers' one-off client set-up (~0.2 s for S3) is paid once, not per short pass
                    for b in make_loader(urls * epochs, Decoding(transform), batch_size=batch,
                                         order=TrainOrder(seed=0, epoch=r, shuffle_buffer=64),
                                         reading=Reading(verify=level), num_workers=workers):
                        seen += len(b["key"])
                    if r:
                        rates.setdefault(level, {}).setdefault(name, []).append(seen / (time.perf_counter() - start))
    finally:
        for server in servers:
            server.terminate()
            server.wait()
    out = {"samples_per_s": rates, "ratios": {}}
    for level, by in rates.items():
        med = {k: statistics.median(v) for k, v in by.items()}
        for name in ("http", "s3"):
            ratio = med[name] / med["local"]
            out["ratios"][f"{name}_{level}"] = ratio
            print(f"verify={level:6s} {name:5s} {med[name]:7.1f} images/s vs local {med['local']:7.1f}  ratio={ratio:.3f}")
    return out


def count(batch) -> int:
    return len(batch["key"]) if isinstance(batch, dict) else len(batch[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", choices=sorted(SIZES), default="he")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3, help="passes over the tiles per measurement")
    p.add_argument("--out", help="results file (default benchmarks/results/data_throughput_SOURCE.json)")
    p.add_argument("--verify-overhead", action="store_true", help="measure streaming verification's cost instead")
    p.add_argument("--remote", action="store_true", help="local vs HTTP vs S3 (servers on 127.0.0.1) instead")
    a = p.parse_args()
    if a.remote:
        torch.set_num_threads(1)
        with tempfile.TemporaryDirectory() as tmp:
            _, _, n = prepare(Path(tmp), a.source)
            result = remote_throughput(Path(tmp), a.repeats, a.epochs, a.batch, a.workers)
        out = Path(a.out or ROOT / "benchmarks" / "results" / f"remote_throughput_{a.source}.json")
        out.write_text(json.dumps({"command": "python " + " ".join(sys.argv), "machine": f"{platform.machine()}, "
                                   f"{os.cpu_count()} CPUs", "settings": vars(a), "tiles": n, **result}, indent=2))
        print(f"{a.source}: {n} samples x {a.epochs} epochs; wrote {out}")
        return
    if a.verify_overhead:
        torch.set_num_threads(1)
        with tempfile.TemporaryDirectory() as tmp:
            urls, _, n = prepare(Path(tmp), a.source)
            result = verify_overhead(urls, Path(tmp), a.repeats, a.epochs, a.batch)
        out = Path(a.out or ROOT / "benchmarks" / "results" / f"verify_overhead_{a.source}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"command": "python " + " ".join(sys.argv), "machine": f"{platform.machine()}, "
                                   f"{os.cpu_count()} CPUs", "settings": vars(a), "tiles": n, **result}, indent=2))
        print(f"{a.source}: {n} samples x {a.epochs} epochs; wrote {out}")
        return
    a.out = a.out or str(ROOT / "benchmarks" / "results" / f"data_throughput_{a.source}.json")
    torch.set_num_threads(1)  # the workers do the work; keep the main process from competing
    from medfound.data.transforms import Normalize
    normalize = Normalize(MEAN, STD)
    with tempfile.TemporaryDirectory() as tmp:
        urls, folder, n = prepare(Path(tmp), a.source)
        rates: dict[str, list[float]] = {"medfound": [], "imagefolder": [], "decode_only": []}
        for r in range(a.repeats + 1):  # the first round warms caches and is not counted
            for name in rates:
                seen, start = 0, time.perf_counter()
                for e in range(a.epochs):
                    for b in loaders(urls, folder, a.batch, a.workers, epoch=r * a.epochs + e,
                                     size=SIZES[a.source])[name]:
                        if name == "medfound":
                            b["image"] = normalize(b["image"])  # the loop's on-device step, here on the CPU
                        seen += count(b)
                rate = seen / (time.perf_counter() - start)
                if r:
                    rates[name].append(rate)
    med = {k: statistics.median(v) for k, v in rates.items()}
    for k, v in med.items():
        print(f"{k:12s} {v:8.1f} samples/s  (repeats: {', '.join(f'{x:.0f}' for x in rates[k])})")
    vs_if, vs_dec = med["medfound"] / med["imagefolder"], med["medfound"] / med["decode_only"]
    print(f"{a.source}: {n} images x {a.epochs} epochs, {a.workers} workers, batch {a.batch}: medfound is {vs_if:.2f}x ImageFolder "
          f"(target >= 1.0) and {vs_dec:.2f}x decode-only (target >= 0.8)")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({
        "command": "python " + " ".join(sys.argv), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "settings": vars(a), "tiles": n, "samples_per_s": rates, "median": med,
        "ratio_vs_imagefolder": vs_if, "ratio_vs_decode_only": vs_dec}, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
