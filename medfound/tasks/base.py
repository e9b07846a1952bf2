"""TaskSpec: what one task kind fills in of the one run lifecycle, and the registry of task kinds.

    build -> train loader -> fit (the one loop) -> export -> evaluate -> load -> publish

Writing the export, loading it, proving it and publishing it go through the kind's export format
(`medfound.publish.formats`: timm_folder or network), which calls back only the methods it declares.

`medfound.workflows.train / evaluate / publish` look the task up (`task_for(recipe)`) and call these methods; a task
never calls a dispatcher, and loading a trained model is always the task's `load`, never done by an evaluation or
publishing module. The keys a task reads are declared torch-free in `medfound.config.tasks.TASK_KEYS` (the recipe
validator rejects the rest before any work); `keys` links to that declaration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional, Protocol, runtime_checkable

from medfound.config import TASK_KEYS
from medfound.publish.formats import format_of, missing_methods


@dataclass
class TrainData:
    """What a task reads before it builds its module: shard paths and manifests (image tasks) or a bag index (MIL)."""

    sets: list[list[str]] = field(default_factory=list)
    manifests: list[Any] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    subset: Any = None  # data.train_fraction / train_shots: the chosen training keys (medfound.data.fractions.Subset)

    @property
    def keys(self) -> Optional[frozenset]:
        """The training keys the loader keeps, or None for the whole split."""
        return None if self.subset is None else self.subset.keys


@runtime_checkable
class TaskSpec(Protocol):
    """One task kind. Attributes: `name` (the one name: recipe.task, eval.json's task, TASKS' key), `stage` (the
    lineage's stage), `export_format` (the registered format its export is written, loaded, proven and published
    in: medfound.publish.formats; a head may name another), `weights_file` (the main weights in export/),
    `meta_file` (the json beside them in the `network` format), `pipeline_tag` (the Hub's task),
    `evaluation_outputs` (folders evaluation writes beside eval.json that the report links and publish copies),
    `capabilities` (`evaluate`: it has labels to score; `external`: eval.external is scored; `out`: evaluation can
    write elsewhere). The methods a format calls (`rebuild`; `load_network`, `publish_details`, `load_snippet`)
    are checked by `register_task` against the kind's format."""

    name: ClassVar[str]
    stage: ClassVar[str]
    export_format: ClassVar[str]
    weights_file: ClassVar[str]
    meta_file: ClassVar[Optional[str]]
    pipeline_tag: ClassVar[str]
    evaluation_outputs: ClassVar[tuple[str, ...]]
    capabilities: ClassVar[frozenset[str]]

    def training_data(self, recipe) -> TrainData: ...
    def build(self, recipe, data: TrainData) -> Any: ...
    def parameter_table(self, module, recipe) -> None: ...
    def train_loader(self, recipe, data: TrainData, ctx) -> Callable[[int], Any]: ...
    def normalizer(self, recipe) -> Any: ...
    def describe(self, recipe, data: TrainData) -> str: ...
    def lineage(self, recipe, state, data: TrainData) -> dict[str, Any]: ...
    def export(self, recipe, module, lineage: dict[str, Any], data: TrainData, export: Path) -> dict[str, Any]: ...
    def load(self, export: Path, recipe) -> Any:
        """The trained model of an export folder (RUN_DIR/export, or `read_run(published).export`), eval mode."""
    def scorer(self, run, recipe, out: Path) -> Any:
        """The kind's part of evaluation (medfound.evaluate.procedure.Scorer) for the model of `run`, writing
        extra files (heatmaps) under `out`; `evaluate_with` runs it. Raises where the kind has nothing to score."""
    def selection(self, recipe, data: TrainData, run_dir: Path) -> Any:
        """The run's validation-based model selection (`medfound.run.selection.Selection`), or None."""


class TaskBase:
    """What every task kind shares: its export format (the head's, where the head names one) and loading through
    it."""

    meta_file: ClassVar[Optional[str]] = None
    evaluation_outputs: ClassVar[tuple[str, ...]] = ()

    def format(self, recipe=None):
        """The export format of a run of this kind with `recipe` (medfound.publish.formats.format_of)."""

        return format_of(self, recipe)

    def load(self, export: Path, recipe) -> Any:
        return self.format(recipe).load(self, Path(export), recipe)


TASKS: dict[str, TaskSpec] = {}


def register_task(cls: type) -> type:
    """Class decorator: register one instance of a TaskSpec under its `name` (unique, declared in TASK_KEYS)."""
    spec = cls()
    if spec.name in TASKS:
        raise ValueError(f"a task kind named {spec.name!r} is already registered ({type(TASKS[spec.name]).__name__})")
    if spec.name not in TASK_KEYS:
        raise ValueError(f"task {spec.name!r}: declare the data.*/eval.* keys it reads in medfound.config.tasks")
    missing = [m for m in ("training_data", "build", "train_loader", "normalizer", "describe", "lineage", "export",
                           "load", "scorer", "parameter_table", "selection")
               if not callable(getattr(spec, m, None))]
    if missing:
        raise TypeError(f"task {spec.name!r} lacks {', '.join(missing)}")

    missing = missing_methods(spec, spec.export_format)  # an unknown format is an error naming the known ones
    if missing:
        raise TypeError(f"task {spec.name!r} exports in the {spec.export_format} format, which calls "
                        f"{', '.join(missing)}: the kind lacks them")
    TASKS[spec.name] = spec
    return cls


def task_for(recipe) -> TaskSpec:
    """The task kind that runs `recipe` (recipe.task)."""
    try:
        return TASKS[recipe.task]
    except KeyError:
        raise ValueError(f"no task kind {recipe.task!r} is registered: choose one of {', '.join(TASKS)}") from None


def load_strict(model, path: Path, what: str) -> None:
    """Load safetensors `path` into `model` strictly, naming the file when the recipe no longer fits it."""
    from safetensors.torch import load_file

    try:
        model.load_state_dict(load_file(str(path)))
    except RuntimeError as e:
        raise RuntimeError(f"{path} does not fit the {what} the run's recipe builds (was the recipe edited?): "
                           f"{e}") from None


NETWORK_SNIPPET = """import medfound

model = medfound.load("{folder}")  # {what}
# from the Hub: medfound.load(huggingface_hub.snapshot_download("REPO_ID"))"""
