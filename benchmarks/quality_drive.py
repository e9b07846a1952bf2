"""DRIVE retinal-vessel segmentation: train on the 20 training images, score the 20 test images inside the FOV.

    python benchmarks/quality_drive.py --model unet        # CNN baseline  -> benchmarks/results/drive_unet.json
    python benchmarks/quality_drive.py --model vit_unetr   # MAE-pretrained ViT + UNETR decoder (LoRA)
                                                           #               -> benchmarks/results/drive_vit_unetr.json
    python benchmarks/quality_drive.py --shard-only --shards runs/drive/shards

Published (Alom et al. 2018, as the shared data README lists): U-Net F1 0.8142, AUC 0.9755; SA-UNet F1 0.8263,
AUC 0.9864; a second human observer F1 about 0.79. The data stay in ../shared/data/drive (research-use terms):
this script writes a table there-relative and shards from it; nothing is copied into the repository.

Safe to rerun: an existing run folder is never deleted. A finished run (eval.json present) is reused as it is, an
unfinished one continues from its checkpoint (`trainer.resume=auto`; medfound refuses the resume if the recipe
changed). A run with recipe overrides (e.g. `trainer.max_steps=300`) is a reduced run: its result goes to
`benchmarks/results/drive_MODEL_partial.json`, never over the committed `drive_MODEL.json`, unless `--force`.

Threads and time: torch uses one thread per core by default. On a machine shared with other jobs, set
OMP_NUM_THREADS to the cores left free (`OMP_NUM_THREADS=2 python benchmarks/quality_drive.py` on this 2-core
machine when nothing else runs); more threads than free cores slows every step. The result records the minutes,
OMP_NUM_THREADS, the core count and the 1-minute load average at the start and end, so a time is read at its load.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from _quality import ROOT, SHARED, backbone_record, drive_table, medfound_bin, run, save_result
DRIVE = SHARED / "drive"
PUBLISHED = {"unet": {"f1": 0.8142, "auc": 0.9755, "source": "U-Net as reported by Alom et al. 2018 (R2U-Net)"},
             "sa_unet": {"f1": 0.8263, "auc": 0.9864, "source": "SA-UNet, Guo et al. 2020"}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["unet", "vit_unetr"], default="unet")
    ap.add_argument("--shards", type=Path, default=ROOT / "runs" / "bench" / "drive" / "shards")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench" / "drive")
    ap.add_argument("--shard-only", action="store_true")
    ap.add_argument("--backbone", type=Path, help="vit_unetr: a pretrained export (default: MAE-pretrain one on "
                                                  "the DRIVE training images first)")
    ap.add_argument("--force", action="store_true", help="write a reduced run (with overrides) over the committed "
                                                         "results/drive_MODEL.json instead of *_partial.json")
    ap.add_argument("overrides", nargs="*", help="recipe overrides, e.g. trainer.max_steps=3000")
    args = ap.parse_args()
    if not DRIVE.is_dir():
        print(f"DRIVE is not at {DRIVE}: this benchmark needs ../shared/data/drive", file=sys.stderr)
        return 2
    import os

    mf = medfound_bin()
    start = time.time()
    load_start = os.getloadavg()[0]
    if not (args.shards / "manifest.json").is_file():
        table = drive_table(DRIVE, args.work / "drive_table.csv")
        run([mf, "shard", "images", str(DRIVE), "--table", str(table), "--out", str(args.shards), "--name", "drive",
             "--modality", "fundus", "--keep-names", "--license", "DRIVE research-use terms",
             "--attribution", "DRIVE, Staal et al., IEEE TMI 2004"])
    if args.shard_only:
        return 0
    out = args.work / args.model
    if args.model == "unet":
        recipe = "adapt/segment_unet.yaml"
        overrides = [f"data.shards=[{args.shards}]", f"trainer.output_dir={out}", "trainer.resume=auto"]
    else:
        recipe = "adapt/segment_vit_unetr_lora.yaml"
        backbone = args.backbone
        if backbone is None:
            backbone = args.work / "mae" / "export"
            if not (backbone / "model.safetensors").is_file():
                run([mf, "pretrain", "pretrain/drive_mae_small.yaml", f"data.shards=[{args.shards}]",
                     f"trainer.output_dir={args.work / 'mae'}"])
        overrides = [f"data.shards=[{args.shards}]", f"trainer.output_dir={out}", f"backbone.weights={backbone}",
                     "trainer.resume=auto"]
        pretrained = backbone_record(backbone, "pretrain/drive_mae_small.yaml",
                                     f"medfound pretrain pretrain/drive_mae_small.yaml data.shards=[{args.shards}]".replace(f"{ROOT}/", ""))
    overrides += args.overrides
    if (out / "eval.json").is_file():  # finished earlier: reuse it (never delete a run folder)
        print(f"{out} has finished (eval.json): reusing it; move it away to train again", flush=True)
    else:  # new, or an interrupted run that continues from its checkpoint
        run([mf, "finetune", recipe, *overrides])
    minutes = (time.time() - start) / 60
    report = json.loads((out / "eval.json").read_text())
    m = report["metrics"]
    result = {
        "benchmark": "DRIVE retinal vessels, 20 train / 20 test images, scored inside the FOV mask",
        "model": args.model, "f1": m["pixel_f1"], "auc": m["pixel_auc"], "sensitivity": m["pixel_sensitivity"],
        "specificity": m["pixel_specificity"], "accuracy": m["pixel_accuracy"], "dice_per_image": m["dice"],
        "hd95_px": m.get("hd95"), "minutes": round(minutes, 1),
        "command": f"python benchmarks/quality_drive.py --model {args.model}" + "".join(f" {o}" for o in args.overrides),
        "finetune_command": shlex.join(["medfound", "finetune", recipe, *overrides]).replace(f"{ROOT}/", ""),
        "hardware": subprocess.run([sys.executable, "-c", "from medfound.publish.export import hardware; "
                                    "print(hardware())"], capture_output=True, text=True).stdout.strip(),
        "published": PUBLISHED, "target": {"f1": 0.80, "minutes": 60},
        "load": {"omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "cpu_count": os.cpu_count(),
                 "loadavg_1min_start": round(load_start, 2), "loadavg_1min_end": round(os.getloadavg()[0], 2)},
        "reduced": bool(args.overrides),
    }
    if args.model == "vit_unetr":
        result["backbone"] = pretrained  # minutes above: fine-tuning + evaluation; the pretraining's are here
    name = f"drive_{args.model}" + ("_partial" if args.overrides and not args.force else "")
    if name.endswith("_partial"):
        print(f"a reduced run (overrides {args.overrides}): writing results/{name}.json, not the committed "
              f"drive_{args.model}.json (--force writes it)", flush=True)
    save_result(name, result, ("model", "f1", "auc", "minutes"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
