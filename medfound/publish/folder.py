"""`medfound publish RUN_DIR --out DIR`: what every export format's publish shares (the evaluation check, the card's
options and file rows, the report copy, the card check before the rename). The formats themselves are in
medfound.publish.formats (timm_folder, network).

timm_folder (pretraining; classification with timm's own classifier):
    model.safetensors + config.json (timm `local-dir:`; LoRA merged), adapter/ (peft format, LoRA runs),
    preprocessing.json, training_config.yaml, eval.json, report/ (plots), README.md (the card).
network (segmentation, box prompts, MIL; any head timm cannot rebuild): the trained network with its recipe,
loadable by medfound:
    export/ (the network's safetensors + json, and for ViT heads the adapted backbone as a timm folder in
    export/backbone), config.yaml, preprocessing.json, eval.json, report/, README.md.

The folder is written atomically. Before anything is written the export is proven to be the trained model (timm
reload of the checkpoint's rebuild for backbones; the eval.json hash for networks), and the card is checked
against the folder (`check_card`) before the rename, so a drifting card is never published.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from medfound.io import atomic_write_json, sha256_file
from medfound.publish.check import check_card


def evaluation_of(run_dir: Path, weights: Path) -> dict[str, Any]:
    if not (run_dir / "eval.json").is_file():
        raise FileNotFoundError(f"{run_dir}/eval.json missing: run `medfound evaluate {run_dir}` first")
    evaluation = json.loads((run_dir / "eval.json").read_text())
    sha = sha256_file(weights)
    if evaluation["model"]["sha256"] != sha:
        raise ValueError(f"{run_dir}/eval.json was computed on other weights than {weights} "
                         f"(sha256 {evaluation['model']['sha256'][:12]} vs {sha[:12]}); "
                         f"re-run `medfound evaluate {run_dir}`")
    return evaluation


PLOTS = {"roc.png": "ROC with 95% bootstrap bands", "reliability.png": "Reliability diagram",
         "confusion.png": "Confusion matrix"}


def described_files(folder: Path, configs: list[str], adapters: list[str]) -> list[tuple[str, str, str]]:
    """The card's hashed rows besides the weights: the configs that say what the weights are (architecture, label
    names, head) and every file of a LoRA adapter, as (label, path, sha256); `medfound card check` verifies each."""
    rows = [("config", c, sha256_file(folder / c)) for c in configs if (folder / c).is_file()]
    for a in adapters:
        rows += [("adapter", p.relative_to(folder).as_posix(), sha256_file(p))
                 for p in sorted((folder / a).rglob("*")) if p.is_file()]
    return rows


def card_options(recipe: Any, name: str, run_dir: Path, licence: str) -> dict[str, Any]:
    c = recipe.card
    report = run_dir / "report"
    plots = [(title, f"report/{f}") for f, title in PLOTS.items() if (report / f).is_file()]
    plots += [(f"Prediction overlay {p.stem.rsplit('_', 1)[-1]}", f"report/{p.name}")
              for p in sorted(report.glob("overlay_internal_*.png"))[:2]]
    return {"name": name, "license": licence, "demo": c.demo, "summary": c.summary, "tags": c.tags,
            "gated_prompt": c.gated_prompt, "gated_fields": c.gated_fields, "plots": plots}


def set_config_licence(config: Path, licence: str) -> None:
    """The published timm config.json states the card's licence (timm's pretrained_cfg.license)."""
    cfg = json.loads(config.read_text())
    if cfg.get("pretrained_cfg", {}).get("license") != licence:
        cfg.setdefault("pretrained_cfg", {})["license"] = licence
        atomic_write_json(config, cfg)


def finish(tmp: Path, run_dir: Path, card, outputs: tuple[str, ...] = ()) -> None:
    """Copy the evaluation report (and the kind's `outputs` folders), save the card and verify it against the
    folder before the rename."""

    if (run_dir / "report").is_dir():
        shutil.copytree(run_dir / "report", tmp / "report")
    for extra in outputs:  # the kind's evaluation outputs the report links (MIL: ../heatmaps)
        if (run_dir / extra).is_dir():
            shutil.copytree(run_dir / extra, tmp / extra)
    card.save(str(tmp / "README.md"))
    problems = check_card(tmp)
    if problems:
        raise RuntimeError("the rendered card does not match its folder (a medfound bug; nothing was published): "
                           + "; ".join(problems))


def base_rows(folder: Path, recipe: Any) -> list[tuple[str, str]]:
    """The card's `base model` row: the Hub id (card.base_model / --base-model) or the backbone folder the run
    started from, with the base weights' sha256 where the adapter recorded it."""
    record = folder / "adapter" / "base_model.json"
    sha = json.loads(record.read_text()).get("base_weights_sha256") if record.is_file() else None
    weights = getattr(getattr(recipe, "backbone", None), "weights", None)
    base = recipe.card.base_model or (str(weights) if weights else None)
    if base is None:
        return []
    where = f"`{base}`" + (" (Hugging Face Hub)" if recipe.card.base_model else
                           " (the backbone folder the run started from; `medfound publish --base-model HUB_ID` "
                           "names its Hub id)")
    return [("base model", where + (f", weights sha256 `{sha}`" if sha else ""))]


def hub_snippet(snippet: str, recipe: Any) -> str:
    return snippet.replace("REPO_ID", recipe.card.repo_id) if recipe.card.repo_id else snippet


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
