"""Export format `network`: the kind's trained network as safetensors (`spec.weights_file`) + its json
(`spec.meta_file`: the lineage under `medfound`, the head, and what loading needs), beside any timm folder the kind
adds (export/backbone: the adapted ViT). Loaded by the kind's `load_network(export, recipe)`, strictly; published
with export/ kept, so `medfound.load(folder)` reads a run and its published folder alike."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

from medfound.io import atomic_dir, atomic_write_bytes, atomic_write_json, sha256_file
from medfound.publish.card import CardInputs, preprocessing as preprocessing_for, render_card, training_datasets
from medfound.publish.folder import (base_rows, card_options, described_files, evaluation_of, finish, hub_snippet,
                                     numel, set_config_licence)
from medfound.publish.formats import ExportFormat
from medfound.publish.licences import resolve


class NetworkFolder(ExportFormat):
    name = "network"
    library_name = "medfound"
    requires = ("load_network", "publish_details", "load_snippet")

    def write(self, spec, recipe, model, export: Path, *, lineage: dict[str, Any], meta: dict[str, Any],
              adapter: Any = None) -> dict[str, Any]:
        """`model`'s state dict -> export/WEIGHTS, `meta` (its JSON items; the lineage first unless it has it) ->
        export/META; each file atomically, beside what the kind already wrote there (export/backbone)."""
        from safetensors.torch import save

        export.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(export / spec.weights_file,
                           save({k: v.detach().contiguous() for k, v in model.state_dict().items()}))
        record = {k: v for k, v in meta.items() if k != "extra_files"}  # bytes belong to a timm folder
        atomic_write_json(export / spec.meta_file, record if "medfound" in record else {"medfound": lineage,
                                                                                         **record})
        return {}

    def load(self, spec, export: Path, recipe) -> Any:
        return spec.load_network(Path(export), recipe)

    def publish(self, spec, recipe, run_dir: Path, out: Path, *, overwrite: bool, name: Optional[str],
                rights: Optional[str]) -> dict[str, Any]:
        """export/ (the network's safetensors + json, and for ViT heads the adapted backbone as a timm folder in
        export/backbone), config.yaml, preprocessing.json, eval.json, report/, README.md. The published folder is
        loaded by the kind before the card is written, as the card's snippet (`medfound.load`) does."""
        from safetensors import safe_open

        weights_name, meta_name = spec.weights_file, spec.meta_file
        export = run_dir / "export"
        if not (export / weights_name).is_file():
            raise FileNotFoundError(f"{export}/{weights_name} missing: the run has not finished "
                                    "(continue it with `medfound finetune RECIPE trainer.resume=auto`)")
        evaluation = evaluation_of(run_dir, export / weights_name)
        meta = json.loads((export / meta_name).read_text())
        lineage = meta["medfound"]
        licence, licence_row = resolve(recipe.card.license, lineage, rights)
        with safe_open(str(export / weights_name), "pt") as f:
            n_params = sum(numel(f.get_slice(k).get_shape()) for k in f.keys())
        details = [("network", f"`{recipe.head.type}` ({spec.name}), {n_params:,} parameters"),
                   ("tuning", recipe.tuning)]
        backbone_cfg = export / "backbone" / "config.json"
        if backbone_cfg.is_file():
            details.append(("backbone", f"`{json.loads(backbone_cfg.read_text())['architecture']}` (timm folder "
                                        "`export/backbone`, adapted weights merged)"))
        kind_details, input_cfg = spec.publish_details(recipe, meta, export)
        details += kind_details
        prep = preprocessing_for(input_cfg, training_datasets(lineage), recipe, lineage.get("scale"))
        files = [weights_name] + (["backbone/model.safetensors"]
                                  if (export / "backbone" / "model.safetensors").is_file() else [])
        with atomic_dir(out, overwrite=overwrite, kind="model") as tmp:
            shutil.copytree(export, tmp / "export")
            shutil.copy2(run_dir / "config.yaml", tmp / "config.yaml")
            atomic_write_json(tmp / "eval.json", evaluation)
            atomic_write_json(tmp / "preprocessing.json", prep)
            self.load(spec, tmp / "export", recipe)  # the published folder loads strictly, as the snippet does
            if (tmp / "export" / "backbone" / "config.json").is_file():
                set_config_licence(tmp / "export" / "backbone" / "config.json", licence)
            card = render_card(CardInputs(**card_options(recipe, name or out.name, run_dir, licence), lineage=lineage,
                               evaluation=evaluation,
                               weights=[(f"export/{f}", sha256_file(tmp / "export" / f)) for f in files],
                               files=described_files(tmp, sorted(p.relative_to(tmp).as_posix()
                                                                 for p in (tmp / "export").glob("*.json")),
                                                     ["export/backbone/adapter"]),
                               details=details + base_rows(tmp / "export" / "backbone", recipe)
                               + [("licence", licence_row)], preprocessing=prep,
                               load_snippet=hub_snippet(spec.load_snippet(), recipe),
                               architecture=recipe.head.type, pipeline_tag=spec.pipeline_tag,
                               library_name=self.library_name, base_model=recipe.card.base_model,
                               repo_id=recipe.card.repo_id))
            finish(tmp, run_dir, card, spec.evaluation_outputs)
        return {"out": str(out), "files": sorted(p.name for p in out.iterdir()), "license": licence}
