"""Scale robustness on DRIVE: one U-Net, scored on the 20 test images at native size and resampled to 0.5x and 2x,
without and with field-of-view normalisation (`segment.fov_diameter`).

    python benchmarks/quality_scale.py                       -> benchmarks/results/scale_drive.json
    python benchmarks/quality_scale.py trainer.max_steps=500 -> benchmarks/results/scale_drive_partial.json

Steps: shard DRIVE (train + test, with its FOV masks); shard the test images again with `medfound shard images
--scale 0.5` and `--scale 2` (images with antialiasing, vessel and FOV masks by nearest neighbour), as two external
sets; train the U-Net recipe once (adapt/segment_unet.yaml, as benchmarks/quality_drive.py); then
`medfound evaluate RUN HALF DOUBLE` (native scale for the model: the collapse a user sees on another fundus set),
and `medfound evaluate RUN HALF DOUBLE segment.fov_diameter=D` with D the training images' median FOV width (each
image resized so its FOV is D px wide, predictions mapped back and scored at the image's own size). Pooled pixel F1
inside the FOV, as the DRIVE literature reports. Target (issue 18): with normalisation both within 0.02 F1 of native.

Safe to rerun: finished steps are reused, a run folder is never deleted; a run with overrides writes
`scale_drive_partial.json`. Threads: set OMP_NUM_THREADS to the free cores (the result records the load).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from _quality import ROOT, SHARED, drive_table, medfound_bin, run, save_result

DRIVE = SHARED / "drive"


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench" / "scale")
    ap.add_argument("overrides", nargs="*", help="recipe overrides of the training run, e.g. trainer.max_steps=500")
    args = ap.parse_args()
    if not DRIVE.is_dir():
        print(f"DRIVE is not at {DRIVE}: this benchmark needs ../shared/data/drive", file=sys.stderr)
        return 2
    mf, start, load_start, work = medfound_bin(), time.time(), os.getloadavg()[0], args.work
    sets = {"native": work / "shards", "half": work / "test_x0.5", "double": work / "test_x2"}
    attribution = ["--license", "DRIVE research-use terms", "--attribution", "DRIVE, Staal et al., IEEE TMI 2004"]
    if not (sets["native"] / "manifest.json").is_file():
        run([mf, "shard", "images", str(DRIVE), "--table", str(drive_table(DRIVE, work / "drive.csv")),
             "--out", str(sets["native"]), "--name", "drive", "--modality", "fundus", "--keep-names", *attribution])
    for name, factor in (("half", 0.5), ("double", 2.0)):
        if not (sets[name] / "manifest.json").is_file():
            test_table = drive_table(DRIVE, work / "drive_test.csv", ("test",))
            run([mf, "shard", "images", str(DRIVE), "--table", str(test_table),
                 "--out", str(sets[name]), "--name", f"drive_test_x{factor:g}", "--modality", "fundus",
                 "--keep-names", "--scale", str(factor), *attribution])
    out = work / "unet"
    if not (out / "eval.json").is_file():
        run([mf, "finetune", "adapt/segment_unet.yaml", f"data.shards=[{sets['native']}]",
             f"trainer.output_dir={out}", "trainer.resume=auto", *args.overrides])
    diameter = int(round(json.loads((out / "eval.json").read_text())["scale"]["fov_diameter_px"]))
    results = {}
    for mode, extra in (("native_scale", []), ("fov_normalised", [f"segment.fov_diameter={diameter}"])):
        dest = work / f"eval_{mode}"
        if not (dest / "eval.json").is_file():
            run([mf, "evaluate", str(out), str(sets["half"]), str(sets["double"]), "eval.bootstrap=200",
                 "--out", str(dest), *extra])
        report = json.loads((dest / "eval.json").read_text())
        row = {"native": {"f1": report["metrics"]["pixel_f1"], "f1_interval": report["intervals"].get("pixel_f1")}}
        for e in report["external"]:
            key = "x0.5" if e["name"].endswith("x0.5") else "x2"
            row[key] = {"f1": e["metrics"]["pixel_f1"], "f1_interval": e.get("intervals", {}).get("pixel_f1"),
                        "drop": e["drop"]["pixel_f1"], "warnings": e.get("warnings", [])}
        results[mode] = row
    norm = results["fov_normalised"]
    native_f1 = results["native_scale"]["native"]["f1"]
    result = {
        "benchmark": "DRIVE test images at native size, 0.5x and 2x; U-Net trained once on the native training set",
        "fov_diameter_px": diameter, "results": results,
        "f1": {mode: {k: round(v["f1"], 4) for k, v in row.items()} for mode, row in results.items()},
        "target": "with segment.fov_diameter both resampled sets within 0.02 F1 of native",
        "meets_target": all(abs(norm[k]["f1"] - native_f1) <= 0.02 for k in ("x0.5", "x2")),
        "command": "python benchmarks/quality_scale.py" + "".join(f" {o}" for o in args.overrides),
        "minutes": round((time.time() - start) / 60, 1),
        "load": {"omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "cpu_count": os.cpu_count(),
                 "loadavg_1min_start": round(load_start, 2), "loadavg_1min_end": round(os.getloadavg()[0], 2)},
        "reduced": bool(args.overrides),
    }
    save_result("scale_drive" + ("_partial" if args.overrides else ""), result, ("f1", "meets_target", "minutes"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
