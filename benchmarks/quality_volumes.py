"""3-D correctness check: a 3-D U-Net overfits one labelled MRI volume (brain1, 256x256x25 at 0.78x0.78x6.5 mm,
a 4,137-voxel tumour) and must reach Dice >= 0.9 on it. A pipeline bug (misaligned crops, wrong axis order,
spacing mix-ups, broken sliding windows) keeps the Dice far below that.

    python benchmarks/quality_volumes.py       -> benchmarks/results/volumes_unet3d_overfit.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time

from _quality import ROOT, SHARED, medfound_bin, run, save_result
VOLUMES = SHARED / "volumes"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="recipe overrides, e.g. trainer.max_steps=600")
    extra = ap.parse_args().overrides
    if not VOLUMES.is_dir():
        print(f"the volumes are not at {VOLUMES}: this check needs ../shared/data/volumes", file=sys.stderr)
        return 2
    work = ROOT / "runs" / "bench" / "volumes"
    mf = medfound_bin()
    start = time.time()
    shards = work / "brain1"
    if not (shards / "manifest.json").is_file():
        work.mkdir(parents=True, exist_ok=True)
        (work / "brain1.csv").write_text("path,mask,split\nbrain1_image.nrrd,brain1_label.nrrd,train\n")
        run([mf, "shard", "volumes", str(VOLUMES), "--table", str(work / "brain1.csv"), "--out", str(shards),
             "--modality", "mr", "--keep-names"])
    out = work / "unet3d"
    if out.exists():
        shutil.rmtree(out)
    # an overfit check: no augmentation that would make the one volume harder to memorise
    overrides = [f"data.shards=[{shards}]", f"trainer.output_dir={out}", "segment.intensity_jitter=0",
                 "segment.flips=false", *extra]
    run([mf, "finetune", "adapt/segment_unet3d.yaml", *overrides])
    m = json.loads((out / "eval.json").read_text())
    result = {"check": "3-D U-Net overfits brain1 (train = evaluation volume); target Dice >= 0.9",
              "dice": m["metrics"]["dice"], "hd95_mm": m["metrics"].get("hd95"),
              "minutes": round((time.time() - start) / 60, 1), "passed": (m["metrics"]["dice"] or 0) >= 0.9,
              "command": "python benchmarks/quality_volumes.py" + "".join(f" {a}" for a in extra),
              "finetune_command": shlex.join(["medfound", "finetune", "adapt/segment_unet3d.yaml", *overrides]).replace(f"{ROOT}/", "")}
    save_result("volumes_unet3d_overfit", result, tuple(result))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
