"""Ingest speed: `medfound shard` at 1 and N workers beside a plain loop doing the same decode + PNG encode.

Three real archives, built once from real files:
- dicom:  the decodable files of ../shared/data/dicom (CT, MR, CR, US; uncompressed, JPEG lossless, JPEG 2000),
          each written `--copies` times with a new SOPInstanceUID and PatientID (so none is a duplicate);
- images: `--copies` x 8 PNG crops (512 x 512) cut from the bundled CC0 H&E slide, with a label table;
- wsi:    the bundled CC0 slide as 4 slide files, tiled at 0.5 um/px into 224-px tiles (no tissue threshold).

Each is ingested by `medfound.workflows.shard` (all checks, de-identification, split by patient, manifest) with
`--workers 1` and `--workers N`, and by a plain loop that only decodes and PNG-encodes the same pixels in one
process: pydicom `dcmread` + `pixel_array`, PIL `Image.open`, tiffslide `read_region` per tile. Repeats alternate.

    python benchmarks/ingest_throughput.py [--workers 2] [--copies 20] [--repeats 3]

Prints files/s (slides/s for wsi), the speed-up (`ratio=` N workers / 1 worker) and medfound / plain
(`ratio=` at 1 worker: what the checks, de-identification and bookkeeping cost) and writes
benchmarks/results/ingest_throughput.json. Measurements of this machine, not assertions.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SLIDE = ROOT / "data" / "wsi" / "CMU-1-Small-Region.svs"


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def build_dicom(work: Path, copies: int) -> Path:
    import pydicom
    from pydicom.uid import generate_uid

    src = ROOT.parent / "shared" / "data" / "dicom"
    if not src.is_dir():
        raise SystemExit(f"{src} is absent: the dicom archive needs ../shared/data/dicom")
    out = work / "dicom"
    out.mkdir()
    good = []
    for p in sorted(src.glob("*.dcm")):
        try:
            ds = pydicom.dcmread(p)
            ds.pixel_array  # noqa: B018 - decodable here?
            if str(ds.get("Modality", "")) in ("US", "SC", "OT") and ds.get("BurnedInAnnotation") != "NO":
                continue  # medfound refuses possible burned-in PHI; the plain loop would not: keep the sets equal
            good.append(p)
        except Exception:
            continue
    for k in range(copies):
        for p in good:
            ds = pydicom.dcmread(p)
            ds.SOPInstanceUID = generate_uid()
            ds.PatientID = f"P{k:04d}"
            ds.save_as(out / f"{k:04d}_{p.name}", enforce_file_format=False)
    return out


def build_images(work: Path, copies: int) -> Path:
    import tiffslide

    out = work / "images"
    out.mkdir()
    slide = tiffslide.TiffSlide(str(SLIDE))
    w, h = slide.dimensions
    rng = np.random.default_rng(0)
    rows = ["path,label,patient_id"]
    for i in range(copies * 8):
        x, y = int(rng.integers(0, w - 512)), int(rng.integers(0, h - 512))
        slide.read_region((x, y), 0, (512, 512)).convert("RGB").save(out / f"crop{i:05d}.png")
        rows.append(f"crop{i:05d}.png,{'ab'[i % 2]},p{i // 4}")
    (out / "labels.csv").write_text("\n".join(rows) + "\n")
    return out


def build_wsi(work: Path) -> Path:
    out = work / "wsi"
    out.mkdir()
    for k in range(4):
        shutil.copy(SLIDE, out / f"slide{k}.svs")
    return out


def plain(kind: str, folder: Path) -> int:
    """The same decode + PNG encode in one plain loop; returns the number of files."""
    if kind == "dicom":
        import pydicom

        files = sorted(folder.iterdir())
        for p in files:
            a = pydicom.dcmread(p).pixel_array
            frames = a if a.ndim == 3 and a.shape[-1] not in (3, 4) else [a]
            for f in frames:
                f = np.asarray(f)
                _png(f.astype(np.uint16) if f.dtype not in (np.uint8, np.uint16) else f)
        return len(files)
    if kind == "images":
        files = sorted(folder.glob("*.png"))
        for p in files:
            with Image.open(p) as im:
                _png(np.asarray(im.convert("RGB")))
        return len(files)
    import tiffslide

    files = sorted(folder.glob("*.svs"))
    for p in files:
        slide = tiffslide.TiffSlide(str(p))
        w, h = slide.dimensions
        for y in range(0, h - 223, 224):
            for x in range(0, w - 223, 224):
                _png(np.asarray(slide.read_region((x, y), 0, (224, 224)).convert("RGB")))
        slide.close()
    return len(files)


def ours(kind: str, folder: Path, out: Path, workers: int) -> int:
    from medfound.workflows import shard

    opts = {"dicom": dict(split_fractions={"train": 0.8, "test": 0.2}), "images": dict(),
            "wsi": dict(mpp=0.5, tile_size=224, min_tissue=0.0, keep_names=True)}[kind]
    shard(kind, folder, out, name=kind, workers=workers, overwrite=True, **opts)
    return sum(1 for p in folder.iterdir() if p.suffix in (".dcm", ".png", ".svs"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--copies", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kinds", default="dicom,images,wsi")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ingest_throughput.json"))
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for kind in args.kinds.split(","):
            folder = {"dicom": lambda: build_dicom(work, args.copies), "images": lambda: build_images(work, args.copies),
                      "wsi": lambda: build_wsi(work)}[kind]()
            times: dict[str, list[float]] = {"plain": [], "workers_1": [], f"workers_{args.workers}": []}
            n = 0
            for r in range(args.repeats + 1):  # the first round warms the page cache and is not counted
                for name in times:
                    start = time.perf_counter()
                    if name == "plain":
                        n = plain(kind, folder)
                    else:
                        ours(kind, folder, work / f"out_{kind}", int(name.split("_")[1]))
                    if r:
                        times[name].append(time.perf_counter() - start)
            med = {k: statistics.median(v) for k, v in times.items()}
            rate = {k: n / v for k, v in med.items()}
            speedup = rate[f"workers_{args.workers}"] / rate["workers_1"]
            vs_plain = rate["workers_1"] / rate["plain"]
            unit = "slides" if kind == "wsi" else "files"
            print(f"{kind:7s} {n} {unit}: plain {rate['plain']:.1f}/s, medfound 1 worker {rate['workers_1']:.1f}/s, "
                  f"{args.workers} workers {rate[f'workers_{args.workers}']:.1f}/s; speed-up ratio={speedup:.2f}; "
                  f"medfound/plain ratio={vs_plain:.2f}")
            results[kind] = {"inputs": n, "unit": unit, "seconds": times, "per_s": rate, "speedup": speedup,
                             "ratio_vs_plain": vs_plain}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": "python benchmarks/ingest_throughput.py " + " ".join(sys.argv[1:]),
                                          "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                                          "settings": vars(args), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
