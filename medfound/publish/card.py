"""The model card, rendered with huggingface_hub's ModelCard from the run's own record.

Every number in the card comes from a file: `eval.json` (metrics, intervals, per-site and external results, written
by `evaluate.markdown.evaluation_sections`, the same code as report.md), the manifests (data counts and digests,
through the export's lineage block), `logs/metrics.jsonl` (compute time, via the lineage) and the weights themselves
(parameter count, sha256). Nothing is typed by hand, and `medfound card check` (publish/check.py) re-derives the
evaluation and the hashes to prove the card still matches its folder.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any, Optional

import timm
import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData

import medfound
from medfound.evaluate.metrics import hub_metric_type

TEMPLATE = "template.md"
EVAL_BEGIN, EVAL_END = "<!-- medfound:evaluation (generated from eval.json; `medfound card check` verifies it) -->", \
    "<!-- /medfound:evaluation -->"
PLACEHOLDER, IMAGE_PLACEHOLDER = "PATH_TO_THIS_FOLDER", "IMAGE.png"
METHOD_CITATIONS = {  # keyword in a stage's objective or tuning -> reference
    "mae": 'He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022 (MAE).',
    "dino": 'Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision", TMLR 2024.',
    "lora": 'Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022.',
    "mil": 'Ilse et al., "Attention-based Deep Multiple Instance Learning", ICML 2018.',
    "box-prompt": 'Ma et al., "Segment anything in medical images" (MedSAM), Nature Communications 2024.',
    "unetr": 'Hatamizadeh et al., "UNETR: Transformers for 3D Medical Image Segmentation", WACV 2022.',
    "transunet": 'Chen et al., "TransUNet: Transformers Make Strong Encoders for Medical Image Segmentation", 2021.',
    "attention_unet": 'Oktay et al., "Attention U-Net: Learning Where to Look for the Pancreas", MIDL 2018.',
    "unet ": 'Ronneberger et al., "U-Net: Convolutional Networks for Biomedical Image Segmentation", MICCAI 2015.',
    "vnet": 'Milletari et al., "V-Net: Fully Convolutional Neural Networks for Volumetric Medical Image '
            'Segmentation", 3DV 2016.',
}


def template_path() -> Path:
    for base in (Path("model_cards"), Path(str(importlib.resources.files("medfound") / "recipes" / "model_cards")),
                 Path(__file__).resolve().parents[2] / "model_cards"):
        if (base / TEMPLATE).is_file():
            return base / TEMPLATE
    raise FileNotFoundError(f"card template {TEMPLATE} not found in model_cards/ or the installed package")


def _stages(lineage: dict[str, Any]) -> list[dict[str, Any]]:
    """Training stages from the oldest ancestor to this run."""
    chain = []
    node: Optional[dict[str, Any]] = lineage
    while node:
        chain.append(node)
        node = node.get("parent")
    return list(reversed(chain))


def _counts(d: dict[str, Any], used: Optional[str]) -> str:
    splits = d.get("by_split", {})
    text = ", ".join(f"{v:,} {k}" for k, v in splits.items()) + " samples"
    modalities = d.get("by_modality") or {}
    if len(modalities) > 1:
        text += "; per modality " + ", ".join(f"{k} {v:,}" for k, v in modalities.items())
    sites = d.get("by_site") or {}
    if sites:
        text += "; per site " + ", ".join(f"{k} {v:,}" for k, v in sites.items())
    return f"trained on the {splits.get(used, 0):,} '{used}' samples ({text})" if used in splits else text


def training_datasets(lineage: dict[str, Any]) -> list[dict[str, Any]]:
    """Every data set of every stage of the lineage, once per (digest, stage)."""
    datasets, seen = [], set()
    for s in _stages(lineage):
        for d in s.get("datasets", []):
            key = (d.get("digest"), s["stage"])
            if key in seen:
                continue
            seen.add(key)
            src = d.get("source", {}) if isinstance(d.get("source"), dict) else {}
            counts = d.get("counts")
            datasets.append({"name": d.get("name", "?"), "role": s["stage"], "modality": d.get("modality", "other"),
                             "site": d.get("site"), "mpp": d.get("mpp"),
                             "counts": _counts(counts, s.get("split")) if counts else
                             f"{d.get('slides', '?')} slides (bags digest {d.get('bags_digest', '?')})",
                             "digest": d.get("digest", "?"),
                             "source": _source_files(src.get("files")),
                             "license": src.get("license") or d.get("license"),
                             "attribution": src.get("attribution") or d.get("attribution"),
                             "deidentification": d.get("deidentification")})
    return datasets


def _source_files(files: Any) -> str:
    if isinstance(files, int):
        return f"{files:,} files"
    return ", ".join(f.get("name", "?") for f in files or []) or "not recorded"


def _deid_text(deid: dict[str, Any]) -> str:
    parts = [deid.get("method")]
    if deid.get("patient_token"):
        parts.append(f"patient IDs replaced by {deid['patient_token']}")
    if deid.get("files_deidentified") is not None:
        parts.append(f"{deid['files_deidentified']:,} files de-identified")
    return "; ".join(p for p in parts if p) or str(deid)


def timm_details(model: torch.nn.Module, class_names: list[str], label_type: Optional[str]) -> list[tuple[str, str]]:
    cfg = model.pretrained_cfg
    rows = [("architecture", f"`{cfg.get('architecture')}` (timm), {sum(p.numel() for p in model.parameters()):,} "
                             "parameters"),
            ("input", f"{cfg['input_size'][1]}x{cfg['input_size'][2]} px, {cfg['input_size'][0]} channels"),
            ("features", f"{model.num_features}-d, pooling `{getattr(model, 'global_pool', '?')}`")]
    if class_names:
        rows.append(("output", f"{len(class_names)} classes ({label_type}): {', '.join(class_names)}"))
    return rows


def preprocessing(input_cfg: dict[str, Any], datasets: list[dict[str, Any]], recipe: Any) -> dict[str, Any]:
    """preprocessing.json: what a user must do to an image before the model sees it."""
    mpps = sorted({d["mpp"] for d in datasets if d.get("mpp")})
    stain = "Macenko, MONAI NormalizeHEStains defaults, before everything else" \
        if getattr(recipe.data, "stain_normalize", False) else None
    return {"modality": sorted({d["modality"] for d in datasets}),
            "microns_per_pixel": mpps[0] if len(mpps) == 1 else (mpps or None),
            "ct_window": getattr(recipe.data, "window", None), **({"stain_normalization": stain} if stain else {}),
            **input_cfg}


def timm_snippet(class_names: list[str]) -> str:
    lines = ["import timm, torch", "from PIL import Image", "",
             f'folder = "{PLACEHOLDER}"  # or huggingface_hub.snapshot_download("REPO_ID")']
    if class_names:
        lines += ['model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()  # the classifier']
    lines += ['backbone = timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=0).eval()  # features',
              "config = timm.data.resolve_data_config({}, model=backbone)  # the training preprocessing",
              "transform = timm.data.create_transform(**config)",
              f'x = transform(Image.open("{IMAGE_PLACEHOLDER}").convert("RGB"))[None]',
              "with torch.no_grad():",
              "    features = backbone(x)  # [1, num_features]"]
    if class_names:
        lines += ["    probs = model(x).softmax(-1)  # [1, num_classes], classes in config.json label_names"]
    return "\n".join(lines)


def eval_results(evaluation: Optional[dict[str, Any]], task_type: str) -> list[EvalResult]:
    """model-index entries (`task_type`: the Hub pipeline tag): the internal split's metrics, then each external
    set's."""
    if not evaluation:
        return []
    out = []
    ds = evaluation["dataset"]
    sets = [(ds["name"], ds["split"], evaluation["metrics"])]
    sets += [(e["name"], "+".join(e["splits"]), e["metrics"]) for e in evaluation.get("external", [])]
    for name, split, metrics in sets:
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and v is not None:
                out.append(EvalResult(task_type=task_type, dataset_type=name, dataset_name=name, dataset_split=split,
                                      metric_type=hub_metric_type(k), metric_name=k,
                                      metric_value=round(float(v), 4)))
    return out


def render_card(*, name: str, license: str, demo: bool, summary: Optional[str], tags: list[str],
                lineage: dict[str, Any], evaluation: Optional[dict[str, Any]], weights: list[tuple[str, str]],
                files: Optional[list[tuple[str, str, str]]] = None,
                details: list[tuple[str, str]], preprocessing: dict[str, Any], load_snippet: str,
                pipeline_tag: str, architecture: str, library_name: str = "timm", gated_prompt: Optional[str] = None,
                gated_fields: Optional[list[str]] = None, plots: Optional[list[tuple[str, str]]] = None) -> ModelCard:
    from medfound.evaluate.markdown import evaluation_sections

    stages = _stages(lineage)
    datasets = training_datasets(lineage)
    modalities = sorted({d["modality"] for d in datasets})
    extra: dict[str, Any] = {}
    if gated_prompt:
        extra["extra_gated_prompt"] = gated_prompt
        extra["extra_gated_fields"] = {f: "text" for f in (gated_fields or ["Name", "Affiliation"])} | \
            {"I will not use this model for clinical decisions without local validation": "checkbox"}
    card_data = ModelCardData(
        license=license, library_name=library_name, model_name=name,
        tags=sorted({"medfound", "medical-imaging", *modalities, *(["demo"] if demo else []), *tags}),
        pipeline_tag=pipeline_tag, datasets=sorted({d["name"] for d in datasets}) or None,
        eval_results=eval_results(evaluation, pipeline_tag) or None, **extra)
    train_stages = [s for s in stages if s.get("stage") != "import"]
    hardware = sorted({s.get("hardware", "unknown hardware") for s in train_stages})
    seconds = sum(s.get("train_seconds", 0) for s in stages)
    gpu = any("CPU" not in h for h in hardware)
    deid = [f"{d['name']}: {_deid_text(d['deidentification'])}" for d in datasets if d.get("deidentification")]
    evaluation_md = "\n".join([EVAL_BEGIN, *evaluation_sections(evaluation, level="###"), EVAL_END]) \
        if evaluation else None
    external_drops = []
    for e in (evaluation or {}).get("external", []):
        for k, v in e["drop"].items():
            if v is not None and k in ("auroc", "dice"):
                external_drops.append(f"{k} changes by {v:+.4f} on {e['name']}")
    return ModelCard.from_template(
        card_data, template_path=str(template_path()), model_name=name, demo=demo,
        summary=summary or f"A `{architecture}` model trained with medfound "
                           f"({' then '.join(s['objective'] for s in stages)}).",
        details=details, weights=weights, files=files or [], preprocessing=preprocessing,
        medfound_version=medfound.__version__, timm_version=timm.__version__, torch_version=torch.__version__,
        modalities=modalities, datasets=datasets, deidentification=deid,
        stages=[{**s, "minutes": round(s.get("train_seconds", 0) / 60, 1)} for s in stages],
        total_minutes=round(seconds / 60, 1), compute_hours=round(seconds / 3600, 3),
        compute_unit="GPU-hours" if gpu else "CPU-hours", hardware_list=", ".join(hardware) or "not recorded",
        evaluation=evaluation, evaluation_md=evaluation_md, external_drops=external_drops,
        load_snippet=load_snippet, plots=plots or [], citations=sorted({d["attribution"] for d in datasets if d.get("attribution")}),
        method_citations=method_citations(stages))


def method_citations(stages: list[dict[str, Any]]) -> list[str]:
    text = " ".join(f"{s.get('objective', '')} {s.get('tuning', '')} " for s in stages).lower()
    return [ref for key, ref in METHOD_CITATIONS.items() if key in text]
