"""Loading a recipe: YAML, `key=value` overrides, friendly errors, the resolved recipe as YAML."""

from __future__ import annotations

import difflib
import importlib.resources
import os
import re
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from medfound.config.base import ConfigError
from medfound.config.recipes import RECIPE_ADAPTER, RECIPE_KINDS, FinetuneRecipe, PretrainRecipe

RECIPE_FOLDERS = ("pretrain", "adapt")


def recipe_dirs(folder: str) -> list[Path]:
    """Where recipes named without a path are looked for, in order: `./FOLDER`, the wheel's
    `medfound/recipes/FOLDER`, the source checkout's `FOLDER` next to the package."""
    dirs = [Path(folder)]
    try:
        dirs.append(Path(str(importlib.resources.files("medfound") / "recipes" / folder)))
    except (ModuleNotFoundError, TypeError):  # pragma: no cover - namespace edge cases
        pass
    dirs.append(Path(__file__).resolve().parents[2] / folder)
    return dirs


def list_recipes() -> dict[str, list[tuple[str, Path, str]]]:
    """Every shipped recipe by folder: (name, path, the first line of its opening comment)."""
    out: dict[str, list[tuple[str, Path, str]]] = {}
    for folder in RECIPE_FOLDERS:
        seen: dict[str, tuple[str, Path, str]] = {}
        for d in recipe_dirs(folder)[1:]:  # shipped ones, not the current directory's
            for p in sorted(d.glob("*.yaml")) if d.is_dir() else []:
                if p.stem not in seen:
                    first = next((ln.lstrip("# ").strip() for ln in p.read_text().splitlines()
                                  if ln.startswith("#") and ln.lstrip("# ").strip()), "")
                    seen[p.stem] = (p.stem, p, first)
        out[folder] = sorted(seen.values())
    return out


def find_recipe(name_or_path: str | os.PathLike, folder: str) -> Path:
    """Resolve a recipe given as a path, or by name from the root `pretrain/` / `adapt/` folders.

    Search order: the path as given; `./{folder}/{name}.yaml`; the recipes shipped in the wheel
    (`medfound/recipes/{folder}`); the source checkout next to the package.
    """
    p = Path(name_or_path)
    if p.is_file():
        return p
    stem = p.name if p.suffix in (".yaml", ".yml") else p.name + ".yaml"
    candidates = [d / stem for d in recipe_dirs(folder)]
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(f"recipe {str(name_or_path)!r} not found: looked at {', '.join(str(c) for c in [p, *candidates])}. "
                      f"Pass a path to a YAML file or the name of a recipe in {folder}/.")


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    """`a.b.c=value` -> (['a','b','c'], value parsed as YAML, so 1e-4 is a float and [1,2] a list)."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form key.path=value (e.g. optim.lr=1e-4)")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from e
        parsed.append((key.split("."), value))
    return parsed


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for path, value in parse_overrides(overrides):
        node = data
        for i, part in enumerate(path[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {'.'.join(path)}: {'.'.join(path[: i + 1])} is a value, not a section")
            node = nxt
        node[path[-1]] = value
    return data


def _model_at(model: type[BaseModel] | None, loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class found by walking field names `loc` from `model` (None if not a model)."""
    for part in loc:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        model = _as_model(model.model_fields[part].annotation)
    return model


def _as_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _as_model(arg)
        if found is not None:
            return found
    return None


def _friendly(err: ValidationError, source: str, kind: str | None) -> ConfigError:
    """Rewrite pydantic's errors as one message per bad key, with the nearest valid key for typos."""
    root = RECIPE_KINDS.get(kind or "")
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        if root is not None and loc and loc[0] == kind:  # discriminated-union tag
            loc = loc[1:]
        path = ".".join(str(p) for p in loc) or "<root>"
        if e["type"] == "extra_forbidden":
            parent = _model_at(root, loc[:-1]) if root else None
            valid = sorted(parent.model_fields) if parent else []
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            prefix = ".".join(str(p) for p in loc[:-1])
            hint = f" Did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else ""
            where = f" under '{prefix}'" if prefix else ""
            lines.append(f"unknown key '{path}'.{hint} Valid keys{where}: {', '.join(valid)}")
        elif e["type"] == "missing":
            lines.append(f"missing required key '{path}'")
        elif e["type"] in ("union_tag_invalid", "union_tag_not_found"):
            lines.append(f"'kind' must be one of {', '.join(RECIPE_KINDS)} (got {kind!r})")
        elif e["type"] == "value_error" and (not loc or isinstance(e.get("input"), dict)):  # a section's rule
            lines.append(("" if not loc else f"'{path}': ") + e["msg"].removeprefix("Value error, "))
        else:
            lines.append(f"'{path}': {e['msg']} (got {e.get('input')!r})")
    text = f"invalid recipe {source}:\n  - " + "\n  - ".join(lines)
    return ConfigError(re.sub(r"(\w+://)[^/@\s'\"]*@", r"\1***@", text))  # a URL's credentials are never echoed


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None,
                expect: str | None = None) -> PretrainRecipe | FinetuneRecipe:
    """Load a YAML recipe, apply `key=value` overrides and validate it.

    Args:
        path: the YAML file.
        overrides: `["optim.lr=1e-4", "trainer.max_steps=50"]`.
        expect: the `kind` the calling verb runs; a recipe of another kind is an error.
    Raises:
        ConfigError naming the file, the key and the fix.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read recipe {path}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a YAML mapping, got {type(data).__name__}")
    data = apply_overrides(data, list(overrides or []))
    kind = data.get("kind")
    if expect is not None and kind != expect:
        raise ConfigError(f"recipe {path} has kind {kind!r}, but this command runs kind {expect!r} recipes "
                          f"(use `medfound {kind}` for it)" if kind in RECIPE_KINDS else
                          f"recipe {path} must set kind: {expect}")
    try:
        return RECIPE_ADAPTER.validate_python(data)
    except ValidationError as e:
        source = str(path) + (f" with overrides {' '.join(overrides)}" if overrides else "")
        raise _friendly(e, source, kind) from None


def dump_recipe(recipe: BaseModel, header: str = "") -> str:
    """The resolved recipe as YAML (paths as strings, tuples as lists), with an optional comment header."""
    body = yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
    lines = "".join(f"# {h}\n" for h in header.splitlines()) if header else ""
    return lines + body
