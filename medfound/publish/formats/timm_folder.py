"""Export format `timm_folder`: the trained model as a timm `local-dir:` folder (model.safetensors + config.json
with the run's lineage; a LoRA run's adapter/ in peft's format; the objective's heads or decoder of a pretraining
run), proven against the kind's `rebuild` (checkpoint -> merged module) and published flat (the folder is the
export), loadable by timm, transformers' TimmWrapper and peft."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

from medfound.io import atomic_dir, atomic_write_json, sha256_file
from medfound.publish.card import (CardInputs, preprocessing as preprocessing_for, render_card, timm_details,
                                   timm_snippet, training_datasets)
from medfound.publish.export import check_reload, export_model, read_lineage, write_adapter_card
from medfound.publish.folder import (base_rows, card_options, described_files, evaluation_of, finish, hub_snippet,
                                     set_config_licence)
from medfound.publish.formats import ExportFormat
from medfound.publish.licences import for_export, resolve


class TimmFolder(ExportFormat):
    name = "timm_folder"
    library_name = "timm"
    requires = ("rebuild",)

    def write(self, spec, recipe, model, export: Path, *, lineage: dict[str, Any], meta: dict[str, Any],
              adapter: Any = None) -> dict[str, Any]:
        """`meta`: `label_names` (a classifier), `extra_files` (name -> bytes, e.g. an MAE decoder)."""

        diff = export_model(model, export, data=recipe.data, lineage=lineage,
                            license=for_export(recipe.card.license, lineage), label_names=meta.get("label_names"),
                            adapter=adapter, adapter_base_model=recipe.backbone.weights,
                            extra_files=meta.get("extra_files"))
        return {"reload_max_abs_diff": diff}

    def load(self, spec, export: Path, recipe) -> Any:
        """The exported model through timm (the classifier, or the encoder of a pretraining run), eval mode."""
        import timm

        return timm.create_model(f"local-dir:{export}", pretrained=True).eval()

    def reference(self, spec, run_dir: Path, recipe) -> Any:
        return spec.rebuild(Path(run_dir), recipe)

    def publish(self, spec, recipe, run_dir: Path, out: Path, *, overwrite: bool, name: Optional[str],
                rights: Optional[str]) -> dict[str, Any]:
        """model.safetensors + config.json (timm `local-dir:`; LoRA merged), adapter/ (peft format, LoRA runs), every
        other file of the export (an objective's heads), preprocessing.json, training_config.yaml, eval.json,
        report/, README.md (the card). The export is reloaded through timm and compared with the checkpoint's
        rebuild before the card is written."""

        export = run_dir / "export"
        weights = spec.weights_file
        if not (export / weights).is_file():
            raise FileNotFoundError(f"{export}/{weights} missing: the run has not finished "
                                    f"(continue it with `medfound {recipe.kind} RECIPE trainer.resume=auto`)")
        licence, licence_row = resolve(recipe.card.license, read_lineage(export), rights)  # refused before any work
        evaluation = evaluation_of(run_dir, export / weights) if "evaluate" in spec.capabilities else None
        reference = self.reference(spec, run_dir, recipe)
        with atomic_dir(out, overwrite=overwrite, kind="model") as tmp:
            for src in sorted(export.iterdir()):  # everything the export wrote (weights, config, adapter, heads)
                (shutil.copytree if src.is_dir() else shutil.copy2)(src, tmp / src.name)
            diff = check_reload(tmp, reference)
            set_config_licence(tmp / "config.json", licence)
            shutil.copy2(run_dir / "config.yaml", tmp / "training_config.yaml")
            if evaluation is not None:
                atomic_write_json(tmp / "eval.json", evaluation)
            model = self.load(spec, tmp, recipe)  # the published folder, loaded as the format loads it
            lineage = read_lineage(tmp)
            cfg = model.pretrained_cfg
            prep = preprocessing_for({k: cfg.get(k) for k in ("input_size", "mean", "std", "interpolation",
                                                              "crop_pct")},
                                     training_datasets(lineage), recipe, lineage.get("scale"))
            atomic_write_json(tmp / "preprocessing.json", prep)
            schema = lineage.get("label_schema", {})
            class_names = schema.get("names", []) if evaluation else []
            adapter_dir = tmp / "adapter"
            if adapter_dir.is_dir() and recipe.card.base_model:  # the Hub id of the base replaces the local path
                base = json.loads((adapter_dir / "base_model.json").read_text())
                base.update(base_model=recipe.card.base_model, timm_name=f"hf-hub:{recipe.card.base_model}")
                write_adapter_card(adapter_dir, base, class_names or None)
            card = render_card(CardInputs(**card_options(recipe, name or out.name, run_dir, licence), lineage=lineage,
                               evaluation=evaluation, weights=[(weights, sha256_file(tmp / weights))],
                               files=described_files(tmp, ["config.json"], ["adapter"]),
                               details=timm_details(model, class_names, schema.get("type")) + base_rows(tmp, recipe)
                               + [("licence", licence_row)],
                               preprocessing=prep,
                               load_snippet=hub_snippet(timm_snippet(class_names, recipe.card.repo_id), recipe),
                               architecture=cfg.get("architecture"), pipeline_tag=spec.pipeline_tag,
                               library_name=self.library_name, base_model=recipe.card.base_model,
                               repo_id=recipe.card.repo_id))
            finish(tmp, run_dir, card, spec.evaluation_outputs)
        return {"out": str(out), "reload_max_abs_diff": diff, "files": sorted(p.name for p in out.iterdir()),
                "license": licence}
