"""Peak memory of segmentation evaluation on large native images: does it stay flat as the set grows?

    python benchmarks/eval_memory.py RUN                       -> benchmarks/results/eval_memory_drive.json
    python benchmarks/eval_memory.py RUN --scale 6 --counts 2,6

RUN: a DRIVE-trained segmentation run (e.g. runs/bench/scale/unet, made by benchmarks/quality_scale.py). The
first N DRIVE test images are sharded at `--scale` times their size (6x: 3390 x 3504 px, about the 3504 x 2336 px
of a modern fundus camera; vessel and FOV masks by nearest neighbour) as an external set, and `medfound evaluate
RUN SET` runs once per N, each in its own process, with its peak resident set size read from the kernel
(RUSAGE_CHILDREN). Pooled pixel metrics come from 4096-bin histograms per image (evaluate/segmentation.py), so the
peak should not grow with N; an exact pooled AUROC would hold every scored pixel's probability and label (5 bytes
each, before sorting) across the set. The last line prints `ratio=` (peak at the largest N over the smallest) and
the exact approach's bytes for the largest N beside it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _quality import ROOT, SHARED, drive_table, medfound_bin, run, save_result


def peak_rss_mb(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in MB, seconds) of `cmd` run in a fresh wrapper process, so RUSAGE_CHILDREN sees it alone."""
    wrapper = ("import resource, subprocess, sys\n"
               "subprocess.run(sys.argv[1:], check=True)\n"
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    start = time.time()
    done = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return int(done.stdout.strip().splitlines()[-1]) / 1024, time.time() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path, help="a DRIVE-trained segmentation run")
    ap.add_argument("--scale", type=float, default=6.0, help="resampling factor of the test images (6: ~3400 px)")
    ap.add_argument("--counts", default="2,6", help="set sizes to evaluate, comma-separated")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench" / "eval_memory")
    args = ap.parse_args()
    drive = SHARED / "drive"
    if not drive.is_dir():
        print(f"DRIVE is not at {drive}: this benchmark needs ../shared/data/drive", file=sys.stderr)
        return 2
    if not (args.run_dir / "export").is_dir():
        print(f"{args.run_dir} has no export/: train it first (benchmarks/quality_scale.py)", file=sys.stderr)
        return 2
    mf, counts = medfound_bin(), sorted(int(c) for c in args.counts.split(","))
    rows = list(csv.DictReader(drive_table(drive, args.work / "drive_test.csv", ("test",)).open()))
    results = {}
    for n in counts:
        table = args.work / f"test_{n}.csv"
        with table.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows[:n])
        shards = args.work / f"x{args.scale:g}_{n}"
        if not (shards / "manifest.json").is_file():
            run([mf, "shard", "images", str(drive), "--table", str(table), "--out", str(shards), "--name",
                 f"drive_x{args.scale:g}_{n}", "--modality", "fundus", "--keep-names", "--scale", str(args.scale),
                 "--license", "DRIVE research-use terms", "--attribution", "DRIVE, Staal et al., IEEE TMI 2004"])
        out, again = args.work / f"eval_{n}", 1
        while out.exists():  # an earlier measurement is kept; evaluate never writes over a folder
            again += 1
            out = args.work / f"eval_{n}_{again}"
        cmd = [mf, "evaluate", str(args.run_dir), str(shards), "--out", str(out), "eval.bootstrap=200"]
        print("$", " ".join(cmd), flush=True)
        peak, seconds = peak_rss_mb(cmd)
        report = json.loads((out / "eval.json").read_text())
        ext = report["external"][0]
        results[n] = {"peak_rss_mb": round(peak, 1), "seconds": round(seconds, 1), "images": ext["num_samples"],
                      "pixel_f1": ext["metrics"].get("pixel_f1"), "pixel_auc": ext["metrics"].get("pixel_auc")}
        print(f"N={n}: peak RSS {peak:,.0f} MB, {seconds:.0f} s", flush=True)
    first, last = results[counts[0]], results[counts[-1]]
    h, w = 584 * args.scale, 565 * args.scale
    exact_bytes = counts[-1] * h * w * 5  # float32 probability + uint8 label per pixel, before sorting
    result = {
        "benchmark": f"peak RSS of medfound evaluate on DRIVE test images resampled {args.scale:g}x "
                     f"({w:.0f} x {h:.0f} px), at {counts} images",
        "results": {str(k): v for k, v in results.items()},
        "ratio_peak_largest_over_smallest": round(last["peak_rss_mb"] / first["peak_rss_mb"], 3),
        "exact_pooled_auc_bytes_at_largest_mb": round(exact_bytes / 2 ** 20, 1),
        "note": "pooled pixel metrics from 4096-bin histograms per image; the peak is one image's inference "
                "(sliding window) and its probability map, whatever the number of images",
        "command": "python benchmarks/eval_memory.py " + " ".join(sys.argv[1:]),
        "cpu_count": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    save_result("eval_memory_drive", result, ("ratio_peak_largest_over_smallest",
                                              "exact_pooled_auc_bytes_at_largest_mb"))
    print(f"ratio={result['ratio_peak_largest_over_smallest']} (peak RSS at {counts[-1]} images / {counts[0]}); "
          f"an exact pooled AUROC would hold {result['exact_pooled_auc_bytes_at_largest_mb']:,.0f} MB of pixels")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
