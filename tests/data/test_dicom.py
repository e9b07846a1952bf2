"""DICOM ingest on real files (../shared/data/dicom): every file becomes samples or is reported with a
reason; no PHI value reaches a shard, the manifest or the console; pixels keep their full depth and the
transform applies rescale, window and MONOCHROME1."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medfound.data.manifest import read_manifest
from medfound.data.transforms import WINDOWS, to_unit_image

from helpers import ROOT, shared, tar_samples

PHI_TAGS = ("PatientName", "PatientID", "PatientBirthDate", "StudyDate", "SeriesDate", "AccessionNumber",
            "InstitutionName", "ReferringPhysicianName", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


def _phi_values(folder: Path) -> set[str]:
    import pydicom
    values = set()
    for p in folder.glob("*.dcm"):
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        for tag in PHI_TAGS:
            v = str(ds.get(tag, "") or "").strip()
            if len(v) >= 4:
                values.add(v)
    return values


def _members(directory: Path) -> dict[str, bytes]:
    return {f"{k}.{ext}": b for k, exts in tar_samples(directory).items() for ext, b in exts.items()}


@pytest.fixture(scope="module")
def dicom_set(tmp_path_factory):
    pytest.importorskip("pydicom")
    src = shared("dicom")
    out = tmp_path_factory.mktemp("dicom") / "set"
    proc = subprocess.run([sys.executable, "-m", "medfound.cli", "shard", "dicom", str(src), "--out", str(out),
                           "--split-fractions", "train=0.5,test=0.5"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return src, out, proc.stdout + proc.stderr


def test_every_file_is_written_or_reported(dicom_set):
    src, out, console = dicom_set
    m = read_manifest(out)
    files = sorted(p.name for p in src.iterdir() if p.is_file())
    reported = {line.split(":")[0].strip() for line in console.splitlines() if line.startswith("  ")}
    written = m.deidentification["files_deidentified"]
    assert written + m.skipped["count"] == len(files)
    assert reported == {"liver.dcm", "PROVENANCE.txt"}  # a SEG object and a text file, each with its reason
    assert m.skipped["by_reason"] == {"segmentation object (SEG), not an image": 1,
                                      "not a DICOM file (no DICM preamble)": 1}
    assert "bad_sequence.dcm" not in reported  # the malformed file is read, never crashes the run
    assert m.counts["total"] == written - 1 + 10  # the 10-frame MR gives one sample per frame
    assert m.modality == "mixed" and m.counts["by_modality"] == {"ct": 3, "cxr": 1, "mr": 12, "us": 2, "xray": 1}
    assert f"de-identified: {written} files" in console


def test_no_phi_in_any_byte(dicom_set):
    src, out, console = dicom_set
    phi = _phi_values(src)
    assert len(phi) > 15  # names, IDs, dates and UIDs of the real files
    blobs = list(_members(out).values()) + [(out / "manifest.json").read_bytes(), console.encode()]
    leaks = sorted(v for v in phi for b in blobs if v.encode() in b)
    assert leaks == [], f"PHI values found in shards/manifest/console: {leaks[:5]}"
    names = [p.stem for p in src.glob("*.dcm")]
    assert not any(n.encode() in b for n in names for b in blobs[:-1])  # nor the file names (keys are hashes)


def test_full_depth_pixels_and_meta(dicom_set):
    import pydicom
    src, out, _ = dicom_set
    members = _members(out)
    metas = {k[: -len(".json")]: json.loads(v) for k, v in members.items() if k.endswith(".json")}
    ct = [k for k, m in metas.items() if m["dicom"]["modality"] == "CT" and m["dicom"]["shift"] == -32768]
    assert ct, "signed CT pixels are stored shifted into 16 bits"
    ref = pydicom.dcmread(src / "693_J2KR.dcm").pixel_array.astype(np.int32)
    stored = [np.asarray(Image.open(io.BytesIO(members[k + ".png"]))).astype(np.int32) - 32768 for k in ct]
    assert any(s.shape == ref.shape and np.array_equal(s, ref) for s in stored)  # lossless, full depth
    cr = next(m for m in metas.values() if m["dicom"]["modality"] == "CR" and m["dicom"]["body_part"] == "CHEST")
    assert cr["dicom"]["invert"] is True and cr["modality"] == "cxr"
    mr = [m for m in metas.values() if m["dicom"]["frames"] == 10]
    assert sorted(m["dicom"]["frame"] for m in mr) == list(range(10))
    assert all(m["patient"] and len(m["patient"]) == 16 for m in metas.values())
    for m in metas.values():  # only allow-listed facts
        assert set(m) <= {"dicom", "split", "modality", "patient", "site"}


def test_rescale_window_and_monochrome1():
    meta = {"dicom": {"rescale": [1.0, -1024.0], "shift": 0, "window": [40.0, 400.0], "invert": False}}
    stored = np.array([[424, 1024], [1024 - 1000, 4000]], dtype=np.uint16)  # HU -600, 0, -1000, 2976
    lung = to_unit_image(stored, meta, window="lung")
    c, w = WINDOWS["lung"]
    expected = np.clip((np.array([[-600, 0], [-1000, 2976]]) - (c - w / 2)) / w, 0, 1)
    assert np.allclose(lung[0].numpy(), expected, atol=1e-6) and lung.shape == (3, 2, 2)
    file_window = to_unit_image(stored, meta)  # the file's own window: 40 +- 200 HU
    assert np.allclose(file_window[0].numpy(), np.clip((np.array([[-600, 0], [-1000, 2976]]) + 160) / 400, 0, 1))
    inverted = to_unit_image(stored, {"dicom": {**meta["dicom"], "invert": True}}, window="lung")
    assert np.allclose(inverted.numpy(), 1 - lung.numpy())
    with pytest.raises(ValueError, match="unknown window"):
        to_unit_image(stored, meta, window="liver")
