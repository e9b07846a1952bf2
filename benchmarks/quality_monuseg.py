"""MoNuSeg nuclei (H&E, 40x, TCGA) on HoVer-Net's Kumar split: 16 training tiles, 14 test tiles (8 from organs
seen in training, 6 from others). Binary nuclei-vs-background Dice, the U-Net baseline beside the ViT decoder.

    python benchmarks/quality_monuseg.py --model unet        -> benchmarks/results/monuseg_unet.json
    python benchmarks/quality_monuseg.py --model vit_unetr   -> benchmarks/results/monuseg_vit_unetr.json
                                                                (MAE-pretrains the small ViT on the 16 training tiles first)

HoVer-Net reports Dice 0.826 on this split, but this copy of the data has 16,958 nuclei where the paper counts 21,623
(see ../shared/data/monuseg/PROVENANCE.txt), so the numbers here are for side-by-side comparison only. The data are
CC BY-NC-SA and stay in ../shared/data; the binary masks derived from the instance labels are written under --work.
Every sample carries its TCGA tissue source site (the barcode's second field) as `site`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path


from _quality import ROOT, SHARED, backbone_record, medfound_bin, monuseg_table, run, save_result
MONUSEG = SHARED / "monuseg"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["unet", "vit_unetr"], default="unet")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench" / "monuseg")
    ap.add_argument("overrides", nargs="*", help="recipe overrides, e.g. trainer.max_steps=1000")
    args = ap.parse_args()
    if not MONUSEG.is_dir():
        print(f"MoNuSeg is not at {MONUSEG}: this benchmark needs ../shared/data/monuseg", file=sys.stderr)
        return 2
    mf = medfound_bin()
    start = time.time()
    shards = args.work / "shards"
    if not (shards / "manifest.json").is_file():
        table = monuseg_table(MONUSEG, args.work)
        run([mf, "shard", "images", str(MONUSEG), "--table", str(table), "--out", str(shards), "--name", "monuseg",
             "--mpp", "0.25", "--modality", "pathology", "--keep-names", "--license", "CC-BY-NC-SA-4.0",
             "--attribution", "MoNuSeg, Kumar et al., IEEE TMI 2017"])
    out = args.work / args.model
    common = [f"data.shards=[{shards}]", f"trainer.output_dir={out}", "segment.roi=null",
              "segment.class_names=[background,nucleus]", "segment.crops_per_image=8", "segment.hd95=false"]
    if args.model == "unet":
        recipe = "adapt/segment_unet.yaml"
        overrides = common + ["trainer.max_steps=1500"]
    else:
        recipe = "adapt/segment_vit_unetr_lora.yaml"
        backbone = args.work / "mae" / "export"
        if not (backbone / "model.safetensors").is_file():
            run([mf, "pretrain", "pretrain/drive_mae_small.yaml", f"data.shards=[{shards}]", "data.augment=he",
                 "data.crop_scale=[0.015,0.06]", "data.batch_size=16", "trainer.max_steps=400",
                 f"trainer.output_dir={args.work / 'mae'}", "trainer.resume=null"])
        overrides = common + [f"backbone.weights={backbone}", "trainer.max_steps=1500"]
        pretrained = backbone_record(backbone, "pretrain/drive_mae_small.yaml (MoNuSeg overrides)",
                                     f"medfound pretrain pretrain/drive_mae_small.yaml data.shards=[{str(shards).replace(f'{ROOT}/', '')}] "
                                     "data.augment=he data.crop_scale=[0.015,0.06] data.batch_size=16 "
                                     "trainer.max_steps=400")
    overrides += args.overrides
    if out.exists():
        shutil.rmtree(out)
    run([mf, "finetune", recipe, *overrides])
    report = json.loads((out / "eval.json").read_text())
    m = report["metrics"]
    result = {
        "benchmark": "MoNuSeg nuclei, HoVer-Net Kumar split (16 train / 14 test tiles), binary foreground",
        "model": args.model, "dice": m["dice"], "pixel_f1": m["pixel_f1"], "pixel_auc": m["pixel_auc"],
        "minutes": round((time.time() - start) / 60, 1),
        "command": f"python benchmarks/quality_monuseg.py --model {args.model}" + "".join(f" {o}" for o in args.overrides),
        "finetune_command": shlex.join(["medfound", "finetune", recipe, *overrides]).replace(f"{ROOT}/", ""),
        "reference": {"hover_net_dice": 0.826, "note": "HoVer-Net (Graham et al. 2019) on the full annotation; this "
                      "copy has fewer annotated nuclei, so compare the rows here with each other"},
    }
    if args.model == "vit_unetr":
        result["backbone"] = pretrained
    save_result(f"monuseg_{args.model}", result, ("model", "dice", "pixel_f1", "minutes"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
