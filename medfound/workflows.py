"""What each verb does, end to end: build from the recipe, run the one loop, export, evaluate, publish.

`cli.py` parses arguments and calls these; Python users call them directly.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Optional

import torch

import medfound
from medfound.config import BackboneConfig, Derived, FinetuneRecipe, PretrainRecipe, dump_recipe
from medfound.data.manifest import Manifest, read_manifest
from medfound.io import atomic_write_bytes, atomic_write_json, atomic_write_text, check_replaceable, lock_dir


# --------------------------------------------------------------------------------------------------
# shared run setup
# --------------------------------------------------------------------------------------------------
def _start(recipe: PretrainRecipe | FinetuneRecipe, command: str):
    """Accelerator, seeds, derived values, resolved config.yaml; returns (accelerator, run_dir, resume, text)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from medfound.train.loop import resolve_resume

    t = recipe.trainer
    accelerator = Accelerator(mixed_precision="bf16" if t.precision == "bf16" else "no", cpu=not _has_accelerator())
    if accelerator.distributed_type.value in ("FSDP", "DEEPSPEED"):  # an accelerate config with its own plugin
        raise ValueError(f"the accelerate config asks for {accelerator.distributed_type.value}; medfound shards with "
                         "trainer.strategy (fsdp, zero1, zero2, zero3) in the recipe instead: launch with "
                         "launch/accelerate/fsdp.yaml (or multi_gpu.yaml) and set trainer.strategy")
    set_seed(t.seed)
    world = accelerator.num_processes
    global_batch = recipe.data.batch_size * t.grad_accum_steps * world
    lr = recipe.optim.lr if recipe.optim.lr is not None else recipe.optim.blr * global_batch / 256
    recipe.derived = Derived(world_size=world, global_batch_size=global_batch, lr=lr,
                             medfound_version=medfound.__version__)
    run_dir = Path(t.output_dir)
    if accelerator.is_main_process:
        lock_dir(run_dir)  # one writer per run directory; held until this process exits
    resume = resolve_resume(t, run_dir)
    text = dump_recipe(recipe, header=f"resolved by medfound {medfound.__version__} on "
                                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\ncommand: {command}")
    if accelerator.is_main_process:
        atomic_write_text(run_dir / "config.yaml", text)
    return accelerator, run_dir, resume, text


def run_summary(run_dir: Path, state, accelerator) -> dict[str, Any]:
    """What every training verb returns (and the CLI prints); stages add export and eval keys."""
    return {"run_dir": str(run_dir), "step": state.step, "preempted": state.preempted,
            "main": accelerator.is_main_process}


def _has_accelerator() -> bool:
    """True when a GPU-like device exists. Without one, accelerate must be told cpu=True, or processes started
    by torchrun / accelerate launch would each train alone instead of forming a gloo process group."""
    from accelerate.utils import is_mps_available, is_npu_available, is_xpu_available

    return torch.cuda.is_available() or is_mps_available() or is_xpu_available() or is_npu_available()


def _dataset_record(m: Manifest) -> dict[str, Any]:
    return {"name": m.name, "modality": m.modality, "site": m.site, "digest": m.digest, "counts": m.counts,
            "source": {k: v for k, v in m.source.items() if k in ("files", "license", "attribution")},
            **({"mpp": m.ingest["mpp"]} if m.ingest.get("mpp") else {}),
            **({"deidentification": m.deidentification} if m.deidentification else {})}


def _lineage(recipe, state, manifests: list[Manifest], stage: str, objective: str, parent: dict) -> dict[str, Any]:
    from medfound.publish.export import hardware

    return {"stage": stage, "objective": objective, "steps": state.step, "images_seen": state.images_seen,
            "train_seconds": round(state.train_seconds, 1), "hardware": hardware(),
            "precision": recipe.trainer.precision, "global_batch": recipe.derived.global_batch_size,
            "lr": recipe.derived.lr, "split": recipe.data.train_split,
            "datasets": [_dataset_record(m) for m in manifests],
            "medfound_version": medfound.__version__, **({"parent": parent} if parent else {})}


def _seed_per_rank(recipe, accelerator) -> None:
    """After the model is built from the shared seed: give each process its own stream for masks, crops and
    dropout (otherwise every rank draws the same MAE masks and crop boxes for different images)."""
    from accelerate.utils import set_seed

    set_seed(recipe.trainer.seed + accelerator.process_index)


def _check_img_size(model: torch.nn.Module, img_size: int) -> None:
    pe = getattr(model, "patch_embed", None)
    if pe is not None and getattr(pe, "strict_img_size", False) and tuple(pe.img_size) != (img_size, img_size):
        raise ValueError(f"data.img_size={img_size} but the backbone takes {tuple(pe.img_size)} images; set "
                         f"data.img_size={pe.img_size[0]} or backbone.model_args.img_size={img_size}")


def _train_loader(recipe, sets: list[list[str]], manifests: list[Manifest], labelled: bool):
    from medfound.data.pipeline import make_loader

    d, seed = recipe.data, recipe.trainer.seed
    if getattr(recipe, "segment", None) is not None:
        from medfound.data.seg_transforms import build_seg_transform

        transform, labelled = build_seg_transform(recipe.segment, train=True, window=d.window), False
    else:
        transform = d.transform(train=True)
    transform = d.prepare(transform)
    schema = manifests[0].label_schema
    samples = d.samples_per_epoch or sum(m.counts["by_split"].get(d.train_split, 0) for m in manifests)
    keep = site_keep = None
    if d.balance_sites:
        from collections import Counter

        from medfound.data.pipeline import site_balanced_keep

        by_site: Counter = Counter()
        for m in manifests:
            by_site.update(m.counts.get("by_site") or ({m.site: m.counts["by_split"].get(d.train_split, 0)}
                                                       if m.site else {}))
        site_keep = site_balanced_keep(dict(by_site))
    if d.balance_classes:
        if not labelled or schema.type in ("none", "multilabel"):
            raise ValueError("data.balanced_sampling draws single-label classes equally often; for multi-label "
                             "findings use head.class_weights=balanced (a pos_weight per finding) instead")
        from medfound.data.pipeline import balanced_keep

        counts = manifests[0].class_counts(d.train_split)
        k = getattr(recipe.head, "binary_threshold", None)
        if k is None:
            keep = balanced_keep(counts)
        else:  # balance the endpoint's two classes: every grade of one side shares that side's keep rate
            neg, pos = balanced_keep([sum(counts[:k]), sum(counts[k:])])
            keep = [neg] * k + [pos] * (len(counts) - k)

    def loader(epoch: int):
        return make_loader(sets, transform=transform, batch_size=d.batch_size, labelled=labelled, train=True,
                           seed=seed, epoch=epoch, shuffle_buffer=d.shuffle_buffer, num_workers=d.num_workers,
                           resampled=d.resampled, weights=d.weights, samples_per_epoch=samples,
                           num_classes=schema.num_classes, multilabel=schema.type == "multilabel",
                           max_bad_fraction=d.max_bad_fraction, class_keep=keep, site_keep=site_keep,
                           verify=d.verify, global_order=d.global_order)
    return loader


# --------------------------------------------------------------------------------------------------
# verbs
# --------------------------------------------------------------------------------------------------
def build_objective(recipe: PretrainRecipe, backbone: Optional[BackboneConfig] = None):
    """The recipe's objective (MAE or DINOv2) around a backbone built from `backbone` (default: the recipe's)."""
    from medfound.backbones import create_backbone

    o = recipe.objective
    encoder = create_backbone(backbone or recipe.backbone, num_classes=0)
    if o.name == "mae":
        from medfound.pretrain.mae import MAE

        mae = MAE(encoder, decoder_dim=o.decoder_dim, decoder_depth=o.decoder_depth, decoder_heads=o.decoder_heads,
                  mask_ratio=o.mask_ratio, norm_pix_loss=o.norm_pix_loss)
        mae.display_stats = (tuple(recipe.data.mean), tuple(recipe.data.std))
        weights = (backbone or recipe.backbone).weights
        if backbone is None and weights is not None and (Path(weights) / "mae_decoder.safetensors").is_file():
            mae.load_decoder(Path(weights) / "mae_decoder.safetensors")
        return mae
    from medfound.pretrain.dino import DINOv2

    mc = recipe.data.multicrop
    pe = encoder.patch_embed
    if mc.local_size != recipe.data.img_size and getattr(pe, "strict_img_size", True) and \
            not getattr(pe, "dynamic_img_size", False):
        raise ValueError(f"local crops of {mc.local_size} px need a backbone that takes several image sizes: set "
                         "backbone.model_args.dynamic_img_size=true")
    return DINOv2(encoder, out_dim=o.out_dim, hidden_dim=o.hidden_dim, bottleneck_dim=o.bottleneck_dim,
                  head_layers=o.head_layers, ibot_separate_head=o.ibot_separate_head, mask_ratio=o.mask_ratio,
                  mask_probability=o.mask_probability, student_temp=o.student_temp, teacher_temp=o.teacher_temp,
                  teacher_temp_warmup_steps=o.teacher_temp_warmup_steps, momentum=o.momentum, centering=o.centering,
                  center_momentum=o.center_momentum, dino_weight=o.dino_weight, ibot_weight=o.ibot_weight,
                  koleo_weight=o.koleo_weight, freeze_last_layer_steps=o.freeze_last_layer_steps,
                  global_crops=mc.global_crops)


def _objective_text(o) -> str:
    if o.name == "mae":
        return f"MAE (mask ratio {o.mask_ratio}, decoder {o.decoder_dim}-d x {o.decoder_depth})"
    return (f"DINOv2 + iBOT + KoLeo ({o.out_dim} prototypes, {o.centering.replace('_', '-')}, "
            f"teacher momentum {o.momentum[0]}->{o.momentum[1]}; teacher exported)")


def run_pretrain(recipe: PretrainRecipe, command: str = "medfound pretrain") -> dict[str, Any]:
    """Pretrain with the recipe's objective; export the encoder to RUN_DIR/export. Returns a summary."""
    from medfound.data.pipeline import shard_sets
    from medfound.publish.export import export_model, read_lineage
    from medfound.train.loop import fit

    accelerator, run_dir, resume, text = _start(recipe, command)
    sets, manifests = shard_sets(recipe.data.shards, recipe.data.train_split)
    objective = build_objective(recipe)
    _check_img_size(objective.export_backbone(), recipe.data.img_size)
    _seed_per_rank(recipe, accelerator)
    state = fit(objective, _train_loader(recipe, sets, manifests, labelled=False), trainer=recipe.trainer, optim=recipe.optim,
                lr=recipe.derived.lr, run_dir=run_dir, accelerator=accelerator, config_text=text, resume_from=resume,
                normalize=recipe.data.normalizer())
    summary = run_summary(run_dir, state, accelerator)
    if state.preempted or not accelerator.is_main_process:
        return summary
    parent = read_lineage(recipe.backbone.weights) if recipe.backbone.weights else {}
    lineage = _lineage(recipe, state, manifests, "pretraining", _objective_text(recipe.objective), parent)
    trained = state.module
    extra = {"mae_decoder.safetensors": trained.decoder_bytes()} if recipe.objective.name == "mae" else None
    diff = export_model(trained.export_backbone(), run_dir / "export", data=recipe.data, lineage=lineage,
                        license=recipe.card.license, extra_files=extra)
    summary.update(export=str(run_dir / "export"), reload_max_abs_diff=diff)
    return summary


def segment_normalizer(recipe: FinetuneRecipe):
    """The device-side normaliser of a segmentation recipe: ImageNet statistics for 2-D `imagenet` intensity;
    None where the transform already normalised (z-score, CT)."""
    seg = recipe.segment
    return recipe.data.normalizer() if seg.intensity == "imagenet" and seg.spatial_dims == 2 else None


def run_segment(recipe: FinetuneRecipe, command: str = "medfound finetune") -> dict[str, Any]:
    """Train a segmentation network; export it (`export/segmenter.safetensors` + `segmenter.json`, and for ViT
    heads the adapted backbone as a timm folder in `export/backbone`); evaluate it -> eval.json."""
    from types import SimpleNamespace

    from safetensors.torch import save

    from medfound.adapt.tasks import build_task
    from medfound.adapt.tuning import merged_copy, merged_segmenter, print_parameter_table
    from medfound.data.pipeline import shard_sets
    from medfound.evaluate.report import evaluate_run
    from medfound.publish.export import export_model, read_lineage
    from medfound.train.loop import fit

    accelerator, run_dir, resume, text = _start(recipe, command)
    sets, manifests = shard_sets(recipe.data.shards, recipe.data.train_split)
    task = build_task(recipe)
    if accelerator.is_main_process:
        print_parameter_table(task, recipe.tuning, backbone="model.net.encoder.vit.")  # a CNN: all head
    _seed_per_rank(recipe, accelerator)
    state = fit(task, _train_loader(recipe, sets, manifests, labelled=False), trainer=recipe.trainer,
                optim=recipe.optim, lr=recipe.derived.lr, run_dir=run_dir, accelerator=accelerator,
                config_text=text, resume_from=resume, normalize=segment_normalizer(recipe))
    summary = run_summary(run_dir, state, accelerator)
    if state.preempted or not accelerator.is_main_process:
        return summary
    task = state.module
    parent = read_lineage(recipe.backbone.weights) if recipe.backbone and recipe.backbone.weights else {}
    seg = recipe.segment
    tuning = {"lora": f"LoRA (r={recipe.lora.r}, alpha={recipe.lora.alpha})", "full": "full fine-tuning",
              "linear_probe": "frozen backbone", "last_k": f"last {recipe.last_k} blocks"}[recipe.tuning]
    lineage = _lineage(recipe, state, manifests, "fine-tuning", f"{recipe.head.type} segmentation, {tuning}, "
                       f"Dice + cross-entropy", parent)
    lineage.update(tuning=recipe.tuning, head=recipe.head.model_dump(), segment=seg.model_dump(mode="json"))
    merged = merged_segmenter(task.model).eval()
    export = run_dir / "export"
    if task.vit is not None and seg.spatial_dims == 2:  # the adapted backbone, reusable as a timm model
        prep = SimpleNamespace(mean=recipe.data.mean, std=recipe.data.std, img_size=seg.patch_size[-1])
        adapter = task.vit if recipe.tuning == "lora" else None
        export_model(merged_copy(merged.net.encoder.vit), export / "backbone", data=prep, lineage=lineage,
                     license=recipe.card.license, adapter=adapter)
    state_dict = {k: v.detach().contiguous() for k, v in merged.state_dict().items()}
    atomic_write_bytes(export / "segmenter.safetensors", save(state_dict))
    atomic_write_json(export / "segmenter.json", {"medfound": lineage, "class_names": seg.names,
                                                  "head": recipe.head.model_dump(),
                                                  "segment": seg.model_dump(mode="json")})
    report = evaluate_run(run_dir)
    summary.update(export=str(export), eval=report["metrics"], eval_file=str(run_dir / "eval.json"))
    return summary


def run_finetune(recipe: FinetuneRecipe, command: str = "medfound finetune") -> dict[str, Any]:
    """Fine-tune, export the merged model (+ LoRA adapter), evaluate it on eval.split -> eval.json."""
    if recipe.task == "segmentation":
        return run_segment(recipe, command)
    if recipe.task == "mil":
        from medfound.adapt.mil import run_mil

        return run_mil(recipe, command)
    if recipe.task == "prompt":
        from medfound.adapt.prompt import run_prompt

        return run_prompt(recipe, command)
    from medfound.adapt.tasks import build_task
    from medfound.adapt.tuning import merged_copy, print_parameter_table
    from medfound.data.pipeline import shard_sets
    from medfound.evaluate.report import evaluate_run
    from medfound.publish.export import export_model, read_lineage
    from medfound.train.loop import fit

    accelerator, run_dir, resume, text = _start(recipe, command)
    sets, manifests = shard_sets(recipe.data.shards, recipe.data.train_split)
    task = build_task(recipe, manifests[0].label_schema, manifests[0].class_counts(recipe.data.train_split),
                      manifests[0].counts["by_split"].get(recipe.data.train_split))
    schema = task.label_schema  # the endpoint trained (head.binary_threshold), else the data's own
    if accelerator.is_main_process:
        print_parameter_table(task.model, recipe.tuning, task.classifier)
    _check_img_size(task.model, recipe.data.img_size)
    _seed_per_rank(recipe, accelerator)
    state = fit(task, _train_loader(recipe, sets, manifests, labelled=True), trainer=recipe.trainer, optim=recipe.optim,
                lr=recipe.derived.lr, run_dir=run_dir, accelerator=accelerator, config_text=text, resume_from=resume,
                normalize=recipe.data.normalizer())
    summary = run_summary(run_dir, state, accelerator)
    if state.preempted or not accelerator.is_main_process:
        return summary
    task = state.module
    parent = read_lineage(recipe.backbone.weights) if recipe.backbone.weights else {}
    objective = {"lora": f"LoRA (r={recipe.lora.r}, alpha={recipe.lora.alpha}) + classifier",
                 "full": "full fine-tuning", "linear_probe": "linear probe (frozen backbone)",
                 "last_k": f"last {recipe.last_k} blocks + classifier"}[recipe.tuning]
    loss = "sigmoid binary cross-entropy per finding" if schema.type == "multilabel" else "cross-entropy"
    lineage = _lineage(recipe, state, manifests, "fine-tuning", f"{objective}, {loss}", parent)
    lineage["label_schema"] = schema.model_dump()
    lineage["tuning"] = recipe.tuning
    adapter = task.model if recipe.tuning == "lora" else None
    diff = export_model(merged_copy(task.model), run_dir / "export", data=recipe.data, lineage=lineage,
                        license=recipe.card.license, label_names=schema.names, adapter=adapter)
    report = evaluate_run(run_dir)
    summary.update(export=str(run_dir / "export"), reload_max_abs_diff=diff, eval=report["metrics"],
                   eval_file=str(run_dir / "eval.json"))
    return summary


def _structure(recipe: PretrainRecipe | FinetuneRecipe, export: Path) -> BackboneConfig:
    """The backbone's architecture as recorded in the run's export, without loading any weights."""
    cfg = json.loads((export / "config.json").read_text())
    args = {k: v for k, v in cfg.get("model_args", {}).items() if k not in ("num_classes", "global_pool")}
    return BackboneConfig(name=cfg["architecture"], model_args={**args, **recipe.backbone.model_args})


def rebuild_trained(run_dir: Path) -> torch.nn.Module:
    """The trained backbone rebuilt from the run's recipe and newest checkpoint (not from the export),
    as a plain timm module with any LoRA merged: the reference an export must reproduce."""
    from medfound.adapt.tasks import build_task
    from medfound.adapt.tuning import merged_copy
    from medfound.data.manifest import LabelSchema
    from medfound.evaluate.report import load_run_recipe
    from medfound.publish.export import read_lineage
    from medfound.train.checkpoint import latest_checkpoint, load_checkpoint

    recipe = load_run_recipe(run_dir)
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint (checkpoints/last)")
    structure = _structure(recipe, run_dir / "export")
    if isinstance(recipe, PretrainRecipe):
        objective = build_objective(recipe, structure)
        load_checkpoint(ckpt, objective)
        return objective.export_backbone()
    schema = LabelSchema(**read_lineage(run_dir / "export")["label_schema"])
    # loss weights do not change the network; the lineage's schema is already the trained endpoint
    head = recipe.head.model_copy(update={"class_weights": None, "binary_threshold": None})
    task = build_task(recipe.model_copy(update={"backbone": structure, "head": head}), schema)
    load_checkpoint(ckpt, task)
    return merged_copy(task.model)


def publish_run(run_dir: str | Path, out: str | Path, **kwargs: Any) -> dict:
    """RUN_DIR -> a Hugging Face-style folder with its model card (medfound.publish.folder.publish_run)."""
    from medfound.publish.folder import publish_run as publish

    return publish(run_dir, out, **kwargs)


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
    from medfound.data import location
    from medfound.data.ingest import get_reader
    from medfound.data.shards import upload_shard_set, write_shard_set

    remote = location.is_url(out)
    name = name or location.basename(out)
    if remote:  # written locally in a staging folder, then uploaded shards first and the manifest last
        out = location.check_location(out)
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
            upload_shard_set(staging / name, out, overwrite=overwrite)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return manifest, skipped
    if overwrite:  # before the ingest: --overwrite replaces only an earlier shard set
        check_replaceable(out, "shards")
    from medfound.data.ingest.parallel import encoded_samples, parse_part

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
        from medfound.data.shards import Journal

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
    from medfound.data.manifest import patient_leakage, verify_shards

    m = read_manifest(directory)
    problems = verify_shards(directory, m)
    return m, problems, None if problems else patient_leakage(directory, m)
