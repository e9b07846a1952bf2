"""DICOM files (a file or a folder, recursively) -> de-identified image samples.

Pixels: decoded with pydicom (JPEG, JPEG-LS and JPEG 2000 through pylibjpeg: `pip install medfound[dicom]`).
The stored pixel values are kept at full depth: 8-bit images as 8-bit PNG, 16-bit ones as 16-bit PNG
(signed values shifted by +32768), anything wider as .npy. Rescale slope/intercept, the file's window,
MONOCHROME1 and the shift go into `meta["dicom"]`, and the transform applies them (`medfound.data.
transforms`), so windowing can be chosen at training time (the file's, or a preset: lung, mediastinum,
bone, brain, abdomen). Multi-frame files become one sample per frame.

De-identification is by allow-list: only the tags in `KEPT_TAGS` (modality, body part, view, laterality,
photometric interpretation, bit depth, rescale, window, spacing, slice thickness, size) are copied into
meta. Nothing else is read into the shard, the manifest or the console: no names, IDs, dates,
institution, physicians, accession numbers or UIDs. Keys and the patient token are HMAC-SHA256 values under
a salt that is `--salt` when given, else derived from the inputs' own bytes (so only someone holding the
original files can recompute it) and never stored. The patient token is used to split by patient
(no patient in two splits) and lets `medfound inspect` find leakage; it cannot be reversed without the salt.

Coded values only: the kept tags that could carry free text (Modality, BodyPartExamined, ViewPosition, laterality,
PhotometricInterpretation) are copied only when they are DICOM defined terms (`VOCABULARY`, PS3.3 / PS3.16);
anything else (`BodyPartExamined: JOHNATHAN`) is dropped and counted in the manifest's de-identification block.

Burned-in text (PS3.15 Annex E): pixels are not scrubbed, so images that may show PHI in their pixels are
refused, counted with their reason: any `BurnedInAnnotation` other than the defined term `NO` (`YES`, and also
`Y`, `1` or free text, which promise nothing), and, when the attribute is absent, the kinds known to burn text in
(ultrasound, secondary captures, fluoroscopy: Modality US, SC, OT, XC, ES, DOC, XA, RF, or a Secondary Capture SOP
class). `allow_burned_in=True` (`--allow-burned-in`, after the user has cleaned the pixels) takes them; the
decision is recorded in the manifest.

`require_spacing=True` (`--require-spacing`, for `data.spacing_mm`) skips images without a usable PixelSpacing or
ImagerPixelSpacing, counted with that reason, so a mixed archive yields a set where every sample can be resampled.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import numpy as np

from medfound.data.ingest import Ingested, patient_token, read_table, safe_key, salt_record, table_labels
from medfound.data.ingest.images import DEFAULT_FRACTIONS, split_for_token
from medfound.io import sha256_file

KEPT_TAGS = ("Modality", "BodyPartExamined", "ViewPosition", "ImageLaterality", "Laterality",
             "PhotometricInterpretation", "BitsStored", "PixelRepresentation", "RescaleSlope", "RescaleIntercept",
             "WindowCenter", "WindowWidth", "PixelSpacing", "ImagerPixelSpacing", "SliceThickness", "Rows", "Columns",
             "NumberOfFrames")
MODALITY_MAP = {"CT": "ct", "MR": "mr", "US": "us", "MG": "mammography", "OP": "fundus", "OPT": "oct",
                "SM": "pathology", "XA": "xray", "RF": "xray", "PX": "xray", "IO": "xray"}
# modalities whose pixels commonly carry burned-in text: ultrasound, secondary captures and photographs, and the
# fluoroscopic kinds (XA angiography, RF radiofluoroscopy), whose frames carry the patient banner of the console
BURNS_IN = ("US", "SC", "OT", "XC", "ES", "DOC", "XA", "RF")
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # SOP class prefix of every secondary capture storage class
# DICOM defined terms of the kept coded tags (PS3.3 C.7.3.1, C.8.11.5.1.1, C.7.6.3.1.2; PS3.16 Annex L)
VOCABULARY = {
    "Modality": frozenset(
        "AR AU BDUS BI BMD CR CT CTPROTOCOL DG DOC DX ECG EPS ES FID GM HC HD IO IOL IVOCT IVUS KER KO LEN LS MG MR "
        "M3D NM OAM OCT OP OPM OPT OPTBSV OPTENF OPV OSS OT PLAN PR PT PX REG RESP RF RG RTDOSE RTIMAGE RTINTENT "
        "RTPLAN RTRAD RTRECORD RTSEGANN RTSTRUCT RWV SC SEG SM SMR SR SRF STAIN TEXTUREMAP TG US VA XA XAPROTOCOL "
        "XC".split()),
    "BodyPartExamined": frozenset(
        "ABDOMEN ABDOMENPELVIS ADRENAL ANKLE ANUS AORTA APPENDIX ARM AXILLA BACK BILEDUCT BLADDER BRAIN BREAST "
        "BRONCHUS BUTTOCK CALCANEUS CALF CAROTID CEREBELLUM CERVIX CHEEK CHEST CHESTABDOMEN CHESTABDPELVIS "
        "CIRCLEOFWILLIS CLAVICLE COCCYX COLON CORNEA CORONARYARTERY CSPINE CTSPINE DUODENUM EAR ELBOW ENDOMETRIUM "
        "ESOPHAGUS EXTREMITY EYE EYELID FACE FEMUR FIBULA FINGER FOOT FOREARM GALLBLADDER HAND HEAD HEADNECK HEART "
        "HIP HUMERUS IAC ILEUM ILIUM JAW JEJUNUM KIDNEY KNEE LARYNX LEG LIVER LOWEREXTREMITY LSPINE LSSPINE LUNG "
        "MANDIBLE MAXILLA MEDIASTINUM MOUTH NECK NECKCHEST NECKCHESTABDOMEN NECKCHESTABDPELV NOSE ORBIT OVARY "
        "PANCREAS PAROTID PATELLA PELVIS PENIS PHARYNX PROSTATE RADIUS RECTUM RETINA RIB SACRUM SCALP SCAPULA "
        "SCLERA SCROTUM SELLA SHOULDER SINUS SKULL SPINE SPLEEN SSPINE STERNUM STOMACH SUBMANDIBULAR TESTIS THIGH "
        "THUMB THYMUS THYROID TIBIA TLSPINE TMJ TOE TONGUE TRACHEA TSPINE ULNA UPPEREXTREMITY URETER URETHRA UTERUS "
        "VAGINA VULVA WHOLEBODY WRIST ZYGOMA".split()),
    "ViewPosition": frozenset(
        "AP PA LL RL RLD LLD RLO LLO LAT LATERAL CC MLO ML LM LMO FB SIO XCC XCCL XCCM AT CV ISO".split()),
    "Laterality": frozenset("R L U B".split()),
    "PhotometricInterpretation": frozenset(
        "MONOCHROME1 MONOCHROME2 PALETTE_COLOR RGB YBR_FULL YBR_FULL_422 YBR_PARTIAL_422 YBR_PARTIAL_420 YBR_ICT "
        "YBR_RCT".split()),
}
NO_IMAGE = {"SEG": "segmentation object (SEG), not an image", "RTSTRUCT": "RT structure set, not an image",
            "RTDOSE": "RT dose grid, not an image", "RTPLAN": "RT plan, not an image", "SR": "structured report",
            "ECG": "waveform, not an image", "PR": "presentation state, not an image", "KO": "key-object selection"}


@contextlib.contextmanager
def _quiet(pydicom: Any):
    """pydicom's validation warnings and log records quote tag values (UIDs, dates, names): keep them out of
    the console and logs while reading. Problems surface as our own per-file reasons instead."""
    logger = logging.getLogger("pydicom")
    level, mode = logger.level, pydicom.config.settings.reading_validation_mode
    logger.setLevel(logging.CRITICAL + 1)
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
        pydicom.config.settings.reading_validation_mode = mode


def _modality(ds: Any) -> str:
    code = str(ds.get("Modality", "")).upper()
    if code in ("CR", "DX"):
        return "cxr" if "CHEST" in str(ds.get("BodyPartExamined", "")).upper() else "xray"
    return MODALITY_MAP.get(code, "other")


def _first(value: Any) -> Optional[float]:
    if value is None or value == "":
        return None
    try:
        return float(value[0] if hasattr(value, "__len__") and not isinstance(value, str) else value)
    except (TypeError, ValueError, IndexError):
        return None


def coded(ds: Any, tag: str, vocabulary: str, dropped: Counter) -> Optional[str]:
    """The tag's value when it is one of the DICOM defined terms of `vocabulary`, else None (counted in `dropped`):
    a coded tag may hold free text, and free text may be a name."""
    raw = str(ds.get(tag, "") or "").strip()
    if not raw:
        return None
    value = raw.upper().replace(" ", "_" if vocabulary == "PhotometricInterpretation" else "")
    if value in VOCABULARY[vocabulary]:
        return value
    dropped[tag] += 1
    return None


def burned_in_reason(ds: Any) -> Optional[str]:
    """Why the pixels may show PHI (PS3.15 Annex E), or None: BurnedInAnnotation YES, or absent for a modality or
    SOP class that commonly burns text in."""
    flag = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    if flag == "NO":  # the only value that vouches for clean pixels
        return None
    if flag == "YES":
        return "burned-in annotation (BurnedInAnnotation=YES): the pixels may show PHI"
    if flag:  # "Y", "1", "UNKNOWN", free text: not the defined term NO, so not a promise of clean pixels
        return "burned-in annotation not ruled out (BurnedInAnnotation is set, but not to the defined term NO)"
    code = str(ds.get("Modality", "") or "").strip().upper()
    sop = str(ds.get("SOPClassUID", "") or "")
    if code in BURNS_IN or sop.startswith(SECONDARY_CAPTURE):
        kind = "secondary capture" if sop.startswith(SECONDARY_CAPTURE) or code in ("SC", "OT") else f"modality {code}"
        return f"may carry burned-in text ({kind} without BurnedInAnnotation=NO)"
    return None


def _meta(ds: Any, frame: int, frames: int, shift: int, dropped: Counter) -> dict[str, Any]:
    spacing = dicom_spacing(ds, frame)
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    photometric = coded(ds, "PhotometricInterpretation", "PhotometricInterpretation", dropped)
    laterality = coded(ds, "ImageLaterality", "Laterality", dropped) or coded(ds, "Laterality", "Laterality", dropped)
    return {"dicom": {
        "modality": coded(ds, "Modality", "Modality", dropped) or "",
        "body_part": coded(ds, "BodyPartExamined", "BodyPartExamined", dropped),
        "view": coded(ds, "ViewPosition", "ViewPosition", dropped),
        "laterality": laterality,
        "photometric": (photometric or "").replace("_", " "),
        "invert": photometric == "MONOCHROME1",
        "bits_stored": int(ds.get("BitsStored", 8) or 8),
        "rescale": [_first(ds.get("RescaleSlope")) or 1.0, _first(ds.get("RescaleIntercept")) or 0.0],
        "shift": shift,
        "window": [center, width] if center is not None and width else None,
        "spacing_mm": spacing,
        "slice_thickness_mm": _first(ds.get("SliceThickness")),
        "frame": frame, "frames": frames}}


def dicom_spacing(ds: Any, frame: int = 0) -> Optional[list[float]]:
    """(row, column) mm of an image (or of `frame` of a multi-frame one): PixelSpacing, calibrated at the patient, else
    ImagerPixelSpacing (at the detector; projection radiography), else, in enhanced multi-frame files, the Pixel
    Measures functional group (per frame, then shared); None when none is a usable size."""
    found = _spacing(ds.get("PixelSpacing")) or _spacing(ds.get("ImagerPixelSpacing"))
    if found:
        return found
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(groups)
        try:
            measures = seq[index].get("PixelMeasuresSequence") if seq is not None and len(seq) > index else None
            found = _spacing(measures[0].get("PixelSpacing")) if measures else None
        except (AttributeError, IndexError, TypeError):
            found = None
        if found:
            return found
    return None


def _spacing(value: Any) -> Optional[list[float]]:
    """PixelSpacing / ImagerPixelSpacing -> [row, column] mm, or None when absent or not a size (some
    scanners write 0\\0: RG1_J2KI.dcm in pydicom's test data)."""
    try:
        parts = [float(x) for x in value] if value else []
    except (TypeError, ValueError):
        return None
    return parts if len(parts) == 2 and all(0 < v < 100 for v in parts) else None


def _pixels(ds: Any) -> np.ndarray:
    """Decoded stored values, frames first: `[F, H, W]` or `[F, H, W, 3]`."""
    arr = ds.pixel_array
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames == 1:
        arr = arr[None]
    return arr


def _store(frame: np.ndarray) -> tuple[np.ndarray, int]:
    """(array to store, shift added to the stored values): full depth, PNG when possible."""
    if frame.dtype == np.uint8 or frame.dtype == np.uint16:
        return frame, 0
    if frame.dtype == np.int16 or frame.dtype == np.int8:
        return (frame.astype(np.int32) + 32768).astype(np.uint16), -32768
    return frame, 0  # wider or float: kept exactly as .npy


DUPLICATE_KEY = "_instance"  # per sample: (token of its SOPInstanceUID, relative path), so that output merged from
# several processes drops duplicates exactly as one process does (medfound.data.ingest.parallel); never written


def duplicate_reason(first: int) -> str:
    return f"duplicate instance (the same SOPInstanceUID as input #{first})"


def read_dicom(input: str | Path, *, salt: Optional[str] = None, table: Optional[str | Path] = None,
               label_type: Optional[str] = None, label_names: Optional[list[str]] = None,
               split_fractions: Optional[dict[str, float]] = None, site: Optional[str] = None,
               keep_names: bool = False, name: str = "dicom", allow_burned_in: bool = False,
               require_spacing: bool = False, **_: object) -> Ingested:
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError as e:
        raise ImportError("DICOM ingest needs pydicom and its JPEG decoders: pip install medfound[dicom]") from e
    input = Path(input)
    if input.is_file():
        root, files = input.parent, [input]
    elif input.is_dir():
        root, files = input, sorted(p for p in input.rglob("*") if p.is_file() and not p.name.startswith("."))
    else:
        raise FileNotFoundError(f"DICOM file or folder {input} not found")
    if not files:
        raise ValueError(f"no files in {input}")
    hashes = [sha256_file(p) for p in files]
    key_salt = salt.encode() if salt else hashlib.sha256(b"medfound-salt\0" + "".join(hashes).encode()).digest()
    rows = {r["path"]: r for r in read_table(table, ("path", "label", "labels", "split", "site"))} if table else {}
    schema, to_label = table_labels(list(rows.values()), label_type, label_names)
    fractions = split_fractions or DEFAULT_FRACTIONS
    skipped: dict[str, Any] = {"count": 0, "by_reason": {}, "files": []}
    deid = {"method": "allow-list: only these tags are read into meta; all others are dropped",
            "kept_tags": list(KEPT_TAGS),
            "patient_token": "HMAC-SHA256(salt, PatientID), first 16 hex digits; used to split by patient",
            "keys": "HMAC-SHA256(salt, SOPInstanceUID) + frame number",
            "salt": "given with --salt" if salt else "derived from the input files' bytes; not stored",
            "coded_values": "Modality, BodyPartExamined, ViewPosition, laterality and PhotometricInterpretation are "
                            "kept only as DICOM defined terms; other values are dropped",
            "dropped_values": {},
            "burned_in": {"policy": "allowed with --allow-burned-in: pixels are NOT cleaned; the user vouches for them"
                          if allow_burned_in else "refused: BurnedInAnnotation other than NO, or absent for US/SC/OT/XC/ES/DOC/XA/RF "
                                                  "and secondary captures (PS3.15 Annex E)",
                          "refused": 0, "allowed": 0},
            "pixels": "not scrubbed: text burned into pixels beyond these rules is the user's to remove",
            "files_deidentified": 0}
    dropped: Counter = Counter()
    instances: dict[str, int] = {}  # SOPInstanceUID -> index of the input that brought it
    modalities: Counter = Counter()

    def token(value: str) -> str:
        return patient_token(key_salt, value)

    def skip(index: int, path: Path, reason: str) -> None:
        skipped["count"] += 1
        skipped["by_reason"][reason] = skipped["by_reason"].get(reason, 0) + 1
        skipped["files"].append((f"input #{index}", path.relative_to(root).as_posix(), reason))

    def samples():
        with _quiet(pydicom):
            yield from _samples()

    def _samples():
        for index, (path, digest) in enumerate(zip(files, hashes)):
            if not result.wants(index):
                continue
            rel = path.relative_to(root).as_posix()
            try:
                ds = pydicom.dcmread(path, force=False)
            except InvalidDicomError:
                skip(index, path, "not a DICOM file (no DICM preamble)")
                continue
            except Exception as e:  # malformed files must never stop the run
                skip(index, path, f"unreadable DICOM ({type(e).__name__})")
                continue
            try:
                code = str(ds.get("Modality", "")).upper()
                if code in NO_IMAGE:
                    skip(index, path, NO_IMAGE[code])
                    continue
                if "PixelData" not in ds:
                    skip(index, path, "no pixel data")
                    continue
                burned = burned_in_reason(ds)
                if burned and not allow_burned_in:
                    deid["burned_in"]["refused"] += 1
                    skip(index, path, burned)
                    continue
                if require_spacing and not dicom_spacing(ds):
                    skip(index, path, "no pixel spacing (PixelSpacing, ImagerPixelSpacing and Pixel Measures "
                                      "absent or zero; --require-spacing)")
                    continue
                try:
                    pixels = _pixels(ds)
                except (ImportError, RuntimeError, NotImplementedError) as e:
                    syntax = ds.file_meta.get("TransferSyntaxUID", None)
                    skip(index, path, f"cannot decode pixel data ({getattr(syntax, 'name', syntax)}): "
                               f"{type(e).__name__}; pip install medfound[dicom] for JPEG/JPEG 2000 decoders")
                    continue
                if rows and rel not in rows:
                    skip(index, path, "no row in the label table")
                    continue
                row = rows.get(rel, {})
                patient = str(ds.get("PatientID", "") or ds.get("PatientName", "") or "")
                group = token(patient) if patient else token("file:" + digest)
                split = (row.get("split") or "").strip() or split_for_token(group, fractions)
                instance = str(ds.get("SOPInstanceUID", "") or digest)
                if instance in instances and not result.cross_process:  # else checked where the processes merge
                    skip(index, path, duplicate_reason(instances[instance]))
                    continue
                base = safe_key(Path(rel).with_suffix("").as_posix(), True) if keep_names else "d" + token(instance)
                modality = _modality(ds)
                label = to_label(row) if rows else None
                out, frame_dropped = [], Counter()
                for i, frame in enumerate(pixels):
                    stored, shift = _store(np.asarray(frame))
                    out.append({"key": f"{base}_f{i:04d}", "image": stored, "split": split, "label": label,
                                "site": (row.get("site") or "").strip() or site, "modality": modality,
                                "patient": group, "meta": _meta(ds, i, len(pixels), shift, frame_dropped),
                                DUPLICATE_KEY: (token(instance), rel)})
            except Exception as e:  # a malformed element read late (e.g. a broken sequence)
                skip(index, path, f"malformed DICOM ({type(e).__name__})")
                continue
            instances[instance] = index  # a file is a duplicate of one that was written, never of a skipped one
            modalities[modality] += 1
            deid["files_deidentified"] += 1
            deid["burned_in"]["allowed"] += bool(burned)
            for tag in frame_dropped:  # counted once per file, not per frame
                dropped[tag] += 1
            deid["dropped_values"] = dict(sorted(dropped.items()))
            yield from out

    source = {"files": len(files), "content_digest": hashlib.sha256(b"medfound-source\0" +
                                                                      "".join(hashes).encode()).hexdigest()}
    split_column = any((r.get("split") or "").strip() for r in rows.values())
    settings = {"kind": "dicom", **({"require_spacing": True} if require_spacing else {}), "split": "table column" if split_column else {"by": "patient token", "fractions": fractions},
                "keep_names": keep_names, "patient_salt": salt_record(salt, key_salt),
                "storage": "stored pixel values at full depth; rescale/window/MONOCHROME1 in meta, applied by the transform"}
    result = Ingested(samples(), schema, source, settings, skipped=skipped, deidentification=deid,
                      modalities=modalities)
    return result
