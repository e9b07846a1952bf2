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
    files = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    reported = {files[int(line.split("#")[1].split(":")[0])] for line in console.splitlines()
                if line.startswith("  input #")}
    written = m.deidentification["files_deidentified"]
    assert written + m.skipped["count"] == len(files)
    # a SEG object, a text file and an ultrasound without BurnedInAnnotation=NO, each with its reason
    assert reported == {"liver.dcm", "PROVENANCE.txt", "US1_J2KR.dcm"}
    assert m.skipped["by_reason"] == {"segmentation object (SEG), not an image": 1,
                                      "not a DICOM file (no DICM preamble)": 1,
                                      "may carry burned-in text (modality US without BurnedInAnnotation=NO)": 1}
    assert "bad_sequence.dcm" not in reported  # the malformed file is read, never crashes the run
    assert m.counts["total"] == written - 1 + 10  # the 10-frame MR gives one sample per frame
    assert m.modality == "mixed" and m.counts["by_modality"] == {"ct": 3, "cxr": 1, "mr": 12, "us": 1, "xray": 1}
    assert f"de-identified: {written} files" in console and "1 refused for burned-in PHI" in console
    burned = m.deidentification["burned_in"]
    assert burned["refused"] == 1 and burned["allowed"] == 0 and burned["policy"].startswith("refused")
    assert not any(name in console for name in files)  # skipped files are shown by index only (names carry PHI)


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


def _crafted(path: Path, *, burned: str | None = None, modality: str = "CT", body_part: str = "CHEST",
             patient: str = "DOE^JOHN", sop_class: str = "1.2.840.10008.5.1.4.1.1.2") -> Path:
    """A small valid DICOM file built in the test (never a checked-in crafted file)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.BodyPartExamined, ds.PatientID, ds.PatientName = modality, body_part, patient, patient
    if burned is not None:
        ds.BurnedInAnnotation = burned
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = (np.arange(64, dtype=np.uint8)).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def _shard(src: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medfound.cli", "shard", "dicom", str(src), "--out", str(out), *extra],
                          cwd=ROOT, capture_output=True, text=True)


def test_burned_in_pixels_are_refused_unless_allowed(tmp_path):
    pytest.importorskip("pydicom")
    src = tmp_path / "in"
    _crafted(src / "DOE_JOHN_PID12345" / "a_yes.dcm", burned="YES")
    _crafted(src / "DOE_JOHN_PID12345" / "b_us_absent.dcm", modality="US", sop_class="1.2.840.10008.5.1.4.1.1.6.1")
    _crafted(src / "c_sc_absent.dcm", modality="OT", sop_class="1.2.840.10008.5.1.4.1.1.7")
    _crafted(src / "d_us_no.dcm", burned="NO", modality="US", sop_class="1.2.840.10008.5.1.4.1.1.6.1")
    _crafted(src / "e_ct.dcm")
    # angiography and fluoroscopy frames carry the console's patient banner; a flag other than NO promises nothing
    _crafted(src / "f_xa_absent.dcm", modality="XA", sop_class="1.2.840.10008.5.1.4.1.1.12.1")
    _crafted(src / "g_rf_absent.dcm", modality="RF", sop_class="1.2.840.10008.5.1.4.1.1.12.2")
    _crafted(src / "h_ct_y.dcm", burned="Y")
    _crafted(src / "i_ct_free_text.dcm", burned="JOHNATHAN")
    proc = _shard(src, tmp_path / "refused", "--skipped-list", str(tmp_path / "skipped.csv"))
    assert proc.returncode == 0, proc.stderr
    m = read_manifest(tmp_path / "refused")
    assert m.counts["total"] == 2 and m.deidentification["files_deidentified"] == 2
    assert m.skipped["count"] == 7
    assert m.skipped["by_reason"] == {
        "burned-in annotation (BurnedInAnnotation=YES): the pixels may show PHI": 1,
        "may carry burned-in text (modality US without BurnedInAnnotation=NO)": 1,
        "may carry burned-in text (secondary capture without BurnedInAnnotation=NO)": 1,
        "may carry burned-in text (modality XA without BurnedInAnnotation=NO)": 1,
        "may carry burned-in text (modality RF without BurnedInAnnotation=NO)": 1,
        "burned-in annotation not ruled out (BurnedInAnnotation is set, but not to the defined term NO)": 2}
    assert m.deidentification["burned_in"]["refused"] == 7
    assert b"JOHNATHAN" not in (tmp_path / "refused" / "manifest.json").read_bytes()
    console = proc.stdout + proc.stderr
    assert "DOE_JOHN" not in console and "PID12345" not in console and "input #0:" in console
    listed = (tmp_path / "skipped.csv").read_text()  # the mapping the user asked for, outside the shard set
    assert "DOE_JOHN_PID12345/a_yes.dcm" in listed and listed.startswith("input,path,reason")
    allowed = _shard(src, tmp_path / "allowed", "--allow-burned-in")
    assert allowed.returncode == 0, allowed.stderr
    m = read_manifest(tmp_path / "allowed")
    assert m.counts["total"] == 9 and m.deidentification["burned_in"]["allowed"] == 7
    assert m.deidentification["burned_in"]["policy"].startswith("allowed with --allow-burned-in")
    inside = _shard(src, tmp_path / "x", "--skipped-list", str(tmp_path / "x" / "skipped.csv"))
    assert inside.returncode == 1 and "inside --out" in inside.stderr and not (tmp_path / "x").exists()


def test_free_text_in_coded_tags_is_dropped(tmp_path):
    pytest.importorskip("pydicom")
    src = tmp_path / "in"
    _crafted(src / "a.dcm", body_part="JOHNATHAN")
    _crafted(src / "b.dcm", body_part="chest")
    proc = _shard(src, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    blobs = list(_members(out).values()) + [(out / "manifest.json").read_bytes(), (proc.stdout + proc.stderr).encode()]
    assert not any(b"JOHNATHAN" in b for b in blobs)
    parts = sorted(str(json.loads(v)["dicom"]["body_part"]) for k, v in _members(out).items() if k.endswith(".json"))
    assert parts == ["CHEST", "None"]  # a defined term is kept (normalised); free text is dropped
    assert read_manifest(out).deidentification["dropped_values"] == {"BodyPartExamined": 1}


def test_a_duplicate_instance_is_skipped_and_counted(tmp_path):
    pytest.importorskip("pydicom")
    src = tmp_path / "in"
    first = _crafted(src / "a.dcm")
    (src / "b_copy.dcm").write_bytes(first.read_bytes())  # the same instance exported twice
    _crafted(src / "c.dcm")
    proc = _shard(src, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    m = read_manifest(tmp_path / "out")
    assert m.counts["total"] == 2
    assert m.skipped["by_reason"] == {"duplicate instance (the same SOPInstanceUID as input #0)": 1}


def test_parts_under_different_salts_are_never_merged(tmp_path, capsys):
    """40 patients in two parts: with two --salt values the same patient gets two tokens (and so two splits, unseen by
    the token-based leakage check); the merge refuses, and inspect says why two such sets cannot be compared."""
    pytest.importorskip("pydicom")
    from medfound.cli import main
    from medfound.data.shards import merge_parts
    from medfound.workflows import shard

    src = tmp_path / "in"
    for p in range(40):
        for view in range(2):
            _crafted(src / f"p{p:02d}_{view}.dcm", patient=f"PAT{p:03d}")
    for i, salt in enumerate(("cohort-secret-A", "cohort-secret-B")):
        shard("dicom", src, tmp_path / f"part{i}", name="cohort", part=f"{i}/2", salt=salt, workers=1)
    fingerprints = [read_manifest(tmp_path / f"part{i}").ingest["patient_salt"] for i in range(2)]
    assert fingerprints[0]["given"] and fingerprints[0]["fingerprint"] != fingerprints[1]["fingerprint"]
    assert "cohort-secret" not in (tmp_path / "part0" / "manifest.json").read_text()  # a keyed hash, never the salt
    with pytest.raises(ValueError, match="patient tokens come from different salts .*Re-ingest every part with the "
                                         "same --salt"):
        merge_parts([tmp_path / "part0", tmp_path / "part1"], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    assert main(["inspect", str(tmp_path / "part0"), str(tmp_path / "part1")]) == 0
    assert "patient tokens come from different salts" in capsys.readouterr().out
    shard("dicom", src, tmp_path / "part1", name="cohort", part="1/2", salt="cohort-secret-A", workers=1,
          overwrite=True)
    merged = merge_parts([tmp_path / "part0", tmp_path / "part1"], tmp_path / "merged")
    assert merged.counts["total"] == 80
    assert main(["inspect", str(tmp_path / "merged")]) == 0
    out = capsys.readouterr().out
    assert "no patient in two splits" in out and "different salts" not in out
    # a set merged before salts were recorded: inspect does not vouch for its splits
    from medfound.data.manifest import write_manifest

    legacy = merged.model_copy(update={"ingest": {k: v for k, v in merged.ingest.items() if k != "patient_salt"}})
    write_manifest(tmp_path / "merged", legacy)
    assert main(["inspect", str(tmp_path / "merged")]) == 0
    out = capsys.readouterr().out
    assert "CAVEAT no patient token is in two splits, but the set was merged from 2 parts whose salts were not " \
           "recorded" in out and "no patient in two splits" not in out
