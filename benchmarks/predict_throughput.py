"""Images/s of `medfound predict` beside the loop a user would write by hand, on the same images, in one run.

    python benchmarks/predict_throughput.py [--images 256] [--size 224] [--repeats 3]

Two tasks, each a freshly made run (a few training steps: the weights do not change the speed):
- classification: a ViT-S/16 at 224 px (timm `vit_small_patch16_224`, random init, `adapt/demo_classify_lora.yaml`
  with tuning=full) on PNG files made from PneumoniaMNIST's test images resized to `--size` px (../shared/data).
  medfound: `medfound.predict.predict(run, [folder], out)`: the files ingested into a private shard set, read by the
  evaluation transform, batched (data.eval_batch_size), predictions.csv written. Plain: `timm.create_model` of the
  export, then PIL open + RGB + torchvision Resize(bicubic, antialias) + ToTensor + Normalize per file, batches of the
  same size, softmax, rows kept in a list (no file written): the least a user would write.
- segmentation: MONAI's residual U-Net (`adapt/segment_unet.yaml`, channels 16-32-64-128) on copies of the bundled
  512-px CT slices. medfound: `predict` writing one PNG mask per input. Plain: the network loaded from the export,
  PIL open + per-image z-score by hand + MONAI `sliding_window_inference` (the same patch, overlap, Gaussian
  blending) + argmax, masks kept in memory.

Repeats are interleaved (medfound, plain, medfound, ...) and the medians compared; prints images/s and `ratio=`
(medfound / plain; the issue's target is >= 0.9) and writes benchmarks/results/predict_throughput.json. medfound's
time includes ingesting the files (decode, de-identification checks, shard writing) and writing the outputs, which
the plain loop skips: that is the price of reading exactly as training did. Measurements of this machine, not
assertions.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = (ROOT.parent / "shared" / "data").resolve()


def make_images(folder: Path, n: int, size: int) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True)
    with np.load(SHARED / "medmnist" / "pneumoniamnist.npz") as z:
        images = z["test_images"][:n]
    paths = []
    for i, img in enumerate(images):
        p = folder / f"case_{i:04d}.png"
        Image.fromarray(img).resize((size, size), Image.BICUBIC).save(p)
        paths.append(p)
    return paths


def classification_run(work: Path, size: int) -> Path:
    from medfound.config import load_recipe
    from medfound.workflows import run_finetune, shard

    shards = work / "pneumonia"
    shard("npz", SHARED / "medmnist" / "pneumoniamnist.npz", shards, name="pneumoniamnist", modality="cxr",
          label_names=["normal", "pneumonia"], max_count=2000)
    run = work / "cls"
    run_finetune(load_recipe(ROOT / "adapt" / "demo_classify_lora.yaml", [
        "backbone.weights=null", "backbone.name=vit_small_patch16_224", "tuning=full", f"data.shards=[{shards}]",
        f"data.img_size={size}", "data.batch_size=8", "data.eval_batch_size=64", f"trainer.output_dir={run}",
        "trainer.max_steps=2", "trainer.progress=false", "trainer.loggers=[]", "eval.bootstrap=0",
        "eval.split=val", "trainer.checkpoint_every=1000"]))
    return run


def segmentation_run(work: Path) -> Path:
    from medfound.config import load_recipe
    from medfound.workflows import run_finetune, shard

    shards = work / "ct"
    shard("images", ROOT / "data" / "ct_organs", shards, table=ROOT / "data" / "ct_organs" / "aorta.csv",
          name="ct_aorta", modality="ct", keep_names=True)
    run = work / "seg"
    run_finetune(load_recipe(ROOT / "adapt" / "segment_unet.yaml", [
        f"data.shards=[{shards}]", "segment.roi=null", "segment.class_names=null", "segment.patch_size=[128,128]",
        "head.channels=[16,32,64,128]", "data.batch_size=2", "data.shuffle_buffer=4", f"trainer.output_dir={run}",
        "trainer.max_steps=2", "trainer.progress=false", "trainer.loggers=[]", "eval.bootstrap=0",
        "trainer.checkpoint_every=1000"]))
    return run


def plain_classification(run: Path, paths: list[Path], size: int, batch: int) -> int:
    import timm
    import torchvision.transforms as T
    from PIL import Image

    model = timm.create_model(f"local-dir:{run / 'export'}", pretrained=True).eval()
    cfg = model.pretrained_cfg
    tf = T.Compose([T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC, antialias=True), T.ToTensor(),
                    T.Normalize(cfg["mean"], cfg["std"])])
    rows = []
    with torch.no_grad():
        for i in range(0, len(paths), batch):
            x = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths[i:i + batch]])
            rows += torch.softmax(model(x), 1).tolist()
    return len(rows)


def plain_segmentation(run: Path, paths: list[Path]) -> int:
    from monai.inferers import sliding_window_inference
    from PIL import Image

    from medfound.run import read_run
    from medfound.tasks import task_for

    r = read_run(run)
    seg = r.recipe.segment
    model = task_for(r.recipe).load(run, r.recipe)
    masks = []
    with torch.no_grad():
        for p in paths:
            x = torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32)).permute(2, 0, 1)
            x = (x - x.mean(dim=(1, 2), keepdim=True)) / x.std(dim=(1, 2), keepdim=True).clamp_min(1e-8)
            logits = sliding_window_inference(x[None], seg.patch_size, 4, model, overlap=seg.overlap, mode="gaussian")
            masks.append(logits.argmax(1)[0].numpy().astype(np.uint8))
    return len(masks)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--seg-images", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if not (SHARED / "medmnist" / "pneumoniamnist.npz").is_file():
        print("../shared/data/medmnist/pneumoniamnist.npz is missing", file=sys.stderr)
        return 2
    from medfound.predict import predict

    torch.set_num_threads(max(1, torch.get_num_threads()))
    result = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "images": args.images, "size": args.size, "repeats": args.repeats}
    with tempfile.TemporaryDirectory(prefix="medfound-predict-bench-") as tmp:
        work = Path(tmp)
        paths = make_images(work / "images", args.images, args.size)
        cls = classification_run(work, args.size)
        ct = sorted((ROOT / "data" / "ct_organs" / "images").glob("*.png"))
        seg_folder = work / "ct_images"
        seg_folder.mkdir()
        seg_paths = []
        for i in range(args.seg_images):
            dest = seg_folder / f"slice_{i:03d}.png"
            shutil.copyfile(ct[i % len(ct)], dest)
            seg_paths.append(dest)
        seg = segmentation_run(work)
        for task, run, inputs, plain in (
                ("classification", cls, paths, lambda: plain_classification(cls, paths, args.size, 64)),
                ("segmentation", seg, seg_paths, lambda: plain_segmentation(seg, seg_paths))):
            ours, theirs = [], []
            for r in range(args.repeats):
                out = work / f"out_{task}_{r}"
                folder = str(inputs[0].parent)
                ours.append(timed(lambda m=run, f=folder, o=out: predict(m, [f], o, progress=False)))
                theirs.append(timed(plain))
            n = len(inputs)
            a, b = n / statistics.median(ours), n / statistics.median(theirs)
            result[task] = {"medfound_img_s": round(a, 2), "plain_img_s": round(b, 2), "ratio": round(a / b, 3),
                            "seconds": {"medfound": [round(t, 2) for t in ours],
                                        "plain": [round(t, 2) for t in theirs]}}
            print(f"{task}: medfound predict {a:.1f} img/s, plain loop {b:.1f} img/s, ratio={a / b:.3f}")
    dest = ROOT / "benchmarks" / "results" / "predict_throughput.json"
    dest.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
