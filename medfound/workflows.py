"""The verbs, end to end: `train` (build -> loader -> the one loop -> export -> evaluate), `evaluate`, `publish`,
`load`, `shard`, `inspect_shards`. Each looks up the recipe's task kind (`medfound.tasks.TASKS[recipe.task]`) and
calls its methods; the kinds never call back up here.

`cli.py` parses arguments and calls these; Python users call them directly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any, Optional

from medfound.config import FinetuneRecipe, PretrainRecipe
from medfound.config.eval import EVALUATE_DATA_KEYS as EVAL_DATA_KEYS
from medfound.config.eval import EVALUATE_SCALE_KEYS as SCALE_KEYS
from medfound.data import location
from medfound.data.ingest import check_options, get_reader
from medfound.data.ingest.parallel import encoded_samples, parse_part
from medfound.data.journal import Journal
from medfound.data.manifest import Manifest, patient_leakage, read_manifest, verify_shards
from medfound.data.shards import upload_shard_set, write_shard_set
from medfound.evaluate import output
from medfound.evaluate.procedure import evaluate_with
from medfound.io import check_replaceable, run_lock
from medfound.publish.hub import push_folder
from medfound.run import read_run, start_run
from medfound.tasks import task_for
from medfound.tasks.pretrain import build_objective  # noqa: F401  (a public entry point of pretraining)
from medfound.train.logging import log_test_metrics


def train(recipe: PretrainRecipe | FinetuneRecipe, command: str = "medfound train") -> dict[str, Any]:
    """Run a recipe: build its task's module, train it with the one loop, export it and (tasks with labels)
    evaluate the export -> eval.json. Returns a summary (run_dir, step, export, eval...)."""
    spec = task_for(recipe)
    ctx = start_run(recipe, command)
    data = spec.training_data(recipe)
    module = spec.build(recipe, data)
    if ctx.is_main:
        spec.parameter_table(module, recipe)
    selection = spec.selection(recipe, data, ctx.run_dir)  # eval.every (classification), else None
    ctx.seed_per_rank()
    state = ctx.fit(module, spec.train_loader(recipe, data, ctx), normalize=spec.normalizer(recipe),
                    selection=selection)
    summary = ctx.summary(state)
    if state.preempted or not ctx.is_main:
        return summary
    export = ctx.run_dir / "export"
    record = spec.lineage(recipe, state, data)
    if data.subset is not None:  # a labelled training subset (data.train_fraction / train_shots)
        record["train_subset"] = data.subset.record
    if selection is not None:  # selection restores the best validation step; a monitor its best look (export: best)
        block, extra = selection.finish(state.module)
        record.update(block)
        summary.update(extra)
    summary.update(export=str(export), **spec.export(recipe, state.module, record, data, export))
    if "evaluate" in spec.capabilities:
        report = evaluate(ctx.run_dir)
        summary.update(eval=report["metrics"], eval_file=str(ctx.run_dir / "eval.json"))

        log_test_metrics(ctx.run_dir, recipe, state.step, report["metrics"])  # test/*, and hparams beside them
    return summary


def run_pretrain(recipe: PretrainRecipe, command: str = "medfound pretrain") -> dict[str, Any]:
    """`medfound pretrain`: `train` for a pretrain recipe."""
    if not isinstance(recipe, PretrainRecipe):
        raise ValueError(f"run_pretrain runs kind: pretrain recipes; this one is kind: {recipe.kind}")
    return train(recipe, command)


def run_finetune(recipe: FinetuneRecipe, command: str = "medfound finetune") -> dict[str, Any]:
    """`medfound finetune`: `train` for a finetune recipe (any head: classify, segmentation, box_prompt, abmil)."""
    if not isinstance(recipe, FinetuneRecipe):
        raise ValueError(f"run_finetune runs kind: finetune recipes; this one is kind: {recipe.kind}")
    return train(recipe, command)


def evaluate(run_dir: str | Path, split: Optional[str] = None, external: Optional[list[str | Path]] = None,
             out: Optional[str | Path] = None, overrides: Optional[list[str]] = None,
             overwrite: bool = False) -> dict[str, Any]:
    """Evaluate a run's export (or a published folder) on the run's labelled shard set (`eval.split`, or `split`)
    and on the external sets (`eval.external`, or `external`); write eval.json, predictions and report/report.md
    into `out` (default: the run directory; a published folder needs `out`, so the folder and its card stay as
    published). `overrides`: `key=value` of `eval.*`, of the data keys in EVAL_DATA_KEYS and of the segment scale
    keys in SCALE_KEYS (these resample the external sets only: the internal split is scored as trained). An `out` holding an
    earlier evaluation is replaced only with `overwrite`, and never one holding files medfound did not write there
    (medfound.evaluate.output); the run directory is written under its run lock (not while it trains)."""
    run = read_run(run_dir)
    allowed = {f"data.{k}" for k in EVAL_DATA_KEYS} | {"trainer.progress"} | {f"segment.{k}" for k in SCALE_KEYS}
    bad = [o for o in overrides or [] if not (o.split("=", 1)[0].startswith("eval.") or
                                             o.split("=", 1)[0] in allowed)]
    if bad:
        raise ValueError(f"medfound evaluate takes eval.*, trainer.progress, segment.{{{','.join(SCALE_KEYS)}}} "
                         f"and data.{{{','.join(EVAL_DATA_KEYS)}}} overrides; "
                         f"{', '.join(bad)} would describe another model than the one trained (retrain with it)")
    recipe = run.with_overrides(list(overrides or []))
    spec = task_for(recipe)
    if "evaluate" not in spec.capabilities:
        spec.scorer(run, recipe, Path(out or run_dir))  # raises naming why (pretraining has no labels)
        raise ValueError(f"{run_dir}: {spec.name} runs have nothing to evaluate")
    if run.published and out is None:
        raise ValueError(f"{run_dir} is a published folder: give --out DIR for the evaluation, so the folder and "
                         "its checked card stay as published")
    weights = run.export / spec.weights_file
    if not weights.is_file():
        raise FileNotFoundError(f"{run.export} has no {weights.name}: the run has not finished; "
                                "continue it with `medfound finetune RECIPE trainer.resume=auto`")
    out = Path(out) if out is not None else run.path
    if out != run.path and "out" not in spec.capabilities:
        raise ValueError(f"--out is not supported by {spec.name} runs; they write their evaluation into {run.path}")
    if external:
        recipe = recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"external": [str(e) for e in
                                                                                              external]})})
    if recipe.eval.external and "external" not in spec.capabilities:
        raise ValueError(f"eval.external is not scored for {spec.name} runs")

    output.check_destination(out, run.path, overwrite)
    own = out.resolve() == run.path.resolve() and not run.published
    with run_lock(run.path) if own else contextlib.nullcontext():
        with output.staged(out, run.path) as stage:
            return evaluate_with(spec.scorer(run, recipe, stage), split or recipe.eval.split, stage)


def load(folder: str | Path) -> Any:
    """The trained model of a run directory or a published folder, whatever its task: a timm module (pretraining:
    the encoder; classification: the classifier), a segmentation network, a BoxPredictor or a MIL head; eval mode.
    `medfound.load` adds `model.predict(inputs[, out])` (medfound.predict.Predictor)."""
    run = read_run(folder)
    return task_for(run.recipe).load(run.export, run.recipe)


def rebuild_trained(run_dir: Path):
    """The trained backbone or classifier rebuilt from the run's recipe and newest checkpoint (not from the export),
    as a plain timm module with any LoRA merged: the reference a timm-folder export must reproduce (the export
    format's `reference`; a network export is proven by loading it strictly instead)."""
    run = read_run(run_dir)
    spec = task_for(run.recipe)
    return spec.format(run.recipe).reference(spec, Path(run_dir), run.recipe)


def publish(run_dir: str | Path, out: str | Path, overwrite: bool = False, name: Optional[str] = None,
            push: Optional[str] = None, dry_run: bool = False, private: bool = False,
            base_model: Optional[str] = None, license: Optional[str] = None,
            rights: Optional[str] = None) -> dict:
    """RUN_DIR -> a Hugging Face-style folder with its model card (the run's export format, medfound.publish.formats);
    then `push` it to the Hub repo (or, with `dry_run`, list what would go). `base_model` (a Hub id) overrides the recipe's
    card.base_model; `push` is recorded as card.repo_id (the card's `hf-hub:` snippet). `license` overrides the
    recipe's card.license; one less restrictive than the run's data and imported weights is refused unless `rights`
    states why the publisher may (medfound.publish.licences)."""
    run_dir, out = Path(run_dir), Path(out)
    if overwrite:  # before any work: --overwrite replaces only an earlier published folder, never a run
        check_replaceable(out, "model")
    run = read_run(run_dir)
    card = run.recipe.card
    recipe = run.recipe.model_copy(update={"card": card.model_copy(update={
        "base_model": base_model or card.base_model, "repo_id": push or card.repo_id,
        "license": license or card.license})})
    spec = task_for(recipe)
    result = spec.format(recipe).publish(spec, recipe, run_dir, out, overwrite=overwrite, name=name, rights=rights)
    if push or dry_run:
        result["push"] = push_folder(out, push, dry_run=dry_run, private=private)
    return result


publish_run = publish  # the name the earlier API used


def shard(kind: str, input: str | Path, out: str | Path, *, name: Optional[str] = None, modality: str = "auto",
          site: Optional[str] = None, license: Optional[str] = None, attribution: Optional[str] = None,
          max_count: int = 1000, max_mb: float = 64.0, overwrite: bool = False, workers: int = 1,
          part: Optional[str] = None, resumable: bool = False, resume: bool = False, **options: Any):
    """`medfound shard KIND INPUT --out DIR`: ingest with the KIND reader, write shards + manifest.

    `modality="auto"` takes it from the data (DICOM tags; "mixed" when several) and is "other" elsewhere.
    `workers` processes decode and encode (byte-identical output to one); `part="I/N"` ingests only part I of N of
    the inputs (a deterministic split; `medfound shard merge` joins the parts), see medfound.data.ingest.parallel.
    `resumable` builds in `.NAME.partial` beside `out` with a progress journal, kept if the ingest fails or is
    killed; `resume` (implies resumable) continues such a partial ingest (medfound.data.shards.Journal).
    Returns (manifest, skipped) where skipped lists (reference, relative path, reason) for inputs not written; the
    reference ("input #3", "table row 5") carries no file name, the path does (print only the reference).
    """

    check_options(kind, options)  # before anything is read or written
    remote = location.is_url(out)
    name = name or location.basename(out)
    if remote:  # written locally in a staging folder, then uploaded shards first and the manifest last
        out = location.check_location(out)
        if resume:
            raise ValueError(f"--resume continues an ingest into a local folder; {location.redact(out)} is remote. "
                             "Ingest into a local folder (with --resume after a kill), then `medfound shard merge` "
                             "or copy it up; or rerun the remote ingest from the start")
        if not overwrite and location.exists(location.join(out, "manifest.json")):
            raise FileExistsError(f"{location.redact(out)} already holds a shard set (manifest.json); pass "
                                  "--overwrite to replace it, or choose another --out")
        import shutil
        import tempfile

        staging = Path(tempfile.mkdtemp(prefix="medfound-shards-"))
        try:
            manifest, skipped = shard(kind, input, staging / name, name=name, modality=modality, site=site,
                                      license=license, attribution=attribution, max_count=max_count, max_mb=max_mb,
                                      workers=workers, part=part, **options)  # not resumable: a temporary folder
            manifest = upload_shard_set(staging / name, out, overwrite=overwrite)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return manifest, skipped
    if overwrite:  # before the ingest: --overwrite replaces only an earlier shard set
        check_replaceable(out, "shards")

    part_index, parts = parse_part(part)
    if not overwrite and Path(out).exists() and any(Path(out).iterdir()):
        raise FileExistsError(f"{out} already exists and is not empty; choose another output or pass --overwrite")
    ingested = get_reader(kind)(input, site=site, name=name, **options)
    settings = dict(ingested.settings, **({"part": [part_index, parts]} if parts > 1 else {}))
    source = dict(ingested.source)
    if license:
        source["license"] = license
    if attribution:
        source["attribution"] = attribution
    def modality_of_set() -> str:
        if modality != "auto":
            return modality
        seen = ingested.modalities or {}
        return next(iter(seen)) if len(seen) == 1 else "mixed" if seen else "other"

    journal = None
    if resumable or resume:
        fingerprint = hashlib.sha256(json.dumps(
            {"kind": kind, "name": name, "modality": modality, "site": site, "source": source, "settings": settings,
             "schema": ingested.label_schema.model_dump(), "max_count": max_count, "max_mb": max_mb},
            sort_keys=True, default=str).encode()).hexdigest()
        journal = Journal(out, fingerprint, resume)
        if journal.resumed:
            print(f"--resume: kept {len(journal.shards)} finished shards ({len(journal.done_keys)} samples) from "
                  f"{journal.dir}", flush=True)
    stream = encoded_samples(ingested, _per_sample_modality(ingested.samples, modality), ingested.label_schema,
                             workers=workers, part=part_index, parts=parts, journal=journal)
    from tqdm.auto import tqdm

    # a running count (a terminal only): decoding 3504x2336 fundus photographs took 11 minutes in silence
    stream = tqdm(stream, desc=f"shard {kind}", unit="sample", disable=None, mininterval=2.0)
    manifest = write_shard_set(
        stream, out, name=name, modality=modality_of_set, site=site,
        label_schema=ingested.label_schema, source=source, ingest=settings, max_count=max_count,
        max_mb=max_mb, overwrite=overwrite, bags=ingested.bags, skipped=ingested.skipped,
        deidentification=ingested.deidentification, journal=journal)  # side records: filled while consumed
    return manifest, (ingested.skipped or {}).get("files", [])


def _per_sample_modality(samples, modality: str):
    for s in samples:
        if modality != "auto":
            s["modality"] = modality
        yield s


def inspect_shards(directory: str | Path) -> tuple[Manifest, list[str], Optional[dict[str, list[str]]]]:
    """(manifest, checksum problems, patients in more than one split, or None without patient IDs); leakage
    is only looked for once the checksums hold."""

    m = read_manifest(directory)
    problems = verify_shards(directory, m)
    return m, problems, None if problems else patient_leakage(directory, m)
