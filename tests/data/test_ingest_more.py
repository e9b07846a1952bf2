"""Real-data ingest: 3-D volumes keep spacing and label maps; DRIVE shards carry image, vessel and FOV
masks; WSI tiles at 0.5 µm/px map back onto tissue; leakage in a user's split column is reported;
multi-label and Parquet tables."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medfound.cli import main
from medfound.data.fundus import detect_fov
from medfound.data.manifest import patient_leakage
from medfound.workflows import shard

from helpers import DATA, shared, tar_samples


def _npy(b: bytes) -> np.ndarray:
    return np.load(io.BytesIO(b), allow_pickle=False)


@pytest.fixture(scope="module")
def volumes():
    pytest.importorskip("monai")
    pytest.importorskip("nrrd")
    return shared("volumes")


def test_volumes_keep_spacing_orientation_and_labels(volumes, tmp_path):
    import nrrd
    m, _ = shard("volumes", volumes, tmp_path / "v", modality="mr", keep_names=True)
    assert m.counts["total"] == 3 and m.fields == ["json", "label.npy", "npy"]
    s = tar_samples(tmp_path / "v")
    meta = json.loads(s["brain1_image"]["json"])
    assert meta["spacing_mm"] == pytest.approx([0.78125, 0.78125, 6.5], rel=1e-4)
    assert len(meta["orientation"]) == 3 and meta["volume_shape"] == [256, 256, 25]
    image, label = _npy(s["brain1_image"]["npy"]), _npy(s["brain1_image"]["label.npy"])
    raw, _ = nrrd.read(str(volumes / "brain1_image.nrrd"))
    raw_label, _ = nrrd.read(str(volumes / "brain1_label.nrrd"))
    assert image.dtype == raw.dtype and image.shape == raw.shape  # source dtype (int16) kept exactly
    assert np.array_equal(np.sort(image.ravel()), np.sort(raw.ravel()))
    assert label.sum() == (raw_label > 0).sum() > 0


def test_volume_slices_and_patches(volumes, tmp_path):
    m, _ = shard("volumes", volumes, tmp_path / "s", modality="mr", layout="slices", keep_names=True)
    assert m.counts["total"] == 25 + 23 + 21  # along the coarse (6.5 mm) axis of each volume
    s = tar_samples(tmp_path / "s")
    meta = json.loads(s["brain1_image_s0012"]["json"])
    assert meta["axis"] == 2 and meta["slice_spacing_mm"] == pytest.approx(6.5, rel=1e-4)
    assert meta["spacing_mm"] == pytest.approx([0.78125, 0.78125], rel=1e-4)
    assert _npy(s["brain1_image_s0012"]["npy"]).shape == (256, 256)
    assert "label.png" in s["brain1_image_s0012"]  # 2-D label slices as PNG beside the image
    m, _ = shard("volumes", volumes, tmp_path / "p", modality="mr", layout="patches", patch=[32, 32, 16],
                 keep_names=True)
    p = tar_samples(tmp_path / "p")
    brain = [k for k in p if k.startswith("brain1")]
    assert len(brain) == 8 * 8 * 2  # 256/32 x 256/32 x (0 and 25-16): every voxel covered
    assert all(_npy(p[k]["npy"]).shape == (32, 32, 16) for k in brain)
    breast = [json.loads(p[k]["json"])["origin"] for k in p if k.startswith("breast1")]
    assert sorted(breast)[-1] == [13, 88, 5]  # 45x120x21: the last patch aligned to the far corner
    with pytest.raises(ValueError, match="breast1_image.nrrd: volume \\(45, 120, 21\\) is smaller than the patch"):
        shard("volumes", volumes, tmp_path / "big", layout="patches", patch=[64, 64, 16])


def _drive_table(root: Path, split: str, n: int) -> Path:
    folder = root / split
    rows = []
    for img in sorted((folder / "images").glob("*.tif"))[:n]:
        num = img.name.split("_")[0]
        rows.append({"path": f"images/{img.name}", "mask": f"1st_manual/{num}_manual1.gif",
                     "fov": f"mask/{num}_{split}_mask.gif", "split": "train" if split == "training" else "test"})
    table = root.parent / f"drive_{split}.csv"
    with open(table, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return table


def test_drive_shards_carry_image_vessels_and_fov(tmp_path):
    drive = shared("drive")
    table = _drive_table(drive, "training", 3)
    m, _ = shard("images", drive / "training", tmp_path / "d", table=table, modality="fundus")
    assert m.fields == ["fov.png", "json", "mask.png", "png"]
    s = next(iter(tar_samples(tmp_path / "d").values()))
    image = np.asarray(Image.open(io.BytesIO(s["png"])))
    vessels, fov = (np.asarray(Image.open(io.BytesIO(s[k]))) for k in ("mask.png", "fov.png"))
    assert image.shape == (584, 565, 3) and vessels.shape == fov.shape == (584, 565)
    assert set(np.unique(vessels)) == {0, 255} and 0.05 < (vessels > 0).mean() < 0.2
    # crop to the field of view: masks cropped with it
    m, _ = shard("images", drive / "training", tmp_path / "c", table=table, modality="fundus", fov="crop")
    c = next(iter(tar_samples(tmp_path / "c").values()))
    cropped = np.asarray(Image.open(io.BytesIO(c["png"])))
    assert cropped.shape[0] < 584 and cropped.shape[:2] == np.asarray(Image.open(io.BytesIO(c["mask.png"]))).shape


def test_fov_detection_matches_the_drive_masks():
    drive = shared("drive")
    ious = []
    images = sorted((drive / "testing" / "images").glob("*.tif"))
    assert len(images) == 20
    for img in images:
        num = img.name.split("_")[0]
        truth = np.asarray(Image.open(drive / "testing" / "mask" / f"{num}_test_mask.gif").convert("L")) > 0
        found = detect_fov(np.asarray(Image.open(img).convert("RGB")))
        ious.append((found & truth).sum() / (found | truth).sum())
    assert min(ious) > 0.95, ious


def test_wsi_tiles_at_half_micron_map_back_onto_tissue(tmp_path):
    import tiffslide
    slide_path = DATA / "wsi" / "CMU-1-Small-Region.svs"
    table = tmp_path / "slides.csv"
    table.write_text("slide,label,split\nCMU-1-Small-Region.svs,tumour,train\n")
    m, _ = shard("wsi", slide_path.parent, tmp_path / "w", table=table, label_names=["normal", "tumour"],
                 mpp=0.5, tile_size=224, min_tissue=0.6, keep_names=True)
    assert m.bags == [{"slide": "CMU-1-Small-Region", "label": 1, "split": "train", "site": None,
                       "tiles": m.counts["total"]}]
    slide = tiffslide.TiffSlide(str(slide_path))
    s = tar_samples(tmp_path / "w")
    assert len(s) > 20
    for key in list(s)[:: max(1, len(s) // 8)]:
        meta = json.loads(s[key]["json"])
        tile = np.asarray(Image.open(io.BytesIO(s[key]["png"])))
        assert meta["mpp"] == 0.5 and meta["level"] == 0 and int(s[key]["cls"]) == 1
        region = np.asarray(slide.read_region((meta["x"], meta["y"]), 0, (224, 224)).convert("RGB"))
        assert np.abs(region.astype(int) - tile.astype(int)).mean() < 3  # same place (0.499 -> 0.5 µm/px)
        assert np.asarray(Image.fromarray(tile).convert("HSV"))[..., 1].mean() > 25  # stained tissue


def test_leakage_in_a_user_split_column_is_reported(tmp_path, capsys):
    z = np.load(DATA / "medmnist" / "pneumoniamnist_demo.npz")
    folder = tmp_path / "imgs"
    folder.mkdir()
    rows = []
    for i in range(8):
        Image.fromarray(z["train_images"][i * 100]).save(folder / f"{i}.png")
        rows.append(f"{i}.png,{int(z['train_labels'][i * 100, 0])},P{i // 2},{'train' if i < 5 else 'test'}")
    (folder / "labels.csv").write_text("path,label,patient_id,split\n" + "\n".join(rows) + "\n")
    shard("images", folder, tmp_path / "s", label_names=["normal", "pneumonia"])
    leak = patient_leakage(tmp_path / "s")
    assert len(leak) == 1 and list(leak.values()) == [["test", "train"]]  # patient P2: images 4 and 5
    assert main(["inspect", str(tmp_path / "s")]) == 1
    assert "LEAKAGE 1 patients appear in more than one split" in capsys.readouterr().out
    (folder / "labels.csv").write_text("path,label,patient_id\n" + "\n".join(r.rsplit(",", 1)[0] for r in rows))
    shard("images", folder, tmp_path / "ok", label_names=["normal", "pneumonia"])
    assert patient_leakage(tmp_path / "ok") == {}  # split by patient: none


def test_multilabel_and_parquet_tables(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    z = np.load(DATA / "medmnist" / "pneumoniamnist_demo.npz")
    folder = tmp_path / "cxr"
    folder.mkdir()
    findings = [["effusion"], ["effusion", "nodule"], [], ["cardiomegaly", "nodule"]]
    for i in range(4):
        Image.fromarray(z["train_images"][i]).save(folder / f"{i}.png")
    pq.write_table(pa.table({"path": [f"{i}.png" for i in range(4)], "labels": ["|".join(f) for f in findings],
                             "split": ["train"] * 4}), folder / "labels.parquet")
    m, _ = shard("images", folder, tmp_path / "s", modality="cxr")
    assert m.label_schema.type == "multilabel" and m.label_schema.names == ["cardiomegaly", "effusion", "nodule"]
    assert m.counts["by_label"]["train"] == {"cardiomegaly": 1, "effusion": 2, "nodule": 2}
    s = tar_samples(tmp_path / "s")
    got = sorted(json.loads(v["labels.json"]) for v in s.values())
    assert got == sorted([[1], [1, 2], [], [0, 2]])

    from medfound.data.pipeline import Decoding, make_loader, shard_urls
    from medfound.data.transforms import build_transform
    urls, _ = shard_urls([tmp_path / "s"], "train")
    batch = next(iter(make_loader(urls, Decoding(build_transform("none", 32, (0.5,) * 3, (0.5,) * 3, train=False),
                                                 labelled=True, num_classes=3, multilabel=True), batch_size=4)))
    assert batch["label"].shape == (4, 3) and batch["label"].sum().item() == 5


def test_nifti_volumes_read_like_nrrd(volumes, tmp_path):
    import nibabel as nib
    import nrrd
    data, header = nrrd.read(str(volumes / "brain2_image.nrrd"))
    label, _ = nrrd.read(str(volumes / "brain2_label.nrrd"))
    spacing = np.linalg.norm(np.asarray(header["space directions"], dtype=float), axis=1)
    folder = tmp_path / "nii"
    folder.mkdir()
    affine = np.diag([*spacing, 1.0])
    nib.save(nib.Nifti1Image(data, affine), folder / "case_image.nii.gz")
    nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), folder / "case_label.nii.gz")
    m, _ = shard("volumes", folder, tmp_path / "s", modality="mr", keep_names=True)
    s = tar_samples(tmp_path / "s")["case_image"]
    assert json.loads(s["json"])["spacing_mm"] == pytest.approx(list(spacing), rel=1e-5)
    image = _npy(s["npy"])
    assert image.dtype == data.dtype and np.array_equal(np.sort(image.ravel()), np.sort(data.ravel()))
    assert _npy(s["label.npy"]).sum() == (label > 0).sum()


def test_one_image_in_several_rows_gives_one_sample_per_mask_and_views_reach_the_meta(organ_shards, view_shards):
    from helpers import tar_metas, tar_samples

    keys = sorted(tar_samples(organ_shards))
    assert len(keys) == 30 and len(set(keys)) == 30
    assert any(k.startswith("images_amos_0004_75_amos_0004_75_aorta_000") for k in keys)
    metas = tar_metas(view_shards)
    assert {m["view"] for m in metas} == {"CC", "MLO"} and {m["laterality"] for m in metas} == {"L", "R"}
    assert all(m["patient"] for m in metas)  # the patient token, never the ID
