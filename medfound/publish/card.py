"""The model card, rendered with huggingface_hub's ModelCard from the run's own record.

Every number in the card comes from a file: `eval.json` (metrics), the manifests (data counts and
digests, through the export's lineage block), `logs/metrics.jsonl` (compute time, via the lineage)
and the weights themselves (parameter count, sha256). Nothing is typed by hand.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any, Optional

import timm
import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData

import medfound

TEMPLATE = "template.md"
METRIC_TYPES = {"auroc": "roc_auc", "accuracy": "accuracy", "balanced_accuracy": "balanced_accuracy",
                "kappa_quadratic": "cohen_kappa"}


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
    text = ", ".join(f"{v:,} {k}" for k, v in splits.items()) + " images"
    return f"trained on the {splits.get(used, 0):,} '{used}' images ({text})" if used in splits else text


def render_card(model: torch.nn.Module, lineage: dict[str, Any], evaluation: Optional[dict[str, Any]],
                weights_sha256: str, name: str, license: str, demo: bool, summary: Optional[str],
                tags: list[str]) -> ModelCard:
    stages = _stages(lineage)
    datasets, seen = [], set()
    for s in stages:
        for d in s.get("datasets", []):
            if (d["digest"], s["stage"]) in seen:
                continue
            seen.add((d["digest"], s["stage"]))
            src = d.get("source", {})
            datasets.append({"name": d["name"], "role": s["stage"], "modality": d["modality"], "site": d.get("site"),
                             "counts": _counts(d["counts"], s.get("split")), "digest": d["digest"],
                             "source": ", ".join(f.get("name", "?") for f in src.get("files", [])),
                             "license": src.get("license"), "attribution": src.get("attribution")})
    modalities = sorted({d["modality"] for d in datasets})
    cfg = model.pretrained_cfg
    class_names = lineage.get("label_schema", {}).get("names", [])
    eval_results = []
    if evaluation:
        ds = evaluation["dataset"]
        for k, v in evaluation["metrics"].items():
            if v is not None:
                eval_results.append(EvalResult(task_type="image-classification", dataset_type=ds["name"],
                                               dataset_name=ds["name"], dataset_split=ds["split"],
                                               metric_type=METRIC_TYPES.get(k, k), metric_name=k,
                                               metric_value=round(float(v), 4)))
    card_data = ModelCardData(
        license=license, library_name="timm", model_name=name, tags=sorted({"medfound", "medical-imaging", *modalities,
                                                                           *(["demo"] if demo else []), *tags}),
        pipeline_tag="image-classification" if class_names else "image-feature-extraction",
        datasets=sorted({d["name"] for d in datasets}) or None, eval_results=eval_results or None)
    hardware = sorted({s.get("hardware", "unknown hardware") for s in stages if s.get("stage") != "import"})
    citations = sorted({d["attribution"] for d in datasets if d.get("attribution")})
    return ModelCard.from_template(
        card_data, template_path=str(template_path()), model_name=name, demo=demo,
        summary=summary or f"A `{cfg.get('architecture')}` backbone trained with medfound "
                           f"({' then '.join(s['objective'] for s in stages)}).",
        architecture=cfg.get("architecture"), num_params=sum(p.numel() for p in model.parameters()),
        input_size=tuple(cfg["input_size"]), mean=tuple(round(m, 3) for m in cfg["mean"]),
        std=tuple(round(s, 3) for s in cfg["std"]), num_features=model.num_features,
        global_pool=getattr(model, "global_pool", "?"), class_names=class_names,
        label_type=lineage.get("label_schema", {}).get("type"), weights_sha256=weights_sha256,
        medfound_version=medfound.__version__, timm_version=timm.__version__, torch_version=torch.__version__,
        modalities=modalities, datasets=datasets,
        stages=[{**s, "minutes": round(s.get("train_seconds", 0) / 60, 1)} for s in stages],
        total_minutes=round(sum(s.get("train_seconds", 0) for s in stages) / 60, 1), hardware_list=", ".join(hardware),
        evaluation=evaluation, citations=citations)
