"""Pixel spacing as a contract for 2-D radiology (issue 18): DICOM PixelSpacing / ImagerPixelSpacing and
`shard images --spacing-mm` (or a spacing_mm column) are stored per sample; `data.spacing_mm` resamples every image
to one mm/px and fits it to the input field without rescaling, so one anatomy gives one tensor whatever the
detector size or resolution; external sets at another spacing are warned about only when the run does not resample.
Real images: pydicom's test DICOM files and the bundled PneumoniaMNIST chest radiographs."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medfound.data.pipeline import MissingMember
from medfound.data.transforms import build_transform

from helpers import DATA, ROOT, shared, tar_metas


@pytest.fixture(scope="module")
def dicom_samples(tmp_path_factory) -> tuple[Path, list[dict]]:
    """pydicom's real test files through `medfound shard dicom`: the shard set, and its decoded samples (stored
    pixels at full depth + meta), as the training pipeline reads them."""
    pytest.importorskip("pydicom")
    import io

    from medfound.workflows import shard

    from helpers import tar_samples

    out = tmp_path_factory.mktemp("spacing") / "dicom"
    shard("dicom", shared("dicom"), out, name="dicom", split_fractions={"train": 0.5, "test": 0.5})
    samples = []
    for key, members in tar_samples(out).items():
        image = next(v for k, v in members.items() if k in ("png", "npy"))
        pixels = np.load(io.BytesIO(image)) if "npy" in members else np.asarray(Image.open(io.BytesIO(image)))
        samples.append({"key": key, "image": pixels, "meta": json.loads(members["json"])})
    return out, samples


def _one(samples: list[dict], **want) -> dict:
    found = [s for s in samples if all(s["meta"]["dicom"].get(k) == v for k, v in want.items())]
    assert len(found) == 1, want
    return found[0]


def _eval(spacing_mm, size=224):
    return build_transform("none", size, (0, 0, 0), (1, 1, 1), train=False, spacing_mm=spacing_mm, normalize=False)


def test_dicom_spacing_is_kept_per_sample_and_a_zero_spacing_is_no_spacing(dicom_samples):
    """Every DICOM sample keeps its (row, column) spacing; RG1_J2KI.dcm (a real chest radiograph) writes
    PixelSpacing 0\\0, which is stored as no spacing rather than as a zero that would divide."""
    from medfound.data.scale import pixel_spacing, scale_stats

    out, samples = dicom_samples
    spacings = Counter((s["meta"]["dicom"]["modality"], tuple(s["meta"]["dicom"]["spacing_mm"] or ()))
                       for s in samples)
    assert spacings[("CR", ())] == 2  # RG1 (0\\0) and RG3 (no spacing at all)
    assert spacings[("CT", (0.478516, 0.478516))] == 1 and spacings[("MR", (0.195313, 0.195313))] == 1
    assert all(pixel_spacing(s["meta"]) is None or min(pixel_spacing(s["meta"])) > 0 for s in samples)
    # the set's median in-plane spacing is read from the nested DICOM meta
    assert 0.19 < scale_stats(out)["spacing_mm"] < 0.9


def test_spacing_mm_gives_a_field_of_img_size_times_spacing_mm(dicom_samples):
    """MR2_J2KI.dcm is 1024 px at 0.195313 mm = 200.0 mm: at 1 mm/px it is 200 px, centred in a 224-px field
    with 12 px of zero padding on each side (no rescaling to fill the field)."""
    mr2 = _one(dicom_samples[1], spacing_mm=[0.195313, 0.195313])
    out = _eval(1.0)(mr2)["image"]
    assert out.shape == (3, 224, 224)
    rows = (out.abs().sum(dim=(0, 2)) > 0).nonzero().flatten()
    cols = (out.abs().sum(dim=(0, 1)) > 0).nonzero().flatten()
    assert (int(rows.min()), int(rows.max())) == (12, 211) and (int(cols.min()), int(cols.max())) == (12, 211)
    # without data.spacing_mm the whole image is resized to the field
    whole = _eval(None)(mr2)["image"]
    assert (whole.abs().sum(dim=(0, 2)) > 0).sum() > 220


def test_a_sample_without_spacing_is_named_with_the_fix(dicom_samples):
    rg1 = _one(dicom_samples[1], body_part="CHEST")
    with pytest.raises(MissingMember, match=rf"sample {rg1['key']} has no pixel spacing.*--spacing-mm MM.*drop "
                                            r"data\.spacing_mm"):
        _eval(1.0)(rg1)


def _radiograph(samples: list[dict]) -> np.ndarray:
    """RG1_J2KI.dcm, a real chest radiograph (1955 x 1841), windowed to 8 bits by the transform's own DICOM path."""
    from medfound.data.transforms import to_unit_image

    rg1 = _one(samples, body_part="CHEST")
    x = to_unit_image(rg1["image"], rg1["meta"])[0].numpy()
    return (x * 255).round().astype(np.uint8)


def test_one_anatomy_at_two_detector_sizes_and_resolutions_gives_one_tensor(dicom_samples, tmp_path):
    """The radiograph at a stated 0.2 mm/px, and its central 60% as a smaller detector would see it, digitised at
    half the resolution (0.4 mm/px; PIL's Lanczos, not our resampler), sharded with a spacing_mm column: with
    data.spacing_mm=1.2 both give the same 224-px field (mean difference under 1.5 grey levels), while resizing
    each whole image to 224 (no data.spacing_mm) shows the anatomy 1.7x larger in the small one."""
    from medfound.workflows import shard

    full = _radiograph(dicom_samples[1])
    assert full.shape == (1955, 1841)
    h, w = full.shape
    top, left = int(h * 0.2), int(w * 0.2)
    small = Image.fromarray(full[top:top + int(h * 0.6), left:left + int(w * 0.6)])
    small = small.resize((small.width // 2, small.height // 2), Image.Resampling.LANCZOS)
    folder = tmp_path / "cxr"
    (folder / "images").mkdir(parents=True)
    Image.fromarray(full).save(folder / "images" / "full.png")
    small.save(folder / "images" / "small.png")
    with open(folder / "table.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "split", "spacing_mm"], ["images/full.png", "test", "0.2"],
                                 ["images/small.png", "test", "0.4,0.4"]])
    out = tmp_path / "set"
    shard("images", folder, out, table=folder / "table.csv", name="cxr", modality="cxr", keep_names=True)
    from helpers import tar_samples
    import io

    samples = {}
    for key, members in tar_samples(out).items():
        meta = json.loads(members["json"])
        samples[key.rsplit("_", 1)[-1]] = {"image": np.asarray(Image.open(io.BytesIO(members["png"]))), "meta": meta,
                                            "key": key}
    assert samples["full"]["meta"]["spacing_mm"] == [0.2, 0.2] and samples["small"]["meta"]["spacing_mm"] == [0.4, 0.4]
    a, b = (_eval(1.2)(samples[k])["image"].float() for k in ("full", "small"))
    centre = (slice(None), slice(40, 184), slice(40, 184))
    assert (a[centre] - b[centre]).abs().mean() < 1.5
    a0, b0 = (_eval(None)(samples[k])["image"].float() for k in ("full", "small"))
    assert (a0[centre] - b0[centre]).abs().mean() > 10 * (a[centre] - b[centre]).abs().mean()


def test_training_crops_keep_the_scale():
    """In training the field is cut at a random place, never rescaled: a crop of the 1-mm field is a window of
    the evaluation resampling."""
    from medfound.data.transforms import fit_field, to_spacing

    torch.manual_seed(0)
    x = torch.arange(3 * 300 * 280, dtype=torch.float32).reshape(3, 300, 280)
    resampled = to_spacing(x, (0.5, 0.5), 1.0)
    assert tuple(resampled.shape) == (3, 150, 140)
    crop = fit_field(to_spacing(x, (0.5, 0.5), 1.0), 100, train=True)
    hits = [(i, j) for i in range(51) for j in range(41) if torch.equal(resampled[:, i:i + 100, j:j + 100], crop)]
    assert len(hits) == 1
    padded = fit_field(resampled, 160, train=True)  # smaller than the field: centred, zero-padded
    assert torch.equal(padded[:, 5:155, 10:150], resampled) and padded[:, :5].abs().sum() == 0


def test_spacing_mm_is_read_by_image_tasks_only():
    from medfound.config import load_recipe

    with pytest.raises(ValueError, match="segmentation runs do not use data.spacing_mm=0.5: segmentation resamples"):
        load_recipe(ROOT / "adapt" / "segment_unet.yaml", ["data.spacing_mm=0.5"])
    with pytest.raises(ValueError, match="data.spacing_mm resamples by the pixel spacing .* keep one of them"):
        load_recipe(ROOT / "adapt" / "demo_classify_lora.yaml", ["data.spacing_mm=0.5", "data.fundus_crop=true"])
    with pytest.raises(ValueError, match="--spacing-mm 0.0"):
        from medfound.data.ingest.images import read_images
        read_images(DATA / "ct_organs", table=DATA / "ct_organs" / "aorta.csv", spacing_mm=0.0)


def _pneumonia_images(folder: Path, n_train: int = 48, n_test: int = 32) -> Path:
    """PneumoniaMNIST radiographs (bundled) as PNG files with a label column; 28 px over a chest is about 12.5 mm
    per pixel (stated here, in the spacing_mm column)."""
    z = np.load(DATA / "medmnist" / "pneumoniamnist_demo.npz")
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = [["path", "label", "split", "spacing_mm"]]
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            name = f"images/{split}_{i}.png"
            Image.fromarray(z[f"{split}_images"][i]).save(folder / name)
            rows.append([name, ["normal", "pneumonia"][int(z[f"{split}_labels"][i, 0])], split, "12.5"])
    with open(folder / "table.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return folder / "table.csv"


def test_a_classifier_trained_at_one_spacing_sees_a_set_at_another_as_its_own(pretrained, tmp_path):
    """Train with data.spacing_mm on radiographs at 12.5 mm/px; an external copy digitised at twice the resolution
    (`shard images --scale 2`: 6.25 mm/px, recorded per sample) reaches the model as the same input as the internal
    images and raises no scale warning; eval.json records both scales and the card states the spacing."""
    import io

    from medfound.config import load_recipe
    from medfound.data.loaders import eval_image_transform
    from medfound.workflows import evaluate, publish_run, run_finetune, shard

    from helpers import tar_samples, tiny_finetune_overrides

    table = _pneumonia_images(tmp_path / "png")
    sets = {}
    for name, scale in (("native", None), ("double", 2.0)):
        sets[name] = tmp_path / name
        shard("images", tmp_path / "png", sets[name], table=table, name=f"cxr_{name}", modality="cxr",
              keep_names=True, label_type="binary", label_names=["normal", "pneumonia"], scale=scale)
    assert {tuple(m["spacing_mm"]) for m in tar_metas(sets["double"])} == {(6.25, 6.25)}
    run = tmp_path / "run"
    recipe = load_recipe(ROOT / "adapt" / "demo_classify_lora.yaml", tiny_finetune_overrides(
        {"cxr": sets["native"]}, pretrained / "export", run, steps=2, key="cxr")
        + ["eval.bootstrap=0", "data.spacing_mm=12.5"])
    run_finetune(recipe)
    transform = eval_image_transform(recipe.data)
    inputs = {}
    for name in sets:
        for key, members in tar_samples(sets[name]).items():
            if key.endswith("test_3"):
                image = np.asarray(Image.open(io.BytesIO(members["png"])))
                inputs[name] = transform({"image": image, "meta": json.loads(members["json"]), "key": key})["image"]
    assert inputs["native"].shape == (3, 32, 32)  # 28 px at 12.5 mm, zero-padded to the 32-px field
    assert (inputs["native"].float() - inputs["double"].float()).abs().mean() < 3
    report = evaluate(run, external=[sets["double"]], out=tmp_path / "e")
    assert not any("tolerance" in w for w in report["warnings"])
    assert report["external"][0]["scale"]["spacing_mm"] == 6.25
    publish_run(run, tmp_path / "pub")
    prep = json.loads((tmp_path / "pub" / "preprocessing.json").read_text())
    assert prep["pixel_spacing_mm"].startswith("12.5 (every image is resampled to it")


def test_a_set_without_spacing_is_refused_before_training(pretrained, shards, tmp_path):
    from medfound.config import load_recipe
    from medfound.workflows import run_finetune

    from helpers import tiny_finetune_overrides

    with pytest.raises(MissingMember, match=r"shard set pneumoniamnist.*records no pixel spacing.*--spacing-mm MM"):
        run_finetune(load_recipe(ROOT / "adapt" / "demo_classify_lora.yaml", tiny_finetune_overrides(
            shards, pretrained / "export", tmp_path / "run", steps=2, key="pneumonia") + ["data.spacing_mm=1.0"]))
    assert not (tmp_path / "run" / "export").exists()


def test_the_cli_states_spacing_for_images_only(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "medfound.cli", "shard", "npz", str(DATA / "medmnist" /
                           "pneumoniamnist_demo.npz"), "--out", str(tmp_path / "x"), "--spacing-mm", "0.2"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and "`medfound shard npz` does not read --spacing-mm (read by images)" in proc.stderr
    assert not (tmp_path / "x").exists()
    table = _pneumonia_images(tmp_path / "png", n_train=4, n_test=2)
    proc = subprocess.run([sys.executable, "-m", "medfound.cli", "shard", "images", str(tmp_path / "png"), "--table",
                           str(table), "--out", str(tmp_path / "set"), "--spacing-mm", "0.5", "--scale", "0.5",
                           "--modality", "cxr"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    # the table's column (12.5 mm) wins over --spacing-mm for its rows; both are divided by --scale
    from medfound.data.manifest import read_manifest

    assert {tuple(m["spacing_mm"]) for m in tar_metas(tmp_path / "set")} == {(25.0, 25.0)}
    assert read_manifest(tmp_path / "set").ingest["spacing_mm"] == 1.0
    proc = subprocess.run([sys.executable, "-m", "medfound.cli", "inspect", str(tmp_path / "set")], cwd=ROOT,
                          capture_output=True, text=True)
    assert "  scale: pixel spacing 25 mm (medians of 6 samples)" in proc.stdout, proc.stdout


def test_the_spacing_warning_names_the_factor_that_fixes_it():
    """An external set at 0.4 mm/px beside training data at 0.2 needs its images doubled: the warning says
    `segment.scale=2` (2-D segmentation) and data.spacing_mm (classification); within 1.25x nothing is said, and a
    run that resamples (normalised) is not warned."""
    from medfound.data.scale import scale_warnings

    (w,) = scale_warnings("ext", {"spacing_mm": 0.4}, {"spacing_mm": 0.2})
    assert "pixels of 0.4 mm, the training data 0.2 mm (2.00x" in w and "`segment.scale=2`" in w
    assert "--scale 2`" in w and "data.spacing_mm" in w
    assert scale_warnings("ext", {"spacing_mm": 0.24}, {"spacing_mm": 0.2}) == []
    assert scale_warnings("ext", {"spacing_mm": 0.4}, {"spacing_mm": 0.2}, normalised=("spacing_mm",)) == []


def test_require_spacing_leaves_out_dicom_files_without_one_and_reads_enhanced_pixel_measures(tmp_path):
    """`shard dicom --require-spacing` skips, with the reason, the real files that have no usable spacing (RG1's
    0\\0, RG3, the enhanced MR without pixel measures and an ultrasound), so every sample of the set can be resampled;
    an enhanced multi-frame file's spacing is read from its Pixel Measures functional group (the same MR given one;
    pydicom's real liver.dcm SEG keeps its spacing there too)."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    from medfound.data.manifest import read_manifest
    from medfound.workflows import shard

    out = tmp_path / "strict"
    shard("dicom", shared("dicom"), out, name="strict", split_fractions={"train": 0.5, "test": 0.5},
          require_spacing=True)
    m = read_manifest(out)
    reason = next(r for r in m.skipped["by_reason"] if r.startswith("no pixel spacing"))
    assert m.skipped["by_reason"][reason] == 4 and m.ingest["require_spacing"] is True
    assert all(s["dicom"]["spacing_mm"] for s in tar_metas(out))

    ds = pydicom.dcmread(shared("dicom", "emri_small.dcm"))
    measures = Dataset()
    measures.PixelSpacing = [0.9375, 0.9375]
    group = Dataset()
    group.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([group])
    (tmp_path / "enhanced").mkdir()
    ds.save_as(tmp_path / "enhanced" / "mr.dcm")
    shard("dicom", tmp_path / "enhanced", tmp_path / "enhanced_set", name="enhanced", require_spacing=True,
          split_fractions={"train": 1.0})
    metas = tar_metas(tmp_path / "enhanced_set")
    assert len(metas) == 10 and {tuple(s["dicom"]["spacing_mm"]) for s in metas} == {(0.9375, 0.9375)}
    from medfound.data.ingest.dicom import dicom_spacing

    assert dicom_spacing(pydicom.dcmread(shared("dicom", "liver.dcm"))) == [0.810547, 0.810547]
