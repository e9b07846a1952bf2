"""Distribution shift on a real split of sites: MoNuSeg nuclei (H&E, TCGA), trained on the 16 Kumar training tiles
(10 tissue source sites), tested on the 6 test tiles from those sites (internal) and on the 8 test tiles from 8
sites never seen in training (external, `eval.external`). Three arms, the same U-Net recipe and steps:

    baseline        segment_unet.yaml as in quality_monuseg.py
    site_balanced   + data.balanced_sampling=site (TCGA-G9 has 4 training tiles, most sites 1)
    stain_norm      + data.stain_normalize=true (Macenko, MONAI NormalizeHEStains; training and evaluation)

    python benchmarks/quality_sites.py [--steps 800]   -> benchmarks/results/monuseg_sites.json

Each arm's eval.json holds Dice with 95% bootstrap intervals (over images), per site, and the external drop with the
interval of the difference. With 6 and 8 test tiles the intervals are wide: read the rows as a measurement of how
large the shift is and whether an option moves it, not as a ranking.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from _quality import ROOT, SHARED, medfound_bin, run, save_result, write_csv

MONUSEG = SHARED / "monuseg"
ARMS = {"baseline": [], "site_balanced": ["data.balanced_sampling=site"], "stain_norm": ["data.stain_normalize=true"]}


def spread(by_site: dict[str, float]) -> dict:
    """How evenly a model does across the unseen sites: the worst site and the standard deviation over sites."""
    worst = min(by_site, key=by_site.get)
    return {"external_worst_site": [worst, by_site[worst]],
            "external_site_sd": float(np.std(list(by_site.values())))}


def site(tile: str) -> str:
    return f"TCGA-{tile.split('-')[1]}"


def tables(src: Path, work: Path) -> tuple[Path, Path, dict]:
    split = json.loads((src / "kumar_split_hovernet.json").read_text())
    masks = work / "binary_masks"
    masks.mkdir(parents=True, exist_ok=True)
    train_sites = {site(i) for i in split["train"]}
    test = split["test_same_tissue"] + split["test_different_tissue"]
    internal = [i for i in test if site(i) in train_sites]
    external = [i for i in test if site(i) not in train_sites]

    def row(i: str, part: str) -> dict:
        inst = np.asarray(Image.open(src / "instance_labels" / f"{i}_inst.png"))
        Image.fromarray(((inst > 0) * 255).astype(np.uint8)).save(masks / f"{i}.png")
        return {"path": f"images/{i}.png", "mask": str(masks / f"{i}.png"), "split": part, "site": site(i)}

    a = write_csv([row(i, "train") for i in split["train"]] + [row(i, "test") for i in internal],
                  work / "internal.csv")
    b = write_csv([row(i, "test") for i in external], work / "external.csv")
    return a, b, {"train_tiles": len(split["train"]), "train_sites": sorted(train_sites),
                  "internal_test": internal, "external_test": external,
                  "external_sites": sorted({site(i) for i in external})}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--arms", nargs="*", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench" / "monuseg_sites")
    args = ap.parse_args()
    if not MONUSEG.is_dir():
        print(f"MoNuSeg is not at {MONUSEG}: this benchmark needs ../shared/data/monuseg", file=sys.stderr)
        return 2
    mf = medfound_bin()
    internal, external = args.work / "internal", args.work / "external"
    a, b, split = tables(MONUSEG, args.work)
    for table, out, name in ((a, internal, "monuseg_train_sites"), (b, external, "monuseg_unseen_sites")):
        if not (out / "manifest.json").is_file():
            run([mf, "shard", "images", str(MONUSEG), "--table", str(table), "--out", str(out), "--name", name,
                 "--modality", "pathology", "--keep-names", "--license", "CC-BY-NC-SA-4.0",
                 "--attribution", "MoNuSeg, Kumar et al., IEEE TMI 2017"])
    rows = {}
    for arm in args.arms:
        start = time.time()
        out = args.work / arm
        overrides = [f"data.shards=[{internal}]", f"eval.external=[{external}]", f"trainer.output_dir={out}",
                     "segment.roi=null", "segment.class_names=[background,nucleus]", "segment.crops_per_image=8",
                     "segment.hd95=false", f"trainer.max_steps={args.steps}", *ARMS[arm]]
        if out.exists():
            shutil.rmtree(out)
        run([mf, "finetune", "adapt/segment_unet.yaml", *overrides])
        r = json.loads((out / "eval.json").read_text())
        (e,) = r["external"]
        rows[arm] = {
            "internal_dice": r["metrics"]["dice"], "internal_ci": r["intervals"]["dice"],
            "external_dice": e["metrics"]["dice"], "external_ci": e["intervals"]["dice"],
            "drop": e["drop"]["dice"], "drop_ci": e["drop_intervals"]["dice"],
            "internal_by_site": {k: v["dice"] for k, v in r["by_site"].items()},
            "external_by_site": {k: v["dice"] for k, v in e["by_site"].items()},
            **spread({k: v["dice"] for k, v in e["by_site"].items()}),
            "minutes": round((time.time() - start) / 60, 1),
            "finetune_command": shlex.join(["medfound", "finetune", "adapt/segment_unet.yaml", *overrides]).replace(
                f"{ROOT}/", ""),
        }
        print(f"{arm}: internal Dice {rows[arm]['internal_dice']:.3f} {rows[arm]['internal_ci']}, external "
              f"{rows[arm]['external_dice']:.3f} {rows[arm]['external_ci']}, drop {rows[arm]['drop']:+.3f} "
              f"{rows[arm]['drop_ci']}", flush=True)
    previous = ROOT / "benchmarks" / "results" / "monuseg_sites.json"
    kept = json.loads(previous.read_text())["arms"] if previous.is_file() else {}
    result = {
        "benchmark": "MoNuSeg site split: train on 16 Kumar training tiles (10 TCGA sites); internal test = 6 test "
                     "tiles from those sites; external = 8 test tiles from 8 unseen sites",
        "split": split, "steps": args.steps, "arms": {**kept, **rows},
        "command": f"python benchmarks/quality_sites.py --steps {args.steps}",
    }
    save_result("monuseg_sites", result, ("steps",))
    for arm, r in result["arms"].items():
        print(f"{arm:14s} internal {r['internal_dice']:.3f} {r['internal_ci']}  external {r['external_dice']:.3f} "
              f"{r['external_ci']}  drop {r['drop']:+.3f} {r['drop_ci']}  worst site {r['external_worst_site']}  "
              f"site sd {r['external_site_sd']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
