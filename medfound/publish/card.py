"""The model card, rendered with huggingface_hub's ModelCard from the run's own record.

Every number in the card comes from a file: `eval.json` (metrics, intervals, per-site and external results, written
by `evaluate.markdown.evaluation_sections`, the same code as report.md), the manifests (data counts and digests,
through the export's lineage block), `logs/metrics.jsonl` (compute time, via the lineage) and the weights themselves
(parameter count, sha256). Nothing is typed by hand, and `medfound card check` (publish/check.py) re-derives the
evaluation and the hashes to prove the card still matches its folder.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import timm
import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData

import medfound
from medfound.evaluate.definitions import hub_metric_type
from medfound.data.fractions import describe
from medfound.evaluate.markdown import evaluation_sections

TEMPLATE = "template.md"
EVAL_BEGIN, EVAL_END = "<!-- medfound:evaluation (generated from eval.json; `medfound card check` verifies it) -->", \
    "<!-- /medfound:evaluation -->"
PLACEHOLDER, IMAGE_PLACEHOLDER = "PATH_TO_THIS_FOLDER", "IMAGE.png"
# keyword in a stage's objective or tuning -> (BibTeX key, entry type, fields); the card lists each as a line and
# as BibTeX (the bibliographic records of the papers the methods come from)
METHOD_REFERENCES: dict[str, tuple[str, str, dict[str, str]]] = {
    "mae": ("he2022mae", "inproceedings", {
        "author": "He, Kaiming and Chen, Xinlei and Xie, Saining and Li, Yanghao and Doll{\\'a}r, Piotr and "
                  "Girshick, Ross",
        "title": "Masked Autoencoders Are Scalable Vision Learners", "booktitle": "CVPR", "year": "2022"}),
    "dino": ("oquab2024dinov2", "article", {
        "author": "Oquab, Maxime and Darcet, Timoth{\\'e}e and Moutakanni, Th{\\'e}o and others",
        "title": "{DINOv2}: Learning Robust Visual Features without Supervision",
        "journal": "Transactions on Machine Learning Research", "year": "2024"}),
    "lora": ("hu2022lora", "inproceedings", {
        "author": "Hu, Edward J. and Shen, Yelong and Wallis, Phillip and Allen-Zhu, Zeyuan and Li, Yuanzhi and "
                  "Wang, Shean and Wang, Lu and Chen, Weizhu",
        "title": "{LoRA}: Low-Rank Adaptation of Large Language Models", "booktitle": "ICLR", "year": "2022"}),
    "attention mil": ("ilse2018attention", "inproceedings", {
        "author": "Ilse, Maximilian and Tomczak, Jakub and Welling, Max",
        "title": "Attention-based Deep Multiple Instance Learning", "booktitle": "ICML", "year": "2018"}),
    "box-prompt": ("ma2024medsam", "article", {
        "author": "Ma, Jun and He, Yuting and Li, Feifei and Han, Lin and You, Chenyu and Wang, Bo",
        "title": "Segment anything in medical images", "journal": "Nature Communications", "volume": "15",
        "year": "2024"}),
    "unetr": ("hatamizadeh2022unetr", "inproceedings", {
        "author": "Hatamizadeh, Ali and Tang, Yucheng and Nath, Vishwesh and others",
        "title": "{UNETR}: Transformers for 3D Medical Image Segmentation", "booktitle": "WACV", "year": "2022"}),
    "transunet": ("chen2021transunet", "article", {
        "author": "Chen, Jieneng and Lu, Yongyi and Yu, Qihang and others",
        "title": "{TransUNet}: Transformers Make Strong Encoders for Medical Image Segmentation",
        "journal": "arXiv preprint arXiv:2102.04306", "year": "2021"}),
    "attention_unet": ("oktay2018attention", "inproceedings", {
        "author": "Oktay, Ozan and Schlemper, Jo and Le Folgoc, Lo{\\\"\\i}c and others",
        "title": "Attention {U-Net}: Learning Where to Look for the Pancreas", "booktitle": "MIDL", "year": "2018"}),
    "unet ": ("ronneberger2015unet", "inproceedings", {
        "author": "Ronneberger, Olaf and Fischer, Philipp and Brox, Thomas",
        "title": "{U-Net}: Convolutional Networks for Biomedical Image Segmentation", "booktitle": "MICCAI",
        "year": "2015"}),
    "vnet": ("milletari2016vnet", "inproceedings", {
        "author": "Milletari, Fausto and Navab, Nassir and Ahmadi, Seyed-Ahmad",
        "title": "{V-Net}: Fully Convolutional Neural Networks for Volumetric Medical Image Segmentation",
        "booktitle": "3DV", "year": "2016"}),
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


def _counts(d: dict[str, Any], used: Optional[str], subset: Optional[dict[str, Any]] = None) -> str:
    splits = d.get("by_split", {})
    text = ", ".join(f"{v:,} {k}" for k, v in splits.items()) + " samples"
    modalities = d.get("by_modality") or {}
    if len(modalities) > 1:
        text += "; per modality " + ", ".join(f"{k} {v:,}" for k, v in modalities.items())
    sites = d.get("by_site") or {}
    if sites:
        text += "; per site " + ", ".join(f"{k} {v:,}" for k, v in sites.items())
    if subset and used in splits:  # a fraction of the labels (data.train_fraction / train_shots)
        return f"trained on {_subset_text(subset)} of split '{used}' ({text})"
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
                             "counts": _counts(counts, s.get("split"), s.get("train_subset")) if counts else
                             f"{d.get('slides', '?')} slides (bags digest {d.get('bags_digest', '?')})",
                             "digest": d.get("digest", "?"),
                             "source": _source_files(src.get("files")),
                             "license": src.get("license") or d.get("license"),
                             "attribution": src.get("attribution") or d.get("attribution"),
                             "deidentification": d.get("deidentification")})
    return datasets


def _subset_text(record: dict[str, Any]) -> str:
    return describe(record)


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


def architecture_text(model: torch.nn.Module) -> str:
    """What the network is, from the module itself: timm's family name says only the family (a patch-4, depth-6
    model is still `vit_tiny_patch16_224`), so the card states patch, depth, width and heads of a ViT."""
    cfg = model.pretrained_cfg
    n = sum(p.numel() for p in model.parameters())
    parts = []
    pe, blocks = getattr(model, "patch_embed", None), getattr(model, "blocks", None)
    if pe is not None and blocks is not None:
        ps = pe.patch_size if isinstance(pe.patch_size, (tuple, list)) else (pe.patch_size, pe.patch_size)
        parts += [f"patch {ps[0]}" if ps[0] == ps[1] else f"patch {ps[0]}x{ps[1]}", f"depth {len(blocks)}",
                  f"width {getattr(model, 'embed_dim', model.num_features)}"]
        heads = getattr(getattr(blocks[0], "attn", None), "num_heads", None) if len(blocks) else None
        if heads:
            parts.append(f"{heads} heads")
        if getattr(model, "num_prefix_tokens", 0):
            parts.append(f"{model.num_prefix_tokens} prefix token(s)")
    built = f" built with {', '.join(parts)}" if parts else ""
    return f"`{cfg.get('architecture')}` (timm family){built}; {n:,} parameters (config.json `model_args`)"


@torch.no_grad()
def timm_outputs(model: torch.nn.Module) -> str:
    """The output shapes, measured on one zero input of the model's input size."""
    c, h, w = model.pretrained_cfg["input_size"]
    was = model.training
    model.eval()
    try:
        tokens = model.forward_features(torch.zeros(1, c, h, w))
        pooled = model.forward_head(tokens, pre_logits=True)
    finally:
        model.train(was)
    shape = ", ".join(str(d) for d in tokens.shape[1:])
    text = f"`forward_features(x)`: [B, {shape}]; pooled features (`num_classes=0`): [B, {pooled.shape[-1]}]"
    if model.num_classes:
        text += f"; `model(x)`: logits [B, {model.num_classes}]"
    return text


def timm_details(model: torch.nn.Module, class_names: list[str], label_type: Optional[str]) -> list[tuple[str, str]]:
    cfg = model.pretrained_cfg
    rows = [("architecture", architecture_text(model)),
            ("input", f"[B, {cfg['input_size'][0]}, {cfg['input_size'][1]}, {cfg['input_size'][2]}]: "
                      f"{cfg['input_size'][1]}x{cfg['input_size'][2]} px, {cfg['input_size'][0]} channels"),
            ("features", f"{model.num_features}-d, pooling `{getattr(model, 'global_pool', '?')}`"),
            ("outputs", timm_outputs(model))]
    if class_names:
        rows.append(("classes", f"{len(class_names)} ({label_type}): {', '.join(class_names)}"))
    return rows


def preprocessing(input_cfg: dict[str, Any], datasets: list[dict[str, Any]], recipe: Any,
                  scale: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """preprocessing.json: what a user must do to an image before the model sees it, and the physical scale it
    expects (`scale`: the training data's, medfound.data.scale)."""
    mpps = sorted({d["mpp"] for d in datasets if d.get("mpp")})
    stain = "Macenko, MONAI NormalizeHEStains defaults, before everything else" \
        if getattr(recipe.data, "stain_normalize", False) else None
    expects = {}
    seg = getattr(recipe, "segment", None)
    if seg is not None and getattr(seg, "fov_diameter", None):
        expects["fov_diameter_px"] = f"{seg.fov_diameter} (every image is resized to it: segment.fov_diameter)"
    elif scale and scale.get("fov_diameter_px"):
        expects["fov_diameter_px"] = f"{scale['fov_diameter_px']:g} (median of the training images; resize yours " \
                                     "to it, e.g. segment.fov_diameter)"
    if seg is not None and getattr(seg, "mpp", None):
        expects["microns_per_pixel_input"] = f"{seg.mpp:g} (every image is resampled to it from its own um/px: " \
                                             "segment.mpp)"
    spacing = getattr(recipe.data, "spacing_mm", None)
    if spacing:
        expects["pixel_spacing_mm"] = f"{spacing:g} (every image is resampled to it from its own pixel spacing, then " \
                                      "padded or centre-cropped to the input size: data.spacing_mm)"
    elif scale and scale.get("spacing_mm"):
        expects["pixel_spacing_mm"] = scale["spacing_mm"]
    return {"modality": sorted({d["modality"] for d in datasets}),
            "microns_per_pixel": mpps[0] if len(mpps) == 1 else (mpps or None),
            "ct_window": getattr(recipe.data, "window", None), **({"stain_normalization": stain} if stain else {}),
            **expects, **input_cfg}


def timm_snippet(class_names: list[str], repo_id: Optional[str] = None) -> str:
    hub = repo_id or "REPO_ID"
    lines = ["import timm, torch", "from PIL import Image", "",
             f'folder = "{PLACEHOLDER}"  # this folder; from the Hub: huggingface_hub.snapshot_download("{hub}")',
             f'# or straight from the Hub: timm.create_model("hf-hub:{hub}", pretrained=True)']
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


@dataclass
class CardInputs:
    """Everything a model card is written from: the names and licence, the run's lineage and evaluation, the file
    rows (weights with sha256, configs and adapters), the details table, the preprocessing, the loading snippet and
    the Hub metadata (pipeline tag, library, base model, repo id, gating); the export format fills it in."""

    name: str
    license: str
    demo: bool
    summary: Optional[str]
    tags: list[str]
    lineage: dict[str, Any]
    evaluation: Optional[dict[str, Any]]
    weights: list[tuple[str, str]]
    details: list[tuple[str, str]]
    preprocessing: dict[str, Any]
    load_snippet: str
    pipeline_tag: str
    architecture: str
    files: Optional[list[tuple[str, str, str]]] = None
    library_name: str = "timm"
    gated_prompt: Optional[str] = None
    gated_fields: Optional[list[str]] = None
    plots: Optional[list[tuple[str, str]]] = None
    base_model: Optional[str] = None
    repo_id: Optional[str] = None


def render_card(card: CardInputs) -> ModelCard:
    """The model card (huggingface_hub ModelCard from the shipped template) of one published folder."""
    stages = _stages(card.lineage)
    datasets = training_datasets(card.lineage)
    modalities = sorted({d["modality"] for d in datasets})
    extra: dict[str, Any] = {}
    if card.gated_prompt:
        extra["extra_gated_prompt"] = card.gated_prompt
        extra["extra_gated_fields"] = {f: "text" for f in (card.gated_fields or ["Name", "Affiliation"])} | \
            {"I will not use this model for clinical decisions without local validation": "checkbox"}
    card_data = ModelCardData(
        license=card.license, library_name=card.library_name, model_name=card.name,
        tags=sorted({"medfound", "medical-imaging", *modalities, *(["demo"] if card.demo else []), *card.tags}),
        pipeline_tag=card.pipeline_tag, datasets=sorted({d["name"] for d in datasets}) or None,
        eval_results=eval_results(card.evaluation, card.pipeline_tag) or None, base_model=card.base_model, **extra)
    train_stages = [s for s in stages if s.get("stage") != "import"]
    hardware = sorted({s.get("hardware", "unknown hardware") for s in train_stages})
    seconds = sum(s.get("train_seconds", 0) for s in stages)
    gpu = any("CPU" not in h for h in hardware)
    deid = [f"{d['name']}: {_deid_text(d['deidentification'])}" for d in datasets if d.get("deidentification")]
    evaluation_md = "\n".join([EVAL_BEGIN, *evaluation_sections(card.evaluation, level="###"), EVAL_END]) \
        if card.evaluation else None
    external_drops = []
    for e in (card.evaluation or {}).get("external", []):
        for k, v in e["drop"].items():
            if v is not None and k in ("auroc", "dice"):
                external_drops.append(f"{k} changes by {v:+.4f} on {e['name']}")
    return ModelCard.from_template(
        card_data, template_path=str(template_path()), model_name=card.name, demo=card.demo,
        summary=card.summary or f"A `{card.architecture}` model trained with medfound "
                           f"({' then '.join(s['objective'] for s in stages)}).",
        details=card.details, weights=card.weights, files=card.files or [], preprocessing=card.preprocessing,
        medfound_version=medfound.__version__, timm_version=timm.__version__, torch_version=torch.__version__,
        modalities=modalities, datasets=datasets, deidentification=deid,
        stages=[{**s, "minutes": round(s.get("train_seconds", 0) / 60, 1)} for s in stages],
        total_minutes=round(seconds / 60, 1), compute_hours=round(seconds / 3600, 3),
        compute_unit="GPU-hours" if gpu else "CPU-hours", hardware_list=", ".join(hardware) or "not recorded",
        evaluation=card.evaluation, evaluation_md=evaluation_md, external_drops=external_drops,
        load_snippet=card.load_snippet, plots=card.plots or [], citations=sorted({d["attribution"] for d in datasets if d.get("attribution")}),
        method_citations=method_citations(stages), bibtex=bibtex(card.name, stages, card.repo_id))


def _methods(stages: list[dict[str, Any]]) -> list[tuple[str, str, dict[str, str]]]:
    text = " ".join(f"{s.get('objective', '')} {s.get('tuning', '')} " for s in stages).lower()
    return [ref for key, ref in METHOD_REFERENCES.items() if key in text]


def method_citations(stages: list[dict[str, Any]]) -> list[str]:
    """One line per method paper the stages used: authors, "title", venue year."""
    out = []
    for _, _, f in _methods(stages):
        first = f["author"].split(" and ")[0].split(",")[0]
        title = f["title"].replace("{", "").replace("}", "")
        out.append(f'{first} et al., "{title}", {f.get("booktitle") or f.get("journal")} {f["year"]}.')
    return out


def _bibtex_entry(kind: str, key: str, fields: dict[str, str]) -> str:
    body = ",\n".join(f"  {k} = {{{v}}}" for k, v in fields.items())
    return f"@{kind}{{{key},\n{body}\n}}"


def bibtex(name: str, stages: list[dict[str, Any]], repo_id: Optional[str]) -> str:
    """The card's BibTeX block: this model (with the medfound version that made it), then each method paper."""
    import datetime
    import re

    key = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower() or "model"
    model = {"title": f"{{{name}}}", "author": "{medfound contributors}",
             "year": str(datetime.date.today().year),
             "howpublished": f"\\url{{https://huggingface.co/{repo_id}}}" if repo_id else "a medfound model folder",
             "note": f"Trained and published with medfound {medfound.__version__}"}
    return "\n\n".join([_bibtex_entry("misc", key, model)]
                        + [_bibtex_entry(kind, k, f) for k, kind, f in _methods(stages)])
