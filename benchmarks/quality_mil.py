"""Slide-level attention MIL end to end on real H&E: MoNuSeg tiles as mini-slides (organ of origin) and the SVS slides.

    python benchmarks/quality_mil.py     -> benchmarks/results/mil_monuseg.json, mil_heatmap_*.png

MoNuSeg (../shared/data/monuseg, CC BY-NC-SA, stays there): each 1000x1000 40x tile is a mini-slide, cut into
128-px tiles at 0.25 µm/px (`medfound shard wsi`), labelled with its organ (organs.csv), split stratified by organ
(16 train / 14 test, every organ on both sides), the TCGA tissue source site as `site`. The tiles are embedded by
the frozen MAE ViT of `quality_monuseg.py --model vit_unetr` (pretrained on the 16 Kumar training tiles; made here
if missing), then gated-attention MIL trains on the bags. Beside it: the majority-class rate (chance).
The SVS slides (CMU-1-Small-Region.svs and the TCGA-CR sample) run the same path (tile -> extract -> ABMIL ->
heatmap) with the slide's origin as label; two slides cannot measure accuracy, only that it all works.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from _quality import ROOT, SHARED, backbone_record, medfound_bin, run, save_result, write_csv

MONUSEG = SHARED / "monuseg"
WSI = SHARED / "wsi"


def monuseg_slides(work: Path) -> Path:
    """MoNuSeg PNG tiles -> plain TIFF mini-slides + slides.csv (slide, label, split, site), split by organ."""
    import tifffile

    slides = work / "slides"
    slides.mkdir(parents=True, exist_ok=True)
    with open(MONUSEG / "organs.csv") as f:
        organs = {r["id"]: r["organ_as_listed_by_monuseg"] for r in csv.DictReader(f)}
    by_organ: dict[str, list[str]] = {}
    for i in sorted(organs):
        by_organ.setdefault(organs[i], []).append(i)
    rows = []
    for organ, ids in sorted(by_organ.items()):
        for j, i in enumerate(ids):
            tif = slides / f"{i}.tif"
            if not tif.is_file():
                tifffile.imwrite(tif, np.asarray(Image.open(MONUSEG / "images" / f"{i}.png").convert("RGB")))
            rows.append({"slide": tif.name, "label": organ, "split": "train" if j % 2 == 0 else "test",
                         "site": f"TCGA-{i.split('-')[1]}"})
    return write_csv(rows, work / "slides.csv")


def small_copy(src: Path, dest: Path, side: int = 512) -> None:
    """A heatmap for the repository: at most `side` px, palette PNG."""
    im = Image.open(src).convert("RGB")
    im.thumbnail((side, side))
    im.quantize(colors=256).save(dest, optimize=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench" / "mil")
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    if not MONUSEG.is_dir() or not WSI.is_dir():
        print(f"this benchmark needs {MONUSEG} and {WSI}", file=sys.stderr)
        return 2
    mf, start, work = medfound_bin(), time.time(), args.work
    backbone = ROOT / "runs" / "bench" / "monuseg" / "mae" / "export"
    if not (backbone / "model.safetensors").is_file():
        run([sys.executable, str(ROOT / "benchmarks" / "quality_monuseg.py"), "--model", "vit_unetr",
             "trainer.max_steps=1"])  # pretrains the backbone; the 1-step segmentation run is discarded
    table = monuseg_slides(work)
    tiles, bags = work / "tiles", work / "bags"
    if not (tiles / "manifest.json").is_file():
        run([mf, "shard", "wsi", str(work / "slides"), "--table", str(table), "--out", str(tiles), "--name",
             "monuseg_minislides", "--modality", "pathology", "--mpp", "0.25", "--slide-mpp", "0.25",
             "--tile-size", "128", "--min-tissue", "0.25", "--keep-names", "--license", "CC-BY-NC-SA-4.0"])
    if not (bags / "bags.json").is_file():
        run([mf, "extract", str(tiles), "--backbone", str(backbone), "--out", str(bags)])
    out = work / "abmil"
    finetune = ["adapt/uni_abmil.yaml", f"data.shards=[{bags}]", "head.hidden_dim=128", "head.attention_dim=64",
                "data.batch_size=4", "optim.lr=5e-4", "optim.weight_decay=1e-4", f"trainer.max_steps={args.steps}",
                "trainer.checkpoint_every=1000"]
    run([mf, "finetune", *finetune, f"trainer.output_dir={out}", "trainer.resume=null"])
    report = json.loads((out / "eval.json").read_text())
    test = [r for r in csv.DictReader(open(table)) if r["split"] == "test"]
    majority = Counter(r["label"] for r in csv.DictReader(open(table)) if r["split"] == "train").most_common(1)[0][0]
    chance = sum(r["label"] == majority for r in test) / len(test)
    heat = sorted((out / "heatmaps").glob("*.png"))[0]
    small_copy(heat, ROOT / "benchmarks" / "results" / "mil_heatmap_monuseg.png")

    # the SVS slides: the same path, end to end
    svs_dir = work / "svs"
    svs_dir.mkdir(parents=True, exist_ok=True)
    for name in ("CMU-1-Small-Region.svs", "TCGA-CR-7395-01A-01-TS1_small.svs"):
        if not (svs_dir / name).exists():
            (svs_dir / name).symlink_to(WSI / name)
    svs_table = write_csv([{"slide": "CMU-1-Small-Region.svs", "label": "cmu", "split": "train"},
                           {"slide": "TCGA-CR-7395-01A-01-TS1_small.svs", "label": "tcga_cr", "split": "train"}],
                          work / "svs.csv")
    if not (work / "svs_tiles" / "manifest.json").is_file():
        run([mf, "shard", "wsi", str(svs_dir), "--table", str(svs_table), "--out", str(work / "svs_tiles"),
             "--modality", "pathology", "--mpp", "1.0", "--slide-mpp", "0.5", "--tile-size", "128", "--keep-names"])
    if not (work / "svs_bags" / "bags.json").is_file():
        run([mf, "extract", str(work / "svs_tiles"), "--backbone", str(backbone), "--out", str(work / "svs_bags")])
    run([mf, "finetune", "adapt/uni_abmil.yaml", f"data.shards=[{work / 'svs_bags'}]", "eval.split=train",
         "head.hidden_dim=64", "head.attention_dim=32", "data.batch_size=2", "trainer.max_steps=50",
         f"trainer.output_dir={work / 'svs_abmil'}", "trainer.resume=null"])
    svs = json.loads((work / "svs_abmil" / "eval.json").read_text())
    small_copy(work / "svs_abmil" / "heatmaps" / "TCGA-CR-7395-01A-01-TS1_small.png",
               ROOT / "benchmarks" / "results" / "mil_heatmap_tcga_cr.png")
    index = json.loads((bags / "bags.json").read_text())
    result = {
        "dataset": "MoNuSeg tiles as mini-slides, organ of origin (7 classes), split stratified by organ",
        "split": {"train": len(index["slides"]) - len(test), "test": len(test)},
        "tiles": sum(s["tiles"] for s in index["slides"]),
        "accuracy": report["metrics"]["accuracy"], "balanced_accuracy": report["metrics"]["balanced_accuracy"],
        "auroc": report["metrics"]["auroc"], "chance_accuracy": round(chance, 4),
        "per_class": report["per_class"], "by_site": report["by_site"],
        "model": "gated-attention MIL (hidden 128, attention 64) on frozen ViT-Tiny/8 MAE features (MoNuSeg)",
        "command": "python benchmarks/quality_mil.py", "finetune_command": "medfound finetune " + " ".join(finetune),
        "backbone": backbone_record(backbone, "pretrain/drive_mae_small.yaml (MoNuSeg overrides, quality_monuseg.py)",
                                    "python benchmarks/quality_monuseg.py --model vit_unetr"),
        "svs": {"slides": [s["slide"] for s in svs["slides"]], "tiles": [s["tiles"] for s in json.loads(
                    (work / "svs_bags" / "bags.json").read_text())["slides"]],
                "train_accuracy": svs["metrics"]["accuracy"], "heatmap": "benchmarks/results/mil_heatmap_tcga_cr.png"},
        "heatmap": "benchmarks/results/mil_heatmap_monuseg.png",
        "minutes": round((time.time() - start) / 60, 1), "hardware": "2 CPU cores",
    }
    result = json.loads(json.dumps(result).replace(f"{ROOT}/", ""))  # repository-relative paths in the record
    save_result("mil_monuseg", result, ("accuracy", "balanced_accuracy", "chance_accuracy"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
