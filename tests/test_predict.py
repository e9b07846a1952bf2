"""`medfound predict`: a trained classifier on new image files, DICOM files and shard sets, preprocessed exactly as
evaluation was (the probabilities equal evaluate's on the same images), unreadable inputs named by index, --out
written by the replace rules of every writer."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from medfound.cli import main

from helpers import DATA, shared


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predictions_on_new_images_equal_the_evaluation_of_the_same_images(finetuned, tmp_path, capsys):
    folder = tmp_path / "new" / "DOE_JOHN_MRN123"  # a name that must never reach the console
    folder.mkdir(parents=True)
    with np.load(DATA / "medmnist" / "retinamnist_demo.npz") as z:
        for i in range(6):
            Image.fromarray(z["test_images"][i]).save(folder / f"case_{i}.png")
    (folder / "case_9.png").write_text("not an image")
    out = tmp_path / "out"
    assert main(["predict", str(finetuned), str(folder), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "input #6: cannot decode the image" in printed.out and "DOE_JOHN" not in printed.out + printed.err
    rows = _rows(out / "predictions.csv")
    assert [r["input"] for r in rows] == [str(folder / f"case_{i}.png") for i in range(6)]
    evaluated = {r["key"]: r for r in _rows(finetuned / "predictions.csv") if r["set"] == "internal"}
    names = [c[2:] for c in rows[0] if c.startswith("p_")]
    for i, row in enumerate(rows):
        ref = evaluated[f"retinamnist_demo_test_{i:06d}"]
        assert all(abs(float(row[f"p_{c}"]) - float(ref[f"p_{c}"])) < 2e-6 for c in names)
        assert row["predicted"] == names[int(np.argmax([float(row[f"p_{c}"]) for c in names]))]
    # the same folder again: refused without --overwrite, replaced with it; a folder of the user's is left alone
    assert main(["predict", str(finetuned), str(folder), "--out", str(out)]) == 1
    assert "holds an earlier prediction" in capsys.readouterr().err
    assert main(["predict", str(finetuned), str(folder), "--out", str(out), "--overwrite"]) == 0
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "predictions.csv").write_text("mine\n")
    assert main(["predict", str(finetuned), str(folder), "--out", str(theirs)]) == 1
    assert (theirs / "predictions.csv").read_text() == "mine\n"


def test_a_shard_set_and_dicom_files_are_predicted(finetuned, shards, tmp_path, capsys):
    pytest.importorskip("pydicom")
    assert main(["predict", str(finetuned), str(shards["retina"]), "--out", str(tmp_path / "set")]) == 0
    rows = _rows(tmp_path / "set" / "predictions.csv")
    assert len(rows) == 600 + 120 + 400 and rows[0]["input"] == rows[0]["key"]  # every split, its own keys
    dicom = shared("dicom")
    files = sorted(p for p in dicom.iterdir() if p.suffix == ".dcm")[:3]
    assert main(["predict", str(finetuned), *map(str, files), "--out", str(tmp_path / "dcm")]) == 0
    rows = _rows(tmp_path / "dcm" / "predictions.csv")
    assert rows and all(r["input"].split("#")[0] in {str(f) for f in files} for r in rows)


def test_a_model_kind_without_predictions_yet_says_so(tmp_path, seg_shards, capsys):
    from medfound.config import load_recipe
    from medfound.workflows import run_finetune

    from helpers import ROOT, tiny_segment_overrides

    run = tmp_path / "unet"
    run_finetune(load_recipe(ROOT / "adapt" / "segment_unet.yaml",
                             tiny_segment_overrides("unet", seg_shards, None, run, steps=1) + ["eval.bootstrap=10"]))
    assert main(["predict", str(run), str(DATA / "ct_organs"), "--out", str(tmp_path / "o")]) == 1
    assert "writes classification predictions today" in capsys.readouterr().err
