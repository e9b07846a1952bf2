"""`medfound predict MODEL INPUT... --out DIR`: a trained model (a run or a published folder) on new studies.

The inputs (image files, DICOM files or folders, or a shard set) become the shard set the model's own evaluation
transform reads, so a prediction preprocesses exactly as training and evaluation did: the DICOM rescale, window and
MONOCHROME1 applied from the file's own tags, its pixel spacing for `data.spacing_mm`, the fundus field of view
detected, the recipe's intensity window. The user never restates any of it.

Raw inputs are ingested into a private temporary shard set by the same readers `medfound shard` uses: images (PNG,
JPEG, TIFF, BMP) with the `images` reader, every other file as DICOM, de-identified as `medfound shard dicom` does, so
no PHI reaches the temporary shards. Each input is linked under its index (`000003.png`): keys map back to inputs with
no file name entering a shard, and an unreadable input is reported by its index and reason, never by its name. A
shard set given as input is read as it is (every split; keys are its own).

What a model kind writes is its TaskSpec's `predict` (classification: predictions.csv with every class probability,
the predicted class and the decision at the model's operating point); `--out` follows the replace rules of every
writer (medfound.evaluate.output: a new folder, or an earlier prediction's with --overwrite).
"""

from __future__ import annotations

import csv
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from medfound.data.location import is_url
from medfound.data.manifest import read_manifest
from medfound.evaluate import output
from medfound.io import atomic_write_bytes, sha256_file
from medfound.process import torchrun_group
from medfound.run import read_run
from medfound.run.inference import Runtime

# Loaded by torch-free commands (`medfound ls`, `validate`, `--help`): medfound modules that bring in torch or
# numpy are imported inside the functions that need them (tests/test_layering.py keeps it so).

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr")


def input_kind(path: Path, slides: bool = False) -> str:
    """How an input file is read: `wsi` (whole-slide images, for a model that reads slides: `slides`), `images`,
    `volumes` (NIfTI / NRRD) or `dicom` (every other file)."""
    from medfound.data.ingest.wsi import SLIDE_SUFFIXES

    name = path.name.lower()
    if slides and path.suffix.lower() in SLIDE_SUFFIXES:
        return "wsi"
    if name.endswith(VOLUME_SUFFIXES):
        return "volumes"
    return "images" if path.suffix.lower() in IMAGE_SUFFIXES else "dicom"


def suffix(path: Path) -> str:
    """The file's suffix as its reader knows it (`.nii.gz` whole)."""
    name = path.name.lower()
    return next((s for s in VOLUME_SUFFIXES if name.endswith(s)), path.suffix.lower())


@dataclass
class StagedInputs:
    shards: str                                                    # the shard set to read
    names: dict[str, str] = field(default_factory=dict)            # input index ("000003") -> the input's path
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (input #i, reason): unreadable inputs
    given: bool = False                                            # the user gave a shard set (keys are its own)
    kind: str = "shards"                                           # images, volumes, dicom, or a given shard set
    digests: dict[str, str] = field(default_factory=dict)          # input index -> the input file's sha256
    reused: dict[str, str] = field(default_factory=dict)           # input path -> its index in an earlier prediction

    def index(self, key: str) -> str:
        """The input index a sample key belongs to (a DICOM frame `000003_f0001` -> `000003`)."""
        return key if key in self.names else key.partition("_f")[0]

    def digest(self, key: str) -> str:
        """The sha256 of the input file a sample came from ("" for a given shard set)."""
        return self.digests.get(self.index(key), "")

    def source(self, key: str) -> Optional[Path]:
        """The input file a sample came from (None for a given shard set)."""
        path = None if self.given else self.names.get(self.index(key))
        return None if path is None else Path(path)

    def name(self, key: str) -> str:
        """The input a sample came from (a DICOM frame: `PATH#frame`), or the key of a given shard set."""
        if self.given:
            return key
        base, sep, frame = key.partition("_f")
        if base in self.names:
            return self.names[base] + (f"#{int(frame)}" if sep and frame.isdigit() else "")
        return self.names.get(key, key)


def expand(inputs: list[str]) -> list[Path]:
    """Every file of the inputs (folders walked, sorted; hidden files left out)."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"input {item} not found")
    if not files:
        raise ValueError(f"no input files in {', '.join(inputs)}")
    return files


def is_shard_set(inputs: list[str]) -> bool:
    return len(inputs) == 1 and (is_url(inputs[0]) or (Path(inputs[0]) / "manifest.json").is_file())


def stage(inputs: list[str], tmp: Path, ingest: Optional[dict[str, dict[str, Any]]] = None, start: int = 0,
          done: Optional[dict[str, str]] = None, rank: int = 0, world: int = 1) -> StagedInputs:
    """The inputs as one shard set (see the module docstring); `tmp` a private temporary folder; `ingest`: reader
    options the model prescribes per input kind (a MIL head: `wsi`, tiled as its bags were). Continuing an earlier
    prediction: input indices start at `start`, and a file whose sha256 is in `done` (sha256 -> its earlier index)
    is not staged again (`StagedInputs.reused`). Under torchrun, process `rank` of `world` stages the inputs whose
    position i has i % world == rank (an input's index is start + i whatever the number of processes)."""
    from medfound.data.shards import fast_png
    from medfound.workflows import shard as shard_set

    def shard(*args: Any, **kw: Any) -> Any:  # a private set read once: PNGs stored fast, not small
        with fast_png():
            return shard_set(*args, **kw)

    if is_shard_set(inputs):
        if world > 1:
            raise ValueError("a shard set is predicted by one process: run medfound predict without torchrun, or give "
                             "the files")
        return StagedInputs(str(inputs[0]), given=True)
    everything = expand(inputs)
    ingest = ingest or {}
    seen = {input_kind(f, slides="wsi" in ingest) for f in everything}
    if len(seen) > 1:
        counts = {k: sum(input_kind(f, slides="wsi" in ingest) == k for f in everything) for k in sorted(seen)}
        raise ValueError("the inputs mix " + ", ".join(f"{k} ({n})" for k, n in counts.items()) +
                         " (files that are neither images nor NIfTI/NRRD volumes are read as DICOM): predict one "
                         "kind at a time")
    (kind,) = seen
    # under torchrun a DICOM folder (a series, whose SEG references all of it) stays with one process
    group = _folder_groups(everything) if kind == "dicom" else list(range(len(everything)))
    mine = [(start + i, f) for i, f in enumerate(everything) if group[i] % world == rank]
    hashes = {f: sha256_file(f) for _, f in mine}
    reused = {str(f): done[hashes[f]] for _, f in mine if done and hashes[f] in done}
    mine = [(i, f) for i, f in mine if str(f) not in reused]
    if not mine:
        return StagedInputs("", reused=reused, kind="none")
    chosen = mine
    link = tmp / "inputs"
    link.mkdir(parents=True)
    out = tmp / "shards"
    names = {f"{i:06d}": str(f) for i, f in chosen}
    digests = {f"{i:06d}": hashes[f] for i, f in chosen}
    if kind == "dicom":
        for i, f in chosen:
            os.symlink(f.resolve(), link / f"{i:06d}")
        _, skipped = shard("dicom", link, out, name="predict", keep_names=True, split_fractions={"predict": 1.0},
                           workers=1)
    elif kind == "wsi":
        for i, f in chosen:
            os.symlink(f.resolve(), link / f"{i:06d}{suffix(f)}")
        _, skipped = shard("wsi", link, out, name="predict", keep_names=True, split="predict", **ingest["wsi"])
    else:
        rows = []
        for i, f in chosen:
            rel = f"{i:06d}{suffix(f)}"
            os.symlink(f.resolve(), link / rel)
            rows.append({"path": rel, "split": "predict"})
        with open(tmp / "inputs.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["path", "split"])
            w.writeheader()
            w.writerows(rows)
        _, skipped = shard(kind, link, out, table=tmp / "inputs.csv", name="predict", keep_names=True, workers=1)
    # the readers name a skipped input by its table row (images) or its index (DICOM): always by index here
    reasons = [(f"input #{int(ref.split()[-1]) - 2}" if ref.startswith("table row ") else ref, reason)
               for ref, _, reason in skipped]
    return StagedInputs(str(out), names, reasons, kind=kind, digests=digests, reused=reused)


def _folder_groups(files: list[Path]) -> list[int]:
    """For each file, the index of its folder among the folders in order of first appearance."""
    order: dict[Path, int] = {}
    return [order.setdefault(Path(f).parent, len(order)) for f in files]


def predict(model: str | Path, inputs: list[str], out: str | Path, *, overwrite: bool = False,
            batch_size: int | None = None, progress: bool = True, device: str | None = None,
            precision: str = "auto", num_workers: int | None = None, **options: Any) -> dict[str, Any]:
    """Run the model of a run directory or published folder on `inputs`; write its outputs under `out`. Returns
    {"rows": one dict per prediction, "skipped": [(input #i, reason)], "warnings": [...], "written": [paths]}.
    `device` / `precision` / `num_workers`: medfound.run.inference.Runtime. `options`: what one kind reads (its
    TaskSpec's `predict_options`: box prompts' boxes or box_table, box_format, threshold, modality; segmentation's
    save_probabilities and overlay; MIL's backbone); refused for the kinds that read none."""
    from medfound.tasks import task_for

    run = read_run(model)
    spec = task_for(run.recipe)
    if not callable(getattr(spec, "predict", None)):
        raise ValueError(f"{model} is a {spec.name} export: it has no task head to predict with; fine-tune it "
                         "(`medfound finetune`) and predict with that run")
    given = {k: v for k, v in options.items() if v is not None and v is not False}
    unread = sorted(set(given) - set(getattr(spec, "predict_options", ())))
    if unread:
        raise ValueError(f"{model} is a {spec.name} model, which reads no {', '.join(unread)}")
    out = Path(out)

    rank, world, dist, started = torchrun_group()
    try:
        return _predict(run, spec, model, list(map(str, inputs)), out, overwrite, given, rank, world, dist,
                        Runtime(device=device, precision=precision, num_workers=num_workers, batch_size=batch_size,
                                progress=progress and rank == 0), sha256_file(run.export / spec.weights_file))
    finally:
        if started:
            dist.destroy_process_group()


def _shared(dist: Any, rank: int, make: Any) -> Any:
    """`make()` on rank 0, its value (or its error, raised again on every rank) on all ranks."""
    box: list[Any] = [None]
    error: Optional[BaseException] = None
    if rank == 0:
        try:
            box[0] = ("ok", make())
        except Exception as e:  # the same error everywhere, so no rank waits for the others
            error, box[0] = e, ("error", f"{type(e).__name__}: {e}")
    if dist is not None:
        dist.broadcast_object_list(box, 0)
    if error is not None:
        raise error
    status, value = box[0]
    if status == "error":
        raise RuntimeError(f"rank 0 stopped: {value}")
    return value


def _predict(run: Any, spec: Any, model: Any, inputs: list[str], out: Path, overwrite: bool, given: dict,
             rank: int, world: int, dist: Any, rt: Any, model_sha: str) -> dict[str, Any]:
    """predict() on one process of `world` (see `stage` for the split): rank 0 decides where the outputs go, every
    rank predicts its inputs into one staging folder, rank 0 gathers the rows, writes predictions.csv and
    summary.json and commits the folder; every output file is written once, by the rank that owns its input."""
    from contextlib import nullcontext

    from tqdm.auto import tqdm

    def decide() -> Optional[dict[str, Any]]:
        earlier = None if overwrite or is_shard_set(inputs) else continued(out, model_sha)
        if earlier is None:
            output.check_destination(out, run.path, overwrite, output.PREDICT_MARKER, output.PREDICT_OUTPUTS,
                                     "prediction")
        return earlier

    earlier = _shared(dist, rank, decide)
    kept = (earlier or {}).get("rows", [])
    with tempfile.TemporaryDirectory(prefix="medfound-predict-") as tmp:  # 0700: the inputs' links stay private
        prescribed = getattr(spec, "predict_ingest", None)
        staged = stage(inputs, Path(tmp), prescribed(run) if callable(prescribed) else None,
                       start=(earlier or {}).get("next", 0), done=(earlier or {}).get("done"), rank=rank,
                       world=world)
        rt.warnings = input_warnings(spec, run, staged)
        for w in rt.warnings:  # before any work: the user can stop a run on the wrong data
            tqdm.write(f"medfound predict: warning: {w}", file=sys.stderr)
        if staged.reused:
            tqdm.write(f"medfound predict: {len(staged.reused)} inputs already predicted in {out} by this model "
                       f"(sha256 {model_sha[:12]}...): kept, not predicted again", file=sys.stderr)
        committing = output.staged(out, run.path, output.PREDICT_MARKER, keep=earlier is not None) if rank == 0 \
            else nullcontext(None)
        with committing as dest:
            dest = Path(_shared(dist, rank, lambda: str(dest)))  # one staging folder for every rank
            before, error = len(rt.warnings), None
            try:
                rows = [] if staged.kind == "none" else spec.predict(run, run.recipe, staged, dest, rt, **given)
            except Exception as e:
                if dist is None:
                    raise
                rows, error = [], f"rank {rank}: {type(e).__name__}: {e}"
            for w in rt.warnings[before:]:  # the model's own (box prompts: empty or full masks, colour)
                tqdm.write(f"medfound predict: warning: {w}", file=sys.stderr)
            for row in rows:
                row["input_sha256"] = staged.digest(row["key"])
            mine = {"rows": rows, "skipped": staged.skipped, "warnings": rt.warnings, "error": error,
                    "inputs": len(staged.names), "reused": len(staged.reused)}
            parts = [mine]
            if dist is not None:
                parts = [None] * world
                dist.all_gather_object(parts, mine)
            errors = [p["error"] for p in parts if p["error"]]
            if errors:
                raise RuntimeError("; ".join(errors))
            rows = sorted((r for p in parts for r in p["rows"]), key=lambda r: r["key"])
            skipped = [s for p in parts for s in p["skipped"]]
            warnings = list(dict.fromkeys(w for p in parts for w in p["warnings"]))
            reused = sum(p["reused"] for p in parts)
            if not rows and not kept:  # on every rank: none waits for a commit that will not come
                raise ValueError("no input could be predicted: see the skipped inputs")
            if rank == 0:
                write_rows(dest / "predictions.csv", kept + rows)
                summary = {"model": str(model), "model_sha256": model_sha, "task": spec.name,
                           "inputs": sum(p["inputs"] for p in parts) + reused or None, "predicted": len(rows),
                           "kept_from_earlier": len(kept), "reused_inputs": reused, "processes": world,
                           "skipped": [{"input": ref, "reason": why} for ref, why in skipped],
                           "warnings": warnings}
                (dest / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if dist is not None:
        dist.barrier()  # the folder is committed before any rank returns
    written = [out / name for name in json.loads((out / output.PREDICT_MARKER).read_text())["files"]] \
        if rank == 0 else []
    return {"rows": kept + rows, "skipped": skipped, "warnings": warnings, "written": written, "reused": reused,
            "main": rank == 0}


def continued(out: Path, model_sha: str) -> Optional[dict[str, Any]]:
    """An earlier prediction in `out` by the same model weights (summary.json's model_sha256), to continue: its
    rows, the sha256 of every input it predicted (-> that input's index) and the next free index; None otherwise
    (then the replace rules apply: --overwrite, or another folder)."""

    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if not (out / output.PREDICT_MARKER).is_file() or summary.get("model_sha256") != model_sha:
        return None
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    done = {r["input_sha256"]: r["key"].partition("_f")[0] for r in rows if r.get("input_sha256")}
    indices = [int(r["key"].partition("_f")[0]) for r in rows if r.get("key", "").partition("_f")[0].isdigit()]
    return {"rows": rows, "done": done, "next": max(indices, default=-1) + 1}


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """predictions.csv: one row per prediction, the columns of the first row (every kind writes the same keys)."""
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def input_warnings(spec: Any, run: Any, staged: StagedInputs) -> list[str]:
    """What evaluate warns about an external set, said of the inputs: a modality the model was not trained on (where
    the inputs record one: DICOM's own tag, a shard set's manifest), and a scale beyond tolerance of the training
    data's (medfound.data.scale.scale_warnings, with the task's own normalised keys)."""
    from medfound.data.scale import scale_stats, scale_warnings
    from medfound.evaluate.records import network_lineage, trained_modalities

    out: list[str] = []
    if staged.kind == "none":  # every input was predicted before
        return out
    modality = read_manifest(staged.shards).modality
    trained = trained_modalities(run.export)
    if trained and modality not in (None, "", "other", "mixed", "auto") and modality not in trained:
        out.append(f"the inputs are {modality}, but the model was trained on {', '.join(trained)}: its predictions "
                   "on another modality are not validated")
    normalised = getattr(spec, "scale_normalised", None)
    expected = network_lineage(run.export).get("scale")
    if callable(normalised) and expected:
        out += scale_warnings("inputs", scale_stats(staged.shards), expected, normalised(run.recipe),
                              subject="the input set")
    return out


class Predictor:
    """`medfound.load(folder).predict(inputs)`: the CLI's prediction as a Python call on the same model folder.

    `predict(inputs, out=None)` runs exactly `medfound predict MODEL INPUT... --out DIR` and returns its rows (the
    rows of predictions.csv, as dicts). With `out` the files stay there; without it they are written to a private
    temporary folder and each segmentation row carries its mask as an array (`mask`: uint8 `[H, W]` or `[D, H, W]`,
    the file's content) before the folder is removed."""

    def __init__(self, model: str | Path) -> None:
        self.model = Path(model)

    def __call__(self, inputs: str | Path | list, out: str | Path | None = None, *, overwrite: bool = False,
                 progress: bool = False, **options: Any) -> list[dict[str, Any]]:
        items = [str(i) for i in inputs] if isinstance(inputs, (list, tuple)) else [str(inputs)]
        if out is not None:
            return predict(self.model, items, out, overwrite=overwrite, progress=progress, **options)["rows"]
        with tempfile.TemporaryDirectory(prefix="medfound-predict-out-") as tmp:
            dest = Path(tmp) / "out"
            rows = predict(self.model, items, dest, progress=progress, **options)["rows"]
            for row in rows:
                if row.get("mask"):
                    row["mask"] = read_mask(dest / row["mask"])
        return rows


def read_mask(path: Path):
    """A mask file `medfound predict` wrote (PNG, or gzipped NIfTI) as an array."""
    import numpy as np

    if path.name.endswith(".nii.gz"):
        import nibabel as nib

        return np.asarray(nib.load(path).dataobj)
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img)
