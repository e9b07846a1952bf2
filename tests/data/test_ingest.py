"""Ingest readers on real images: images+CSV with patient-level splits and no PHI; WSI tiling at a
stated µm/px with tissue detection; the clear errors for slides without resolution metadata."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medfound.data.ingest.wsi import otsu_threshold, read_wsi
from medfound.data.manifest import read_manifest
from medfound.workflows import shard

from helpers import DATA, ROOT, shared, tar_metas


def _image_folder(tmp_path: Path, n: int = 60) -> Path:
    """Real PneumoniaMNIST images as PNG files, a CSV with patient IDs that look like PHI."""
    z = np.load(DATA / "medmnist" / "pneumoniamnist_demo.npz")
    folder = tmp_path / "xrays"
    (folder / "img").mkdir(parents=True)
    rows = []
    for i in range(n):
        j = i * 16  # spread over the archive, which holds normal then pneumonia images
        name = f"img/DOE_JOHN_{i:03d}.png"
        Image.fromarray(z["train_images"][j]).save(folder / name)
        rows.append({"path": name, "label": ["normal", "pneumonia"][int(z["train_labels"][j, 0])],
                     "patient_id": f"MRN{i // 3:05d}", "site": "siteA" if i < 30 else "siteB"})
    with open(folder / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return folder


def test_images_csv_patient_level_split_and_no_phi(tmp_path):
    folder = _image_folder(tmp_path)
    out = tmp_path / "shards"
    m, skipped = shard("images", folder, out, name="xr", modality="cxr",
                       split_fractions={"train": 0.5, "val": 0.25, "test": 0.25})
    assert m.counts["total"] == 60 and skipped == []
    assert m.label_schema.names == ["normal", "pneumonia"] and m.label_schema.type == "binary"
    assert m.counts["by_site"] == {"siteA": 30, "siteB": 30} and m.counts["by_modality"] == {"cxr": 60}
    assert set(m.counts["by_split"]) == {"train", "val", "test"}
    metas = tar_metas(out)
    splits_by_patient: dict[str, set] = {}
    for meta in metas:
        splits_by_patient.setdefault(meta["patient"], set()).add(meta["split"])
    assert len(splits_by_patient) == 20  # 20 patients, 3 images each, as tokens
    assert all(len(s) == 1 for s in splits_by_patient.values())  # no patient in two splits
    # no patient ID or file name anywhere in the shards or the manifest
    blobs = [p.read_bytes() for p in out.iterdir()]
    for needle in (b"MRN", b"DOE_JOHN"):
        assert not any(needle in b for b in blobs), needle
    # the same table gives the same split; another salt another token
    m2, _ = shard("images", folder, tmp_path / "again", name="xr", modality="cxr",
                  split_fractions={"train": 0.5, "val": 0.25, "test": 0.25})
    assert m2.digest == m.digest
    shard("images", folder, tmp_path / "salted", name="xr", modality="cxr", salt="cohort-secret")
    assert {x["patient"] for x in tar_metas(tmp_path / "salted")}.isdisjoint(splits_by_patient)


def test_single_class_table_is_explained(tmp_path):
    folder = _image_folder(tmp_path, n=4)
    with pytest.raises(ValueError, match="single class.*--label-names"):
        shard("images", folder, tmp_path / "s", modality="cxr")
    m, _ = shard("images", folder, tmp_path / "s", modality="cxr", label_names=["normal", "pneumonia"])
    assert m.label_schema.names == ["normal", "pneumonia"]


def test_a_missing_image_is_skipped_and_named_by_its_row(tmp_path):
    folder = _image_folder(tmp_path, n=4)
    with open(folder / "labels.csv", "a") as f:
        f.write("img/missing.png,normal,MRN9,siteA\n")
    m, skipped = shard("images", folder, tmp_path / "s", modality="cxr", label_names=["normal", "pneumonia"])
    assert m.counts["total"] == 4 and m.skipped == {"count": 1, "by_reason": {"image file not found": 1}}
    assert skipped == [("table row 6", "img/missing.png", "image file not found")]


def test_wsi_tiles_at_the_stated_mpp(shards):
    m = read_manifest(shards["he"])
    assert m.ingest["mpp"] == 1.0 and m.ingest["tile_size"] == 64
    assert m.label_schema.type == "none"
    tiles = list(read_wsi(DATA / "wsi" / "CMU-1-Small-Region.svs", mpp=1.0, tile_size=64, min_tissue=0.5,
                          keep_names=True).samples)
    assert len(tiles) == m.counts["total"] > 50
    step0 = 64 * 1.0 / 0.499  # level-0 pixels per tile
    for t in tiles:
        meta = t["meta"]
        assert t["image"].size == (64, 64)
        assert meta["mpp"] == 1.0 and meta["slide_mpp"] == 0.499 and meta["tissue"] >= 0.5
        assert meta["x"] + step0 <= 2220 + 1 and meta["y"] + step0 <= 2967 + 1
        # tissue tiles are coloured, not white glass
        hsv = np.asarray(t["image"].convert("HSV"))
        assert hsv[..., 1].mean() > 20
    # all tissue at a lower threshold is a superset
    loose = list(read_wsi(DATA / "wsi" / "CMU-1-Small-Region.svs", mpp=1.0, tile_size=64, min_tissue=0.1).samples)
    assert len(loose) > len(tiles)


def test_wsi_refuses_upsampling():
    with pytest.raises(ValueError, match="finer than the scan"):
        list(read_wsi(DATA / "wsi" / "CMU-1-Small-Region.svs", mpp=0.25, tile_size=64).samples)


def test_wsi_without_mpp_needs_it_stated():
    slide = shared("wsi", "TCGA-CR-7395-01A-01-TS1_small.svs")
    with pytest.raises(ValueError, match="without microns-per-pixel metadata.*--slide-mpp"):
        list(read_wsi(slide, mpp=4.0, tile_size=64).samples)
    tiles = list(read_wsi(slide, mpp=4.0, tile_size=64, slide_mpp=0.5).samples)
    assert tiles and all(t["meta"]["level"] == 1 for t in tiles)  # read from the 2x level, not level 0


def test_plain_tiff_gives_a_clear_message():
    tif = shared("wsi", "kidney-48-5_ihc.tif")
    with pytest.raises(ValueError, match="plain \\(non-pyramidal\\) TIFF"):
        list(read_wsi(tif, mpp=1.0, tile_size=64).samples)


def test_otsu_separates_two_modes():
    rng = np.random.default_rng(0)
    v = np.concatenate([rng.normal(30, 5, 5000), rng.normal(180, 10, 5000)]).clip(0, 255).astype(np.uint8)
    t = otsu_threshold(v)
    assert v[v < 100].max() <= t < v[v > 100].min()  # separates the modes
    assert 90 < t < 130  # and sits mid-gap, not at the edge of one mode


def _table_set(tmp_path, rows: str, label_names=None):
    """An images folder of real PneumoniaMNIST pixels with the given CSV, sharded."""
    folder = tmp_path / "imgs"
    folder.mkdir(exist_ok=True)
    arr = np.load(DATA / "medmnist" / "pneumoniamnist_demo.npz")["train_images"]
    for i in range(4):
        Image.fromarray(arr[i]).save(folder / f"{i}.png")
    (folder / "labels.csv").write_text(rows)
    return shard("images", folder, tmp_path / "out", label_names=label_names)


NAMES = ["normal", "pneumonia"]


@pytest.mark.parametrize("rows,names,message", [
    ("path,lable\n0.png,0\n1.png,1\n", None, "unknown column 'lable'; did you mean 'label'?"),
    ("path,label,patientid\n0.png,0,p1\n1.png,1,p1\n", None, "unknown column 'patientid'; did you mean 'patient_id'?"),
    ("path,label\n0.png,normal\n1.png,banana\n", NAMES, "table row 3: label 'banana' is not one of the class names"),
    ("path,label\n0.png,0\n1.png,1\n2.png,7\n", NAMES, "table row 4: label 7 outside 0..1"),
    ("path,label\n0.png,0\n1.png,1\n2.png,7\n", None, "leave classes [2, 3, 4, 5, 6] without a sample"),
])
def test_silent_table_mistakes_are_errors_naming_the_row_or_column(tmp_path, rows, names, message):
    with pytest.raises(ValueError) as e:
        _table_set(tmp_path, rows, names)
    assert message in str(e.value)
    assert not (tmp_path / "out").exists()


def test_a_correct_table_still_shards(tmp_path):
    m, _ = _table_set(tmp_path, "path,label,patient_id,mask_x\n0.png,normal,p1,\n1.png,pneumonia,p2,\n", NAMES)
    assert m.counts["total"] == 2


def test_bad_images_are_skipped_counted_and_named_by_row(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    arr = np.load(DATA / "medmnist" / "pneumoniamnist_demo.npz")["train_images"]
    for i in range(3):
        Image.fromarray(arr[i]).save(folder / f"{i}.png")
    (folder / "truncated.png").write_bytes((folder / "0.png").read_bytes()[:60])
    Image.fromarray(np.random.default_rng(0).random((8, 8), dtype=np.float32), mode="F").save(folder / "float.tif")
    Image.new("L", (3000, 3000)).save(folder / "bomb.png")  # 9 Mpx: over the limit the test sets below
    rows = "path,label\n0.png,0\n1.png,1\n2.png,0\ntruncated.png,1\nfloat.tif,0\nbomb.png,1\nmissing.png,0\n"
    (folder / "labels.csv").write_text(rows)
    script = ("import sys, PIL.Image; PIL.Image.MAX_IMAGE_PIXELS = 4_000_000; from medfound.cli import main; "
              "sys.exit(main(sys.argv[1:]))")
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-c", script, "shard", "images", str(folder), "--out", str(tmp_path / "o"),
                           "--label-names", "normal,pneumonia"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    m = read_manifest(tmp_path / "o")
    assert m.counts["total"] == 3 and m.skipped["count"] == 4
    reasons = m.skipped["by_reason"]
    assert reasons["image file not found"] == 1 and reasons["cannot decode the image (OSError)"] == 1
    assert any(r.startswith("32-bit image (PIL mode F)") for r in reasons)
    assert any(r.startswith("over the decompression-bomb limit of 4,000,000 pixels") for r in reasons)
    assert "table row 5: cannot decode" in proc.stdout and "truncated.png" not in proc.stdout


def test_images_mpp_is_recorded_and_refused_where_it_means_nothing(tmp_path, capsys):
    """Issue 17, item 13: `--mpp` for an image folder was accepted and dropped; it now reaches the manifest (and so
    the lineage and the card's preprocessing), and kinds with their own spacing refuse it."""
    from medfound.cli import main
    from medfound.run import dataset_record

    assert main(["shard", "images", str(DATA / "ct_organs"), "--table", str(DATA / "ct_organs" / "organs.csv"),
                 "--out", str(tmp_path / "he"), "--mpp", "0.495", "--workers", "1"]) == 0
    m = read_manifest(tmp_path / "he")
    assert m.ingest["mpp"] == 0.495 and dataset_record(m)["mpp"] == 0.495
    assert main(["shard", "npz", str(DATA / "medmnist" / "retinamnist_demo.npz"), "--out", str(tmp_path / "n"),
                 "--mpp", "0.5"]) == 1
    assert "`medfound shard npz` does not read --mpp (read by images, wsi)" in capsys.readouterr().err
    assert not (tmp_path / "n").exists()


def test_an_option_of_another_ingest_kind_is_refused_naming_the_kinds_that_read_it(tmp_path, capsys):
    """Issue 29: `shard npz --split-fractions --tile-size --layout` succeeded and ignored all three. Each reader's
    keyword parameters are its options; one it does not read is an error naming the kinds that do, before anything
    is written, from the CLI and from Python alike; the options a kind reads still pass."""
    from medfound.cli import main
    from medfound.data.ingest import reader_options
    from medfound.workflows import shard

    npz = str(DATA / "medmnist" / "retinamnist_demo.npz")
    assert main(["shard", "npz", npz, "--out", str(tmp_path / "n"), "--split-fractions", "train=1",
                 "--tile-size", "64", "--layout", "slices"]) == 1
    err = capsys.readouterr().err
    assert ("`medfound shard npz` does not read --layout (read by volumes); --split-fractions (read by dicom, images, "
            "volumes); --tile-size (read by wsi): drop them") in err
    assert not (tmp_path / "n").exists()
    with pytest.raises(ValueError, match=r"`medfound shard volumes` does not read --fov \(read by images\)"):
        shard("volumes", DATA / "volumes", tmp_path / "v", fov="detect")
    assert not (tmp_path / "v").exists()
    assert {"tile_size", "min_tissue", "mpp"} <= reader_options("wsi") and "tile_size" not in reader_options("images")
    assert main(["shard", "npz", npz, "--out", str(tmp_path / "ok"), "--label-type", "ordinal"]) == 0  # read by npz


def test_shard_kind_help_lists_exactly_that_kinds_options(capsys):
    """Issue 29: `shard KIND --help` shows the shared options and exactly the options KIND's reader reads; every
    reader option has its help entry (medfound.data.ingest.options) and no entry is orphaned."""
    from medfound.cli import main
    from medfound.data.ingest import reader_options
    from medfound.data.ingest.options import OPTIONS
    from medfound.registry import INGEST_KINDS

    every = set().union(*(reader_options(k) for k in INGEST_KINDS.names()))
    assert every == set(OPTIONS), every ^ set(OPTIONS)
    for kind in INGEST_KINDS.names():
        with pytest.raises(SystemExit):
            main(["shard", kind, "--help"])
        text = capsys.readouterr().out
        flags = {line.split()[0].removeprefix("--").replace("-", "_") for line in text.splitlines()
                 if line.startswith("  --")}  # the options argparse lists, one per line
        own = reader_options(kind)
        assert own <= flags and not (set(OPTIONS) - own) & flags, (kind, sorted(flags))
        assert "out" in flags and f"{kind} options:" in text
