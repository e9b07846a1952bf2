"""Export formats: how a trained model is written to RUN_DIR/export, loaded back, proven to be the trained model,
and published. Registered components (`medfound.registry.EXPORT_FORMATS`), named by a task kind
(`TaskSpec.export_format`) and overridable by a head (its config's `export_format` ClassVar), so a new head that
timm cannot rebuild (an MLP classifier) exports, loads and publishes through `network` with no other change.

    timm_folder  model.safetensors + config.json that `timm.create_model("local-dir:DIR")` rebuilds (+ adapter/,
                 the objective's heads); the reload check compares it with the kind's `rebuild` (checkpoint ->
                 merged module). Published flat: the folder is the export.
    network      the kind's network as safetensors + its json (lineage, head, what loading needs); loaded by the
                 kind's `load_network`, strictly. Published with export/ kept, loaded by `medfound.load`.

Every method takes the export folder (the folder holding the weights: RUN_DIR/export, or a published folder's
`medfound.run.read_run(...).export`), never the run directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Optional

from medfound.registry import EXPORT_FORMATS


class ExportFormat:
    """One export format. `requires`: the TaskSpec methods it calls (`register_task` and `format_of` check them)."""

    name: ClassVar[str]
    library_name: ClassVar[str]
    requires: ClassVar[tuple[str, ...]] = ()

    def write(self, spec, recipe, model, export: Path, *, lineage: dict[str, Any], meta: dict[str, Any],
              adapter: Any = None) -> dict[str, Any]:
        """Write `model` (merged: no LoRA wrappers) to `export`; returns what the run's summary adds."""
        raise NotImplementedError

    def load(self, spec, export: Path, recipe) -> Any:
        """The trained model of `export`, eval mode."""
        raise NotImplementedError

    def reference(self, spec, run_dir: Path, recipe) -> Any:
        """The trained model rebuilt from the run's checkpoint, not from the export: what the export must
        reproduce. Raises where the format proves its export otherwise."""
        raise ValueError(f"{run_dir}: a {spec.name} run exports in the {self.name} format, which is proven by "
                         "loading it strictly, not against a rebuilt timm module")

    def publish(self, spec, recipe, run_dir: Path, out: Path, *, overwrite: bool, name: Optional[str],
                rights: Optional[str]) -> dict[str, Any]:
        """RUN_DIR -> a Hugging Face-style folder with its checked card."""
        raise NotImplementedError


for _name, _builder, _text in (
        ("timm_folder", "medfound.publish.formats.timm_folder:TimmFolder",
         "a timm local-dir folder (model.safetensors + config.json; adapter/), loaded by timm.create_model"),
        ("network", "medfound.publish.formats.network:NetworkFolder",
         "the kind's network (safetensors + json), loaded strictly by medfound.load")):
    EXPORT_FORMATS.register(_name, builder=_builder, description=_text)

_BUILT: dict[str, ExportFormat] = {}


def export_format(name: str) -> ExportFormat:
    """The registered format `name` (one instance each)."""
    if name not in _BUILT:
        _BUILT[name] = EXPORT_FORMATS.get(name).load()()
    return _BUILT[name]


def missing_methods(spec, fmt_name: str) -> list[str]:
    """The methods format `fmt_name` calls that `spec` lacks."""
    fmt = EXPORT_FORMATS.get(fmt_name).load()
    return [m for m in fmt.requires if not callable(getattr(spec, m, None))]


def format_of(spec, recipe=None) -> ExportFormat:
    """The format a run of `spec` exports in: its head's `export_format` where the head names one, else the kind's."""
    name = getattr(getattr(recipe, "head", None), "export_format", None) or spec.export_format
    missing = missing_methods(spec, name)
    if missing:
        raise ValueError(f"head.type={getattr(recipe.head, 'type', '?')} exports in the {name} format, which a "
                         f"{spec.name} run cannot write: task kind {spec.name} lacks {', '.join(missing)}")
    return export_format(name)
