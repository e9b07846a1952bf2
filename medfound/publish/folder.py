"""`medfound publish RUN_DIR --out DIR`: a run -> a Hugging Face-style folder with its model card.

Backbone and classification runs (pretraining, `task: classification`):
    model.safetensors + config.json (timm `local-dir:`; LoRA merged), adapter/ (peft format, LoRA runs),
    preprocessing.json, training_config.yaml, eval.json, report/ (plots), README.md (the card).
Network runs (tasks segmentation, box_prompt, mil): the trained network with its recipe, loadable by medfound:
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
from typing import Any, Optional

from medfound.config import FinetuneRecipe
from medfound.io import atomic_dir, atomic_write_json, sha256_file


def _evaluation(run_dir: Path, weights: Path) -> dict[str, Any]:
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


def _card_options(recipe: Any, name: str, run_dir: Path, licence: str) -> dict[str, Any]:
    c = recipe.card
    report = run_dir / "report"
    plots = [(title, f"report/{f}") for f, title in PLOTS.items() if (report / f).is_file()]
    plots += [(f"Prediction overlay {p.stem.rsplit('_', 1)[-1]}", f"report/{p.name}")
              for p in sorted(report.glob("overlay_internal_*.png"))[:2]]
    return {"name": name, "license": licence, "demo": c.demo, "summary": c.summary, "tags": c.tags,
            "gated_prompt": c.gated_prompt, "gated_fields": c.gated_fields, "plots": plots}


def _set_config_licence(config: Path, licence: str) -> None:
    """The published timm config.json states the card's licence (timm's pretrained_cfg.license)."""
    cfg = json.loads(config.read_text())
    if cfg.get("pretrained_cfg", {}).get("license") != licence:
        cfg.setdefault("pretrained_cfg", {})["license"] = licence
        atomic_write_json(config, cfg)


def _finish(tmp: Path, run_dir: Path, card) -> None:
    """Copy the evaluation report, save the card and verify it against the folder before the rename."""
    from medfound.publish.check import check_card

    if (run_dir / "report").is_dir():
        shutil.copytree(run_dir / "report", tmp / "report")
    if (run_dir / "heatmaps").is_dir():  # MIL: report.md links ../heatmaps
        shutil.copytree(run_dir / "heatmaps", tmp / "heatmaps")
    card.save(str(tmp / "README.md"))
    problems = check_card(tmp)
    if problems:
        raise RuntimeError("the rendered card does not match its folder (a medfound bug; nothing was published): "
                           + "; ".join(problems))


def publish_timm(run_dir: Path, out: Path, recipe: Any, task: Any, overwrite: bool, name: Optional[str],
                 rights: Optional[str] = None) -> dict:
    """A run whose export is a timm folder (pretraining, classification; `task` its TaskSpec) -> the folder."""
    from medfound.publish.card import render_card, timm_details, timm_snippet, training_datasets
    from medfound.publish.card import preprocessing as preprocessing_for
    from medfound.publish.export import check_reload, read_lineage, write_adapter_card
    from medfound.publish.licences import resolve

    export = run_dir / "export"
    if not (export / task.weights_file).is_file():
        raise FileNotFoundError(f"{export}/{task.weights_file} missing: the run has not finished "
                                f"(continue it with `medfound {recipe.kind} RECIPE trainer.resume=auto`)")
    licence, licence_row = resolve(recipe.card.license, read_lineage(export), rights)  # refused before any work
    evaluation = _evaluation(run_dir, export / task.weights_file) if "evaluate" in task.capabilities else None
    reference = task.rebuild(run_dir, recipe)
    with atomic_dir(out, overwrite=overwrite, kind="model") as tmp:
        for item in (task.weights_file, "config.json", "adapter", "mae_decoder.safetensors", "dino_heads.safetensors"):
            src = export / item
            if src.is_dir():
                shutil.copytree(src, tmp / item)
            elif src.is_file():
                shutil.copy2(src, tmp / item)
        diff = check_reload(tmp, reference)
        _set_config_licence(tmp / "config.json", licence)
        shutil.copy2(run_dir / "config.yaml", tmp / "training_config.yaml")
        if evaluation is not None:
            atomic_write_json(tmp / "eval.json", evaluation)
        model = task.load(tmp, recipe)  # the published folder, loaded as the task loads it
        lineage = read_lineage(tmp)
        cfg = model.pretrained_cfg
        prep = preprocessing_for({k: cfg.get(k) for k in ("input_size", "mean", "std", "interpolation", "crop_pct")},
                                 training_datasets(lineage), recipe, lineage.get("scale"))
        atomic_write_json(tmp / "preprocessing.json", prep)
        schema = lineage.get("label_schema", {})
        class_names = schema.get("names", []) if evaluation else []
        adapter_dir = tmp / "adapter"
        if adapter_dir.is_dir() and recipe.card.base_model:  # the Hub id of the base replaces the run's local path
            base = json.loads((adapter_dir / "base_model.json").read_text())
            base.update(base_model=recipe.card.base_model, timm_name=f"hf-hub:{recipe.card.base_model}")
            write_adapter_card(adapter_dir, base, class_names or None)
        card = render_card(**_card_options(recipe, name or out.name, run_dir, licence), lineage=lineage,
                           evaluation=evaluation, weights=[(task.weights_file, sha256_file(tmp / task.weights_file))],
                           files=described_files(tmp, ["config.json"], ["adapter"]),
                           details=timm_details(model, class_names, schema.get("type")) + base_rows(tmp, recipe)
                           + [("licence", licence_row)],
                           preprocessing=prep, load_snippet=_hub_snippet(timm_snippet(class_names, recipe.card.repo_id),
                                                                         recipe),
                           architecture=cfg.get("architecture"),
                           pipeline_tag="image-classification" if class_names else "image-feature-extraction",
                           library_name="timm", base_model=recipe.card.base_model, repo_id=recipe.card.repo_id)
        _finish(tmp, run_dir, card)
    return {"out": str(out), "reload_max_abs_diff": diff, "files": sorted(p.name for p in out.iterdir()),
            "license": licence}


def publish_network(run_dir: Path, out: Path, recipe: FinetuneRecipe, task: Any, overwrite: bool,
                    name: Optional[str], rights: Optional[str] = None) -> dict:
    """A run of a network task (segmentation, box prompt, MIL; `task` its TaskSpec, which says what the network is,
    what input it takes and how it loads) -> the folder; the published folder is loaded by `task.load` before the
    card is written, as the card's snippet (`medfound.load`) does."""
    from safetensors import safe_open

    from medfound.publish.card import render_card, training_datasets
    from medfound.publish.card import preprocessing as preprocessing_for

    weights_name, meta_name = task.weights_file, task.meta_file
    export = run_dir / "export"
    if not (export / weights_name).is_file():
        raise FileNotFoundError(f"{export}/{weights_name} missing: the run has not finished "
                                "(continue it with `medfound finetune RECIPE trainer.resume=auto`)")
    evaluation = _evaluation(run_dir, export / weights_name)
    meta = json.loads((export / meta_name).read_text())
    lineage = meta["medfound"]
    from medfound.publish.licences import resolve

    licence, licence_row = resolve(recipe.card.license, lineage, rights)
    with safe_open(str(export / weights_name), "pt") as f:
        n_params = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
    details = [("network", f"`{recipe.head.type}` ({task.name}), {n_params:,} parameters"),
               ("tuning", recipe.tuning)]
    backbone_cfg = export / "backbone" / "config.json"
    if backbone_cfg.is_file():
        details.append(("backbone", f"`{json.loads(backbone_cfg.read_text())['architecture']}` (timm folder "
                                    "`export/backbone`, adapted weights merged)"))
    task_details, input_cfg = task.publish_details(recipe, meta, export)
    details += task_details
    pipeline_tag = task.pipeline_tag
    prep = preprocessing_for(input_cfg, training_datasets(lineage), recipe, lineage.get("scale"))
    files = [weights_name] + (["backbone/model.safetensors"] if (export / "backbone" / "model.safetensors").is_file()
                              else [])
    with atomic_dir(out, overwrite=overwrite, kind="model") as tmp:
        shutil.copytree(export, tmp / "export")
        shutil.copy2(run_dir / "config.yaml", tmp / "config.yaml")
        atomic_write_json(tmp / "eval.json", evaluation)
        atomic_write_json(tmp / "preprocessing.json", prep)
        task.load(tmp, recipe)  # the published folder loads strictly, as the card's snippet does
        if (tmp / "export" / "backbone" / "config.json").is_file():
            _set_config_licence(tmp / "export" / "backbone" / "config.json", licence)
        card = render_card(**_card_options(recipe, name or out.name, run_dir, licence), lineage=lineage,
                           evaluation=evaluation,
                           weights=[(f"export/{f}", sha256_file(tmp / "export" / f)) for f in files],
                           files=described_files(tmp, sorted(p.relative_to(tmp).as_posix()
                                                             for p in (tmp / "export").glob("*.json")),
                                                 ["export/backbone/adapter"]),
                           details=details + base_rows(tmp / "export" / "backbone", recipe)
                           + [("licence", licence_row)], preprocessing=prep,
                           load_snippet=_hub_snippet(task.load_snippet(), recipe),
                           architecture=recipe.head.type, pipeline_tag=pipeline_tag, library_name="medfound",
                           base_model=recipe.card.base_model, repo_id=recipe.card.repo_id)
        _finish(tmp, run_dir, card)
    return {"out": str(out), "files": sorted(p.name for p in out.iterdir()), "license": licence}


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


def _hub_snippet(snippet: str, recipe: Any) -> str:
    return snippet.replace("REPO_ID", recipe.card.repo_id) if recipe.card.repo_id else snippet


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
