"""`medfound predict`: a trained classifier on new image files, DICOM files and shard sets, preprocessed exactly as
evaluation was (the probabilities equal evaluate's on the same images), unreadable inputs named by index, --out
written by the replace rules of every writer."""

from __future__ import annotations

import csv
import json

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
    # the same folder again, with two new images: the model's earlier predictions are kept (by the inputs' sha256)
    # and only the new inputs are predicted; --overwrite predicts everything again
    with np.load(DATA / "medmnist" / "retinamnist_demo.npz") as z:
        for i in (6, 7):
            Image.fromarray(z["test_images"][i]).save(folder / f"case_{i}.png")
    before = {r["input"]: r for r in rows}
    assert main(["predict", str(finetuned), str(folder), "--out", str(out)]) == 0
    assert "6 inputs already predicted in" in capsys.readouterr().err
    again = _rows(out / "predictions.csv")
    assert len(again) == 8 and all(again[i] == before[again[i]["input"]] for i in range(6))
    assert {r["input"] for r in again[6:]} == {str(folder / f"case_{i}.png") for i in (6, 7)}
    assert len({r["key"] for r in again}) == 8
    summary = json.loads((out / "summary.json").read_text())
    assert summary["predicted"] == 2 and summary["reused_inputs"] == 6
    assert main(["predict", str(finetuned), str(folder), "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "summary.json").read_text())["predicted"] == 8
    assert main(["predict", str(finetuned), str(folder), "--box", "1,1,9,9", "--out", str(tmp_path / "b")]) == 1
    assert "is a classification model, which reads no boxes" in capsys.readouterr().err
    assert main(["predict", str(finetuned), str(folder), "--overlay", "--out", str(tmp_path / "o")]) == 1
    assert "which reads no overlay" in capsys.readouterr().err
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
    # the retina classifier on an MR file: the modality from the file's own tags is named before any work
    import json

    capsys.readouterr()
    assert main(["predict", str(finetuned), str(dicom / "MR-SIEMENS-DICOM-WithOverlays.dcm"),
                 "--out", str(tmp_path / "mr")]) == 0
    said = json.loads((tmp_path / "mr" / "summary.json").read_text())["warnings"]
    assert said == ["the inputs are mr, but the model was trained on fundus: its predictions on another modality "
                    "are not validated"]
    assert said[0] in capsys.readouterr().err


def test_segmentation_masks_come_back_in_the_inputs_geometry(tmp_path, seg_shards, capsys):
    """A tiny U-Net on the bundled CT aorta set: predicted from the raw PNGs, each mask equals the argmax of the
    evaluation path's sliding-window probabilities on the same image from the shards, pixel for pixel."""
    import json

    import torch

    from medfound.config import load_recipe
    from medfound.data.loaders import prepare
    from medfound.data.pipeline import Decoding, make_loader, shard_urls
    from medfound.data.seg_transforms import build_seg_transform
    from medfound.evaluate.segmentation import predict_probs
    from medfound.tasks import task_for
    from medfound.workflows import run_finetune

    from helpers import ROOT, tiny_segment_overrides

    run = tmp_path / "unet"
    recipe = load_recipe(ROOT / "adapt" / "segment_unet.yaml",
                         tiny_segment_overrides("unet", seg_shards, None, run, steps=2) + ["eval.bootstrap=10"])
    run_finetune(recipe)
    rows = [r for r in csv.DictReader(open(DATA / "ct_organs" / "aorta.csv")) if r.get("split") == "test"]
    inputs = [str(DATA / "ct_organs" / r["path"]) for r in rows]
    assert main(["predict", str(run), *inputs, "--out", str(tmp_path / "out"), "--save-probabilities",
                 "--overlay", "--device", "cpu", "--num-workers", "0"]) == 0
    written = _rows(tmp_path / "out" / "predictions.csv")
    assert [r["input"] for r in written] == inputs
    spec = task_for(recipe)
    model, seg = spec.load(run / "export", recipe), recipe.segment
    urls, _ = shard_urls([seg_shards["ct"]], "test")
    loader = make_loader(urls, Decoding(prepare(recipe.data, build_seg_transform(seg, False, None))), batch_size=1)
    with torch.no_grad():
        expected = [predict_probs(model, b["image"].float(), seg.patch_size, seg.overlap)[0].argmax(0).numpy()
                    for b in loader]
    for row, want in zip(written, expected):
        mask = np.asarray(Image.open(tmp_path / "out" / row["mask"]))
        assert mask.shape == np.asarray(Image.open(row["input"])).shape[:2]  # the input's own geometry
        assert (mask == want).all()
        assert int(row["pixels_background"]) + int(row["pixels_foreground"]) == mask.size
        probs = np.load(tmp_path / "out" / row["probabilities"])["probabilities"]  # nnU-Net's --save_probabilities
        assert probs.shape == (2, *mask.shape) and (probs.astype(np.float32).argmax(0) == mask).mean() > 0.999
        assert np.asarray(Image.open(tmp_path / "out" / row["overlay"])).shape == (*mask.shape, 3)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["task"] == "segmentation"
    # issue 30: --scale auto (label-free, per image, recorded) and a fixed factor, masks still on the input's grid
    assert main(["predict", str(run), inputs[0], "--out", str(tmp_path / "auto"), "--scale", "auto"]) == 0
    (row,) = _rows(tmp_path / "auto" / "predictions.csv")
    assert 0.25 <= float(row["scale_factor"]) <= 4.0  # evaluate.segmentation.AUTO_RANGE
    assert row["scale_factor"] == row["scale_factor_image"]  # one input: its site's median is its own reading
    assert np.asarray(Image.open(tmp_path / "auto" / row["mask"])).shape == np.asarray(Image.open(inputs[0])).shape[:2]
    assert main(["predict", str(run), inputs[0], "--out", str(tmp_path / "half"), "--scale", "0.5"]) == 0
    (half,) = _rows(tmp_path / "half" / "predictions.csv")
    assert "scale_factor" not in half and np.asarray(Image.open(tmp_path / "half" / half["mask"])).shape == \
        np.asarray(Image.open(inputs[0])).shape[:2]


def test_a_volume_mask_is_nifti_on_the_source_grid(tmp_path, seg_shards, capsys):
    """A tiny 3-D U-Net trained at 1.32 x 1.32 x 2.1 mm on the bundled breast MRI (0.66 x 0.66 x 2.1 mm, NRRD):
    predicted from the raw NRRD, the mask is NIfTI on the source's own 45 x 120 x 21 grid with the source's affine
    (computed here from the NRRD header by pynrrd, LPS -> RAS, independently of medfound), and equals the evaluation
    path's prediction mapped back to the native grid; a 2-D image given to it is refused naming the mismatch."""
    nib = pytest.importorskip("nibabel")
    nrrd = pytest.importorskip("nrrd")
    import torch

    from medfound.config import load_recipe
    from medfound.data.loaders import prepare
    from medfound.data.pipeline import Decoding, make_loader, shard_urls
    from medfound.data.seg_transforms import build_seg_transform
    from medfound.evaluate.segmentation import predict_probs
    from medfound.tasks import task_for
    from medfound.workflows import run_finetune

    from helpers import ROOT, tiny_segment_overrides

    run = tmp_path / "unet3d"
    recipe = load_recipe(ROOT / "adapt" / "segment_unet3d.yaml", tiny_segment_overrides(
        "unet3d", seg_shards, None, run) + ["segment.spacing=[1.32,1.32,2.1]", "eval.bootstrap=0"])
    run_finetune(recipe)
    source = DATA / "volumes" / "breast1_image.nrrd"
    broken = tmp_path / "PATIENT_NAME.nii.gz"  # an unreadable volume is skipped and named by index, not by name
    broken.write_bytes(b"not a volume")
    assert main(["predict", str(run), str(source), str(broken), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr()
    assert "input #1: " in printed.out and "PATIENT_NAME" not in printed.out + printed.err
    (row,) = _rows(tmp_path / "out" / "predictions.csv")
    assert row["input"] == str(source) and row["mask"].endswith(".nii.gz")
    img = nib.load(tmp_path / "out" / row["mask"])
    header = nrrd.read_header(str(source))
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    want = np.eye(4)
    want[:3, :3] = lps_to_ras @ np.asarray(header["space directions"], dtype=float).T
    want[:3, 3] = lps_to_ras @ np.asarray(header["space origin"], dtype=float)
    assert img.shape == tuple(int(v) for v in header["sizes"]) == (45, 120, 21)
    assert np.allclose(img.affine, want, atol=1e-5)
    mask = np.asarray(img.dataobj)
    assert sum(int(v) for k, v in row.items() if k.startswith("pixels_")) == mask.size
    spec, seg = task_for(recipe), recipe.segment
    model = spec.load(run / "export", recipe)
    urls, _ = shard_urls([seg_shards["volume"]], "train")
    (batch,) = list(make_loader(urls, Decoding(prepare(recipe.data, build_seg_transform(seg, False, None))),
                                batch_size=1))
    with torch.no_grad():
        probs = predict_probs(model, batch["image"].float(), seg.patch_size, seg.overlap)
        native = torch.nn.functional.interpolate(probs, size=(45, 120, 21), mode="trilinear", align_corners=False)
    assert (mask == native[0].argmax(0).numpy()).all()
    assert main(["predict", str(run), str(DATA / "ct_organs" / "images" / "s0114_111.png"),
                 "--out", str(tmp_path / "2d")]) == 1
    assert "this model segments volumes, but the inputs are image files" in capsys.readouterr().err
    # the same scan written as NIfTI with twice the voxel size: segment.spacing resamples it (no warning); a run
    # that works on the native grid is told, before any work, that the inputs' voxels are 2x the training data's
    coarse = tmp_path / "coarse.nii.gz"
    affine = want.copy()
    affine[:3, :3] *= 2
    nib.save(nib.Nifti1Image(np.asarray(nib.load(tmp_path / "out" / row["mask"]).dataobj).astype(np.int16), affine),
             coarse)
    assert main(["predict", str(run), str(coarse), "--out", str(tmp_path / "resampled")]) == 0
    assert "warning" not in capsys.readouterr().err
    native = tmp_path / "native"
    run_finetune(load_recipe(ROOT / "adapt" / "segment_unet3d.yaml", tiny_segment_overrides(
        "unet3d", seg_shards, None, native) + ["eval.bootstrap=0"]))
    assert main(["predict", str(native), str(coarse), "--out", str(tmp_path / "warned")]) == 0
    assert "medfound predict: warning: the input set has pixels of 1.3" in capsys.readouterr().err


def test_python_predict_and_a_published_copy_elsewhere_give_the_cli_rows(finetuned, seg_shards, tmp_path):
    """`medfound.load(folder).predict(inputs)` returns predictions.csv's rows; the published folder, copied to another
    place, predicts the same as the run; a segmentation network's rows carry their mask arrays."""
    import shutil

    import medfound
    from medfound.workflows import publish

    folder = tmp_path / "new"
    folder.mkdir()
    with np.load(DATA / "medmnist" / "retinamnist_demo.npz") as z:
        for i in range(3):
            Image.fromarray(z["test_images"][i]).save(folder / f"case_{i}.png")
    assert main(["predict", str(finetuned), str(folder), "--out", str(tmp_path / "cli")]) == 0
    cli = _rows(tmp_path / "cli" / "predictions.csv")
    publish(finetuned, tmp_path / "published")
    elsewhere = tmp_path / "elsewhere" / "model"
    shutil.copytree(tmp_path / "published", elsewhere)
    shutil.rmtree(tmp_path / "published")
    rows = medfound.load(elsewhere).predict(folder)
    assert [{k: str(v) for k, v in r.items()} for r in rows] == cli
    image = DATA / "ct_organs" / "images" / "amos_0006_90.png"
    run = tmp_path / "unet"
    from medfound.config import load_recipe
    from medfound.workflows import run_finetune

    from helpers import ROOT, tiny_segment_overrides

    run_finetune(load_recipe(ROOT / "adapt" / "segment_unet.yaml",
                             tiny_segment_overrides("unet", seg_shards, None, run, steps=1) + ["eval.bootstrap=0"]))
    (row,) = medfound.load(run).predict([image])
    assert main(["predict", str(run), str(image), "--out", str(tmp_path / "seg")]) == 0
    assert (row["mask"] == np.asarray(Image.open(tmp_path / "seg" / "masks" / f"{row['key']}.png"))).all()
    assert row["mask"].shape == np.asarray(Image.open(image)).shape[:2]


@pytest.mark.slow
def test_predict_under_torchrun_2_equals_one_process(finetuned, seg_shards, tmp_path):
    """launch/torchrun.sh 2 medfound predict: the inputs split across two processes (gloo), each output written once,
    predictions.csv equal to one process's; a segmentation model's masks too, byte for byte."""
    import os
    import subprocess
    import sys

    from helpers import ROOT

    folder = tmp_path / "new"
    folder.mkdir()
    with np.load(DATA / "medmnist" / "retinamnist_demo.npz") as z:
        for i in range(7):
            Image.fromarray(z["test_images"][i]).save(folder / f"case_{i}.png")
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}

    def torchrun(*args: str) -> None:
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               "-m", "medfound.cli", "predict", *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    assert main(["predict", str(finetuned), str(folder), "--out", str(tmp_path / "one")]) == 0
    torchrun(str(finetuned), str(folder), "--out", str(tmp_path / "two"))
    assert _rows(tmp_path / "two" / "predictions.csv") == _rows(tmp_path / "one" / "predictions.csv")
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 2
    # segmentation: every mask written once, by the rank that owns its input, equal to one process's
    from medfound.config import load_recipe
    from medfound.workflows import run_finetune

    from helpers import tiny_segment_overrides

    run = tmp_path / "unet"
    run_finetune(load_recipe(ROOT / "adapt" / "segment_unet.yaml",
                             tiny_segment_overrides("unet", seg_shards, None, run, steps=1) + ["eval.bootstrap=0"]))
    images = sorted(str(p) for p in (DATA / "ct_organs" / "images").glob("*.png"))
    assert main(["predict", str(run), *images, "--out", str(tmp_path / "seg1")]) == 0
    torchrun(str(run), *images, "--out", str(tmp_path / "seg2"))
    one, two = _rows(tmp_path / "seg1" / "predictions.csv"), _rows(tmp_path / "seg2" / "predictions.csv")
    assert one == two and len(one) == len(images)
    for row in one:
        assert (tmp_path / "seg1" / row["mask"]).read_bytes() == (tmp_path / "seg2" / row["mask"]).read_bytes()
    marker = json.loads((tmp_path / "seg2" / ".medfound-predict.json").read_text())
    assert sorted(marker["files"]) == sorted(["predictions.csv", "summary.json", *(r["mask"] for r in one)])


def test_segmentation_of_dicom_writes_a_seg_referencing_its_source(seg_shards, tmp_path, capsys):
    """DICOM inputs to a 2-D segmentation model: a DICOM SEG per input (highdicom) that references its source image
    and study and holds the same mask as the PNG; --anonymous writes PNG only; a source the SEG IOD cannot reference
    (no Frame of Reference) falls back to PNG with a warning by index."""
    pydicom = pytest.importorskip("pydicom")
    pytest.importorskip("highdicom")
    from medfound.config import load_recipe
    from medfound.workflows import run_finetune

    from helpers import ROOT, tiny_segment_overrides

    run = tmp_path / "unet"
    run_finetune(load_recipe(ROOT / "adapt" / "segment_unet.yaml",
                             tiny_segment_overrides("unet", seg_shards, None, run, steps=1) + ["eval.bootstrap=0"]))
    dicom = shared("dicom")
    ct, no_for = dicom / "explicit_VR-UN.dcm", dicom / "693_J2KR.dcm"
    assert main(["predict", str(run), str(ct), str(no_for), "--out", str(tmp_path / "seg")]) == 0
    assert "input #1: no DICOM SEG (Source images have no Frame Of Reference UID" in capsys.readouterr().err
    rows = {r["input"].split("#")[0]: r for r in _rows(tmp_path / "seg" / "predictions.csv")}  # PATH#frame
    assert rows[str(no_for)]["mask"].endswith(".png") and rows[str(ct)]["mask"].endswith(".dcm")
    seg, src = pydicom.dcmread(tmp_path / "seg" / rows[str(ct)]["mask"]), pydicom.dcmread(ct)
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == src.StudyInstanceUID
    ref = seg.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == src.SeriesInstanceUID
    assert ref.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["foreground"]
    assert main(["predict", str(run), str(ct), "--anonymous", "--out", str(tmp_path / "anon")]) == 0
    (row,) = _rows(tmp_path / "anon" / "predictions.csv")
    png = np.asarray(Image.open(tmp_path / "anon" / row["mask"]))
    assert row["mask"].endswith(".png") and png.shape == (src.Rows, src.Columns)
    assert (seg.pixel_array.reshape(png.shape).astype(bool) == (png == 1)).all()  # the same mask in both forms
    assert not list((tmp_path / "anon").rglob("*.dcm"))


def test_a_model_that_scores_units_predicts_units(view_shards, shards, pretrained, tmp_path, capsys):
    """eval.aggregate (McKinney's per-breast scoring) for new studies: units.csv combines each unit's image
    probabilities as evaluation does (the mean of its two views here); PNG files, which record no pixel spacing, are
    refused by a data.spacing_mm model before any work."""
    from medfound.config import load_recipe
    from medfound.workflows import run_finetune

    from helpers import ROOT, tiny_finetune_overrides

    run = tmp_path / "run"
    run_finetune(load_recipe(ROOT / "adapt" / "mckinney_screening.yaml", tiny_finetune_overrides(
        {"views": view_shards}, pretrained / "export", run, 2, "views") + [
        "backbone.weights=null", "data.img_size=32", "data.batch_size=8", "data.spacing_mm=12.5"]))
    assert main(["predict", str(run), str(view_shards), "--out", str(tmp_path / "out")]) == 0
    rows = _rows(tmp_path / "out" / "predictions.csv")
    units = _rows(tmp_path / "out" / "units.csv")
    assert len(units) == len(rows) // 2 and all(u["images"] == "2" for u in units)
    assert list(units[0])[:3] == ["patient", "laterality", "images"]
    first = [c for c in units[0] if c.startswith("p_")][0]
    total = sum(float(r[first]) for r in rows)
    assert abs(sum(2 * float(u[first]) for u in units) - total) < 1e-3  # each unit: the mean of its two views
    # PNG files record no pixel spacing, which this recipe resamples by: refused, naming the fix
    folder = tmp_path / "png"
    folder.mkdir()
    with np.load(DATA / "medmnist" / "pneumoniamnist_demo.npz") as z:
        for i in range(2):
            Image.fromarray(z["test_images"][i]).save(folder / f"case_{i}.png")
    capsys.readouterr()
    assert main(["predict", str(run), str(folder), "--out", str(tmp_path / "png_out")]) == 1  # no spacing in PNGs
    assert "records no pixel spacing" in capsys.readouterr().err


def test_a_dicom_series_gets_one_multiframe_seg_and_a_multiframe_file_one_seg(seg_shards, tmp_path):
    """A series of CT slices (made from pydicom's real CT_small.dcm: three instances of one series at three
    positions, given out of order) gets one SEG whose frames follow the series and reference every instance; each
    frame equals the PNG mask of that slice. A multi-frame enhanced MR file gets one SEG with a frame per source
    frame. Under torchrun both go to one process (a folder stays together)."""
    import copy

    pydicom = pytest.importorskip("pydicom")
    pytest.importorskip("highdicom")
    import json

    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    from medfound.config import load_recipe
    from medfound.predict import _folder_groups
    from medfound.workflows import run_finetune

    from helpers import ROOT, tiny_segment_overrides

    run = tmp_path / "unet"
    run_finetune(load_recipe(ROOT / "adapt" / "segment_unet.yaml",
                             tiny_segment_overrides("unet", seg_shards, None, run, steps=1) + ["eval.bootstrap=0"]))
    series = tmp_path / "series"
    series.mkdir()
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    uids = {}
    z = float(base.ImagePositionPatient[2])
    for number, name in ((3, "a.dcm"), (1, "b.dcm"), (2, "c.dcm")):  # file order is not series order
        ds = copy.deepcopy(base)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = number
        ds.ImagePositionPatient = [*base.ImagePositionPatient[:2], z + 5 * number]
        arr = base.pixel_array.copy()
        arr[:, : 20 * number] = arr.min()  # three different slices
        ds.PixelData = arr.tobytes()
        ds.save_as(series / name)
        uids[number] = ds.SOPInstanceUID
    assert main(["predict", str(run), str(series), "--out", str(tmp_path / "seg"), "--mask-format", "dicom-seg"]) == 0
    rows = _rows(tmp_path / "seg" / "predictions.csv")
    assert len(rows) == 3 and len({r["mask"] for r in rows}) == 1 and rows[0]["mask"].endswith(".dcm")
    seg = pydicom.dcmread(tmp_path / "seg" / rows[0]["mask"])
    assert seg.Modality == "SEG" and int(seg.NumberOfFrames) == 3 and seg.SeriesInstanceUID != base.SeriesInstanceUID
    (ref,) = seg.ReferencedSeriesSequence
    assert ref.SeriesInstanceUID == base.SeriesInstanceUID
    assert {r.ReferencedSOPInstanceUID for r in ref.ReferencedInstanceSequence} == set(uids.values())
    frames = [f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
              for f in seg.PerFrameFunctionalGroupsSequence]
    assert sorted(frames) == sorted(uids.values()) and sorted(int(r["seg_frames"]) for r in rows) == [1, 2, 3]
    assert main(["predict", str(run), str(series), "--out", str(tmp_path / "png"), "--mask-format", "png"]) == 0
    pngs = {r["input"]: np.asarray(Image.open(tmp_path / "png" / r["mask"])) for r in _rows(tmp_path / "png" /
                                                                                            "predictions.csv")}
    for r in rows:  # each input's frame references its own instance and holds its own mask
        frame = int(r["seg_frames"])
        assert frames[frame - 1] == pydicom.dcmread(r["input"].split("#")[0]).SOPInstanceUID
        assert (seg.pixel_array[frame - 1].astype(bool) == (pngs[r["input"]] == 1)).all()
    assert len({p.tobytes() for p in pngs.values()}) == 3  # three different slices, three different masks
    # a multi-frame file: the series converted to one legacy-converted enhanced CT (highdicom), one SEG of it
    import highdicom as hd

    legacy = [pydicom.dcmread(f) for f in sorted(series.iterdir())]
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(legacy, series_instance_uid=generate_uid(), series_number=2,
                                                        sop_instance_uid=generate_uid(), instance_number=1)
    enhanced.save_as(tmp_path / "enhanced.dcm")
    assert main(["predict", str(run), str(tmp_path / "enhanced.dcm"), "--out", str(tmp_path / "mf")]) == 0
    rows = _rows(tmp_path / "mf" / "predictions.csv")
    assert len(rows) == 3 and len({r["mask"] for r in rows}) == 1 and rows[0]["mask"].endswith(".dcm")
    seg = pydicom.dcmread(tmp_path / "mf" / rows[0]["mask"])
    assert int(seg.NumberOfFrames) == 3 and sorted(int(r["seg_frames"]) for r in rows) == [1, 2, 3]
    for r in rows:  # frame f of the source (PATH#f, from 0) is referenced as frame f + 1 and holds that mask
        frame = int(r["seg_frames"])
        ref = seg.PerFrameFunctionalGroupsSequence[frame - 1].DerivationImageSequence[0].SourceImageSequence[0]
        assert ref.ReferencedSOPInstanceUID == enhanced.SOPInstanceUID
        assert int(ref.ReferencedFrameNumber) == int(r["input"].split("#")[1]) + 1
    # a multi-frame file without plane positions (the real enhanced MR test file) cannot be referenced: PNG
    assert main(["predict", str(run), str(shared("dicom", "emri_small.dcm")), "--out", str(tmp_path / "emri")]) == 0
    summary = json.loads((tmp_path / "emri" / "summary.json").read_text())
    assert any("input #0: no DICOM SEG (Only a single frame is supported" in w for w in summary["warnings"])
    assert len(list((tmp_path / "emri" / "masks").glob("*.png"))) == 10
    # under torchrun the files of one folder go to one process
    assert _folder_groups([series / "a.dcm", tmp_path / "x.dcm", series / "b.dcm"]) == [0, 1, 0]
