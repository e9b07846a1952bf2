"""Registries: one name -> (config class, builder, description) per kind of component, names unique.

In the style of timm's `register_model` and peft's `register_peft_method`: a component is registered once, its
config class (a pydantic model, torch-free) together with its builder, and everything that lists components is
built from the registry: the recipe schema's unions (`head.type`, `objective.name`), the CLI's `choices=`,
`medfound ls`, and the tests' parametrization. A lookup of an unknown name is an error that lists the known ones;
there is no `else` that silently means "the last known kind".

Builders are given as "module:attribute" strings and imported on first use, so that registering (and validating a
recipe) never imports torch. Third-party packages register their own components through the entry-point group
`medfound.plugins`: each entry point names a module (or a callable) that calls `HEADS.register(...)` etc. at import;
`load_plugins()` runs them once, before the recipe schema is built.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

PLUGIN_GROUP = "medfound.plugins"


@dataclass(frozen=True)
class Entry:
    """One registered component."""

    name: str
    description: str
    config: Optional[type] = None  # the pydantic section that configures it (None: no settings of its own)
    builder: Optional[str] = None  # "package.module:attribute", imported on first use
    extra: dict[str, Any] = field(default_factory=dict)

    def load(self) -> Callable[..., Any]:
        """The builder itself (imports its module)."""
        if self.builder is None:
            raise LookupError(f"{self.name} has no builder")
        module, _, attr = self.builder.partition(":")
        return getattr(importlib.import_module(module), attr)


class Registry:
    """name -> Entry for one kind of component (`Registry("head")`)."""

    def __init__(self, kind: str, key: str):
        self.kind, self.key = kind, key  # key: the recipe key that names it, for messages ("head.type")
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, *, description: str, config: Optional[type] = None,
                 builder: Optional[str] = None, **extra: Any) -> Entry:
        if not name or not name.replace("_", "").isalnum():
            raise ValueError(f"{self.kind} name {name!r}: use letters, digits and underscores")
        if name in self._entries:
            raise ValueError(f"a {self.kind} named {name!r} is already registered ({self._entries[name].builder}); "
                             "names are unique: choose another")
        if builder is not None and ":" not in builder:
            raise ValueError(f"{self.kind} {name!r}: builder must be 'module:attribute', got {builder!r}")
        entry = Entry(name, description, config, builder, dict(extra))
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(f"unknown {self.key} {name!r}: choose one of {', '.join(self._entries)}") from None

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call `name`'s builder with the arguments."""
        return self.get(name).load()(*args, **kwargs)

    def names(self) -> list[str]:
        return list(self._entries)

    def configs(self) -> tuple[type, ...]:
        return tuple(e.config for e in self._entries.values() if e.config is not None)

    def __iter__(self) -> Iterator[Entry]:
        return iter(list(self._entries.values()))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)


HEADS = Registry("head", "head.type")
OBJECTIVES = Registry("objective", "objective.name")
TUNINGS = Registry("tuning strategy", "tuning")
INGEST_KINDS = Registry("ingest kind", "shard KIND")
METRICS = Registry("metric", "metric")
IMPORT_FORMATS = Registry("import format", "import --format")
BENCH_PROTOCOLS = Registry("bench protocol", "protocols[].name")  # medfound/bench/suite.py
EXPORT_FORMATS = Registry("export format", "export_format")  # medfound/publish/formats

# the checkpoint layouts `medfound import` converts (medfound/importing.py); registered here, torch-free, so the CLI's
# choices and `medfound ls formats` come from one list
for _name, _description in (
        ("retfound", "RETFound checkpoints (MAE ViT-L/16 on retinal images): the encoder; the MAE decoder is kept "
                     "in mae_decoder.safetensors"),
        ("mae", "MAE pretraining checkpoints (He et al. 2022): the encoder; the decoder is kept in "
                "mae_decoder.safetensors"),
        ("uni", "UNI / UNI2-h pathology ViTs (timm-layout state dicts)"),
        ("dinov2", "DINOv2 backbones or training checkpoints: the teacher's backbone, FSDP block chunks flattened, "
                   "DINO/iBOT heads dropped"),
        ("dinov3", "DINOv3 backbones (Meta's checkpoints, or a transformers DINOv3ViTModel folder) -> timm's "
                   "vit_*_dinov3 (RoPE, register tokens, LayerScale, SwiGLU)"),
        ("timm", "any timm ViT state dict (.safetensors, .pth, .bin), or a timm folder with config.json")):
    IMPORT_FORMATS.register(_name, description=_description, builder="medfound.importing:import_checkpoint")

_plugins_loaded = False


def load_plugins() -> None:
    """Import every `medfound.plugins` entry point once (third-party heads, objectives, ingest kinds...)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=PLUGIN_GROUP):
        loaded = ep.load()
        if callable(loaded):
            loaded()
