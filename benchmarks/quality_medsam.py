"""Box-prompt segmentation (MedSAM recipe) on the SAM-Med2D CT slices: Dice per structure from ground-truth boxes.

    python benchmarks/quality_medsam.py      -> benchmarks/results/medsam_ct.json, benchmarks/results/medsam_demo.png

Two input modes of the same recipe: `whole` (MedSAM: the whole slice at 128 px, one encoding for all boxes) and
`crop` (head.crop_to_box=0.25: a window around each box, DEXTR-style).

Data: the 5 SAM-Med2D demo CT slices with 30 structure masks (bundled in data/ct_organs; the same files as
../shared/data/sam_med2d), split as SAM-Med2D's own JSON files do: 11 test masks on 2 slices (aorta, liver, IVC;
hips, femur, gluteus, colon), 19 train masks on the other 3. Steps: MAE-pretrain a small ViT on the training
slices only; train the box-prompt head and ViT (tuning=full) with boxes jittered by up to 20 px; evaluate Dice on
the test structures from their tight boxes at the original resolution. Beside it, the Dice of filling the box
(what a box alone gives), so the number says what the decoder adds. The MedSAM tutorial box [95, 255, 190, 350]
on medsam_img_demo.png is segmented as the usage example (no ground truth is published for it).

Scale: MedSAM trains SAM's ViT-B on 1.57 M image-mask pairs; this is 19 masks on 3 slices in minutes on a CPU, so
it measures that the recipe learns and generalises a little to unseen structures, not MedSAM's accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from _quality import ROOT, backbone_record, medfound_bin, run, save_result

CT = ROOT / "data" / "ct_organs"


def box_fill_dice(run_dir: Path) -> dict[str, float]:
    """Dice of predicting the whole tight box as the structure, per test sample of the run's eval.json."""
    from PIL import Image

    report = json.loads((run_dir / "eval.json").read_text())
    out = {}
    for row in report["per_sample"]:
        name = row["key"].split("_", 1)[1]  # images_<stem>_<mask stem>
        mask_file = next(p for p in (CT / "masks").iterdir() if name.endswith(p.stem))
        m = np.asarray(Image.open(mask_file).convert("L")) > 0
        x0, y0, x1, y1 = (int(round(v)) for v in row["box"])
        box = np.zeros_like(m)
        box[y0:y1 + 1, x0:x1 + 1] = True
        out[row["key"]] = 2 * float((box & m).sum()) / float(box.sum() + m.sum())
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench" / "medsam")
    ap.add_argument("--pretrain-steps", type=int, default=400)
    ap.add_argument("--steps", type=int, default=1500, help="whole-image mode")
    ap.add_argument("--crop-steps", type=int, default=800, help="crop_to_box mode")
    args = ap.parse_args()
    mf, start = medfound_bin(), time.time()
    shards = args.work / "shards"
    if not (shards / "manifest.json").is_file():
        run([mf, "shard", "images", str(CT), "--table", str(CT / "organs.csv"), "--out", str(shards), "--name",
             "ct_organs", "--modality", "ct", "--keep-names"])
    backbone = args.work / "mae" / "export"
    pretrain = ["pretrain/drive_mae_small.yaml", f"data.shards=[{shards}]", "data.crop_scale=[0.1,0.5]",
                "data.num_workers=0", "data.batch_size=16", f"trainer.max_steps={args.pretrain_steps}"]
    if not (backbone / "model.safetensors").is_file():
        run([mf, "pretrain", *pretrain, f"trainer.output_dir={args.work / 'mae'}", "trainer.resume=null"])
    modes = {}
    for mode, steps, extra in (("whole", args.steps, []), ("crop", args.crop_steps, ["head.crop_to_box=0.25"])):
        out = args.work / f"medsam_{mode}"
        finetune = ["adapt/medsam.yaml", f"backbone.weights={backbone}", f"data.shards=[{shards}]",
                    f"trainer.max_steps={steps}", f"trainer.checkpoint_every={steps}", *extra]
        if not (out / "eval.json").is_file():
            run([mf, "finetune", *finetune, f"trainer.output_dir={out}", "trainer.resume=null"])
        report = json.loads((out / "eval.json").read_text())
        fill = box_fill_dice(out)
        per_structure = {}
        for row in report["per_sample"]:
            s = per_structure.setdefault(row["structure"], {"dice": [], "box_fill_dice": []})
            s["dice"].append(row["dice"])
            s["box_fill_dice"].append(fill[row["key"]])
        modes[mode] = {"dice": report["metrics"]["dice"],
                       "dice_by_structure_mean": report["metrics"]["dice_by_structure_mean"],
                       "box_fill_dice": round(float(np.mean(list(fill.values()))), 4),
                       "per_structure": {k: {"dice": round(float(np.mean(v["dice"])), 4), "box_fill_dice":
                                             round(float(np.mean(v["box_fill_dice"])), 4), "n": len(v["dice"])}
                                         for k, v in sorted(per_structure.items())},
                       "steps": steps, "command": "medfound finetune " + " ".join(finetune)}
    best = "crop"  # the mode this repository recommends with few training masks (docs/adapt.md); both are reported
    out = args.work / f"medsam_{best}"
    demo = args.work / "demo"
    run([mf, "prompt", str(out), str(CT / "medsam_img_demo.png"), "--box", "95,255,190,350", "--out", str(demo)])
    (ROOT / "benchmarks" / "results" / "medsam_demo.png").write_bytes((demo / "overlay.png").read_bytes())
    result = {"dataset": "SAM-Med2D demo CT slices (data/ct_organs; 11 test structures on 2 slices)",
              "mode": best, "dice": modes[best]["dice"], "dice_by_structure_mean": modes[best]["dice_by_structure_mean"],
              "box_fill_dice": modes[best]["box_fill_dice"], "per_structure": modes[best]["per_structure"],
              "modes": modes,
              "model": "ViT-Tiny/8 at 128 px (6 blocks) MAE-pretrained on the 3 training slices, box-prompt "
                       "encoder + two-way decoder (128-d), tuning=full, boxes jittered by up to 20 px, augmented",
              "command": "python benchmarks/quality_medsam.py",
              "pretraining": backbone_record(backbone, "pretrain/drive_mae_small.yaml (CT overrides)",
                                             "medfound pretrain " + " ".join(pretrain)),
              "usage_example": {"image": "data/ct_organs/medsam_img_demo.png", "box": [95, 255, 190, 350],
                                "overlay": "benchmarks/results/medsam_demo.png",
                                "command": f"medfound prompt {out.relative_to(ROOT)} data/ct_organs/medsam_img_demo.png "
                                           "--box 95,255,190,350 --out runs/medsam_demo"},
              "minutes": round((time.time() - start) / 60, 1), "hardware": "2 CPU cores"}
    result = json.loads(json.dumps(result).replace(f"{ROOT}/", ""))  # repository-relative paths in the record
    save_result("medsam_ct", result, ("dice", "box_fill_dice", "dice_by_structure_mean"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
