"""Helpers shared by the quality_*.py benchmarks (run as scripts: `python benchmarks/quality_X.py`)."""

from __future__ import annotations

import csv
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout; MEDFOUND_SHARED_DATA points elsewhere (a lent GPU machine gets a copy of the
# checkout only: benchmarks/device.sh carries the sets it needs and sets it)
SHARED = Path(os.environ.get("MEDFOUND_SHARED_DATA") or ROOT.parent / "shared" / "data").resolve()


def medfound_bin() -> str:
    """The `medfound` console script of the interpreter running the benchmark (else the one on PATH: a wheel
    installed with `pip install --target` puts it in TARGET/bin)."""
    beside = Path(sys.executable).with_name("medfound")
    if beside.is_file():
        return str(beside)
    found = shutil.which("medfound")
    if found is None:
        raise SystemExit(f"no `medfound` console script beside {sys.executable} or on PATH: install medfound into "
                         "this interpreter (pip install -e .) first")
    return found


def run(cmd: list[str]) -> None:
    print("$", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def write_csv(rows: list[dict[str, str]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def backbone_record(export: Path, recipe: str, command: str) -> dict:
    """What a pretrained backbone export says about itself (steps, minutes), for a results file."""
    import json

    lineage = json.loads((Path(export) / "config.json").read_text()).get("medfound", {})
    return {"recipe": recipe, "export": str(export).replace(f"{ROOT}/", ""), "steps": lineage.get("steps"),
            "minutes": round(lineage.get("train_seconds", 0.0) / 60, 1), "command": command}


def save_result(name: str, result: dict, shown: tuple[str, ...]) -> Path:
    """Write `results/NAME.json` and print the headline keys `shown`."""
    import json

    dest = ROOT / "benchmarks" / "results" / f"{name}.json"
    dest.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result.get(k) for k in shown}), f"-> {dest}")
    return dest


def drive_table(drive: Path, out: Path, splits: tuple[str, ...] = ("train", "test")) -> Path:
    """DRIVE's images table (path, vessel mask, FOV mask, split, site) for `medfound shard images`, paths relative
    to the DRIVE folder; `splits` picks the training and/or test images."""
    rows = []
    for split, folder, tag in (("train", "training", "training"), ("test", "testing", "test")):
        if split not in splits:
            continue
        for img in sorted((drive / folder / "images").glob("*.tif")):
            num = img.name.split("_")[0]
            rows.append({"path": f"{folder}/images/{img.name}", "mask": f"{folder}/1st_manual/{num}_manual1.gif",
                         "fov": f"{folder}/mask/{num}_{tag}_mask.gif", "split": split, "site": "DRIVE"})
    return write_csv(rows, out)


def monuseg_table(src: Path, work: Path, parts: tuple[str, ...] = ("train", "test")) -> Path:
    """MoNuSeg on HoVer-Net's Kumar split as an images table (path, binary nuclei mask, split, TCGA site): the
    binary masks derived from the instance labels are written under `work`; `parts` picks train and/or test."""
    import json

    import numpy as np
    from PIL import Image

    split = json.loads((src / "kumar_split_hovernet.json").read_text())
    masks = work / "binary_masks"
    masks.mkdir(parents=True, exist_ok=True)
    rows = []
    for part, ids in (("train", split["train"]), ("test", split["test_same_tissue"] + split["test_different_tissue"])):
        if part not in parts:
            continue
        for i in ids:
            if not (masks / f"{i}.png").is_file():
                inst = np.asarray(Image.open(src / "instance_labels" / f"{i}_inst.png"))
                Image.fromarray(((inst > 0) * 255).astype(np.uint8)).save(masks / f"{i}.png")
            rows.append({"path": f"images/{i}.png", "mask": str(masks / f"{i}.png"), "split": part,
                         "site": f"TCGA-{i.split('-')[1]}"})
    return write_csv(rows, work / f"monuseg_{'_'.join(parts)}.csv")
