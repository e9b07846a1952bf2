"""Another camera: DRIVE-trained U-Nets scored on STARE, a public fundus vessel set medfound never trains on (issue 30).

    python benchmarks/quality_cross_camera.py --stare DIR   -> benchmarks/results/cross_camera_stare.json

STARE (Hoover et al., IEEE TMI 2000): TopCon TRV-50, 35-degree field of view, 700x605 px, Adam Hoover's vessel
labels; DRIVE: Canon CR5, 45 degrees, 565x584 px. DIR holds `images/imNNNN.ppm`, `labels-ah/imNNNN.ah.ppm` and a
PROVENANCE.txt saying where the files came from (recorded in the result with every file's sha256). STARE is not
bundled: docs/segmentation.md says where the copy measured here came from.

The models are benchmarks/quality_scale.py's (`--work`, default runs/bench/scale): the U-Net of
adapt/segment_unet.yaml trained on the 20 DRIVE training images, the same recipe trained with
`segment.random_scale=[0.7,1.4]`, and a third with `segment.low_res=[0.5,1]` too; each is trained here when absent,
with quality_scale.py's commands. STARE is sharded as an external set with its field of view detected (`--fov
detect`: STARE ships no FOV masks), and every arm is one `medfound evaluate RUN STARE [overrides]` (pooled pixel F1
inside the FOV, 200 bootstrap resamples over images; the internal DRIVE test split is scored as trained, so its row
is the same in every arm):

    plain          the model at STARE's native pixels (what a user gets without thinking about scale)
    fov_diameter   segment.fov_diameter=D, D the DRIVE training images' median FOV width
    auto           segment.scale=auto (one factor for the set: the median of the images' own readings)
    auto_image     segment.scale=auto segment.auto_pool=image (each image at its own reading)
    hand_F         segment.scale=F over HAND, the best of which is the hand-chosen reference (it uses the labels)
    random_scale_plain / random_scale_auto   the scale-augmented U-Net, as is and with auto
    low_res_plain / low_res_auto             the U-Net trained with random_scale and segment.low_res=[0.5,1] too
    tta            multi-scale test-time inference, eval.tta_scales=[0.8,1,1.25], at native pixels

Targets (issue 30): auto within 0.02 F1 of the best hand-chosen factor; scale-augmented training + auto at least as
good as the plain model's best hand-chosen factor. Safe to rerun: an arm whose eval.json exists is read back.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

from _quality import ROOT, SHARED, drive_table, medfound_bin, run, save_result, write_csv
from quality_scale import LOW_RES_ARGS, RANDOM_SCALE_ARGS, train_unet  # the DRIVE U-Nets, trained as there

HAND = (0.6, 0.7, 0.8, 0.9, 1.0, 1.1)  # segment.scale factors tried by hand; STARE has
# about 1.5x DRIVE's pixels per degree of retina (700 px over 35 degrees against 565 over 45), so about 0.65 is expected
TTA = (0.8, 1.0, 1.25)


def stare_table(stare: Path, work: Path) -> Path:
    """STARE's images table (path, vessel mask, split=test, site) for `medfound shard images`; an image without its
    label file is left out, named."""
    rows = []
    for img in sorted((stare / "images").glob("im*.ppm")):
        label = stare / "labels-ah" / f"{img.stem}.ah.ppm"
        if not label.is_file():
            print(f"{img.name}: no labels-ah/{label.name}, left out", file=sys.stderr)
            continue
        rows.append({"path": f"images/{img.name}", "mask": f"labels-ah/{label.name}", "split": "test", "site": "STARE"})
    if not rows:
        raise SystemExit(f"{stare}: no images/imNNNN.ppm with labels-ah/imNNNN.ah.ppm")
    return write_csv(rows, work / "stare.csv")


def provenance(stare: Path) -> dict:
    files = sorted(p for p in stare.rglob("*") if p.is_file() and p.name != "PROVENANCE.txt")
    note = stare / "PROVENANCE.txt"
    return {"provenance": note.read_text().strip() if note.is_file() else None,
            "files_sha256": {str(p.relative_to(stare)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}}


def train_drive(mf: str, work: Path, out: Path, extra: list[str]) -> None:
    """quality_scale.py's DRIVE shards and U-Net (reused when its eval.json exists)."""
    shards = work / "shards"
    if not (shards / "manifest.json").is_file():
        run([mf, "shard", "images", str(SHARED / "drive"), "--table", str(drive_table(SHARED / "drive", work / "drive.csv")),
             "--out", str(shards), "--name", "drive", "--modality", "fundus", "--keep-names",
             "--license", "DRIVE research-use terms", "--attribution", "DRIVE, Staal et al., IEEE TMI 2004"])
    train_unet(mf, shards, out, extra)


def evaluate(mf: str, model: Path, stare: Path, dest: Path, extra: list[str]) -> dict:
    if not (dest / "eval.json").is_file():
        run([mf, "evaluate", str(model), str(stare), "eval.bootstrap=200", "--out", str(dest), *extra])
    report = json.loads((dest / "eval.json").read_text())
    (e,) = report["external"]
    return {"f1": e["metrics"]["pixel_f1"], "f1_interval": e.get("intervals", {}).get("pixel_f1"),
            "auc": e["metrics"].get("pixel_auc"), "drive_test_f1": report["metrics"]["pixel_f1"],
            "drop": e["drop"]["pixel_f1"], "warnings": e.get("warnings", []), "overrides": extra,
            **({"auto_scale": e["auto_scale"]} if "auto_scale" in e else {})}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stare", type=Path, required=True, help="STARE folder: images/, labels-ah/, PROVENANCE.txt")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench" / "scale",
                    help="quality_scale.py's work folder (its DRIVE U-Nets are reused)")
    args = ap.parse_args()
    if not (SHARED / "drive").is_dir():
        print(f"DRIVE is not at {SHARED / 'drive'}: this benchmark trains on it", file=sys.stderr)
        return 2
    mf, start, load_start, work = medfound_bin(), time.time(), os.getloadavg()[0], args.work
    cross = work / "cross_camera"
    stare = cross / "stare_shards"
    if not (stare / "manifest.json").is_file():
        run([mf, "shard", "images", str(args.stare), "--table", str(stare_table(args.stare, cross)), "--out", str(stare),
             "--name", "stare", "--modality", "fundus", "--keep-names", "--fov", "detect",
             "--license", "STARE project terms (research use)", "--attribution", "STARE, Hoover et al., IEEE TMI 2000"])
    plain, augmented, blurred = work / "unet", work / "unet_random_scale", work / "unet_low_res"
    train_drive(mf, work, plain, [])
    train_drive(mf, work, augmented, RANDOM_SCALE_ARGS)
    train_drive(mf, work, blurred, LOW_RES_ARGS)
    diameter = int(round(json.loads((plain / "eval.json").read_text())["scale"]["fov_diameter_px"]))
    arms = {"plain": (plain, []), "fov_diameter": (plain, [f"segment.fov_diameter={diameter}"]),
            "auto": (plain, ["segment.scale=auto"]),
            "auto_image": (plain, ["segment.scale=auto", "segment.auto_pool=image"]),
            **{f"hand_{f:g}": (plain, [f"segment.scale={f:g}"]) for f in HAND if f != 1.0},
            "random_scale_plain": (augmented, []), "random_scale_auto": (augmented, ["segment.scale=auto"]),
            "low_res_plain": (blurred, []), "low_res_auto": (blurred, ["segment.scale=auto"]),
            "tta": (plain, [f"eval.tta_scales=[{','.join(map(str, TTA))}]"])}
    results = {name: evaluate(mf, model, stare, cross / f"eval_{name}", extra) for name, (model, extra) in arms.items()}
    hand = {f: results["plain" if f == 1.0 else f"hand_{f:g}"]["f1"] for f in HAND}
    best = max(hand, key=hand.get)
    f1 = {name: round(r["f1"], 4) for name, r in results.items()}
    result = {
        "benchmark": "DRIVE-trained U-Nets (adapt/segment_unet.yaml, 20 training images) scored on STARE (another "
                     "camera and field of view; never trained on), pooled pixel F1 inside the detected FOV",
        "stare": {"images": json.loads((stare / "manifest.json").read_text())["counts"]["total"],
                  **provenance(args.stare)},
        "fov_diameter_px": diameter, "results": results, "f1": f1,
        "hand_chosen": {"f1_by_factor": {f"{f:g}": round(v, 4) for f, v in hand.items()}, "best_factor": best,
                        "best_f1": round(hand[best], 4)},
        "targets": {
            "auto within 0.02 F1 of the best hand-chosen factor": round(results["auto"]["f1"] - hand[best], 4),
            "scale-augmented training + auto >= the plain model's best hand-chosen factor":
                round(results["random_scale_auto"]["f1"] - hand[best], 4)},
        "met": {"auto_within_0.02": results["auto"]["f1"] >= hand[best] - 0.02,
                "augmented_auto_at_least_hand": results["random_scale_auto"]["f1"] >= hand[best]},
        "command": "python benchmarks/quality_cross_camera.py --stare DIR",
        "minutes": round((time.time() - start) / 60, 1),
        "load": {"omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "cpu_count": os.cpu_count(),
                 "loadavg_1min_start": round(load_start, 2), "loadavg_1min_end": round(os.getloadavg()[0], 2)},
    }
    save_result("cross_camera_stare", result, ("f1", "hand_chosen", "met", "minutes"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
