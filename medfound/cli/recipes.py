"""Verbs on recipes and the registries, torch-free: `validate`, `ls`, `cp`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medfound import __version__
from medfound.config import ConfigError, TASK_KEYS, derive, dump_recipe, find_recipe, list_recipes, load_recipe
from medfound.data.location import is_url
from medfound.data.samples import demo_set_command
from medfound.io import atomic_write_text
from medfound.registry import (BENCH_PROTOCOLS, EXPORT_FORMATS, HEADS, IMPORT_FORMATS, INGEST_KINDS, METRICS,
                               OBJECTIVES, TUNINGS)

LISTS = (("heads", "heads (head.type)", HEADS), ("objectives", "objectives (objective.name)", OBJECTIVES),
         ("tunings", "tunings (tuning)", TUNINGS), ("ingest", "ingest kinds (medfound shard KIND)", INGEST_KINDS),
         ("formats", "checkpoint formats (medfound import --format)", IMPORT_FORMATS),
         ("exports", "export formats (a task kind's export_format, or its head's)", EXPORT_FORMATS),
         ("metrics", "metrics", METRICS),
         ("protocols", "bench protocols (medfound bench, suite protocols[].name)", BENCH_PROTOCOLS))
# the modules whose import registers a list's entries (torch-free)
REGISTERING = {"ingest": "medfound.data.ingest", "metrics": "medfound.evaluate.definitions",
               "protocols": "medfound.bench.suite", "exports": "medfound.publish.formats"}


def add(sub, argv: list[str]) -> None:
    s = sub.add_parser("validate", help="check a recipe without running it")
    recipe_arguments(s)
    s.add_argument("--no-paths", action="store_true",
                   help="check the schema only, not that the shard sets, weights and files it names exist")
    s.add_argument("--print", action="store_true", dest="print_recipe",
                   help="print the resolved recipe (every default spelled out, the task kind, and the values "
                        "derived at run start for one process)")
    s.set_defaults(run=run_validate)
    s = sub.add_parser("ls", help="list shipped recipes and registered heads, objectives, tunings, ingest kinds, "
                                  "checkpoint and export formats, metrics, tasks")
    s.add_argument("what", nargs="?", default="all", choices=["all", "recipes", *(k for k, _, _ in LISTS), "tasks"])
    s.set_defaults(run=lambda args, command: print("\n".join(listing(args.what))) or 0)
    s = sub.add_parser("cp", help="copy a shipped recipe (a name from `medfound ls recipes`) to edit it")
    s.add_argument("recipe", help="a recipe name, e.g. demo_mae_tiny or medsam")
    s.add_argument("dest", help="the file (or folder) to write; an existing file is never replaced")
    s.set_defaults(run=run_cp)


def recipe_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("recipe", help="a recipe YAML path, or a recipe name from pretrain/ or adapt/")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. optim.lr=1e-4 trainer.max_steps=50")


def load(args: argparse.Namespace, kind: str | None):
    """(path, recipe) of `args.recipe` with its overrides; `kind` (pretrain / finetune) picks the shipped folder."""
    folder = "adapt" if kind == "finetune" else "pretrain"
    try:
        path = find_recipe(args.recipe, folder)
    except ConfigError:
        if kind is not None:
            raise
        path = find_recipe(args.recipe, "adapt")
    return path, load_recipe(path, args.overrides, expect=kind)


def run_validate(args: argparse.Namespace, command: str) -> int:
    path, recipe = load(args, None)
    missing = [] if args.no_paths else missing_paths(recipe)
    if args.print_recipe:
        print_resolved(recipe)
    if missing:
        print(f"{path}: the schema is valid, but {len(missing)} path(s) do not exist:", file=sys.stderr)
        for line in missing:
            print(f"  - {line}", file=sys.stderr)
        print("  (relative paths are read from the current directory; --no-paths checks the schema only)",
              file=sys.stderr)
        return 1
    if not args.print_recipe:
        print(f"{path}: valid {recipe.kind} recipe ({recipe.task})"
              + ("" if args.no_paths else "; every path it names exists"))
    return 0


def run_cp(args: argparse.Namespace, command: str) -> int:
    target = copy_recipe(args.recipe, args.dest)
    print(f"wrote {target}: edit it, then `medfound validate {target}`")
    return 0


def listing(what: str) -> list[str]:
    """`medfound ls`: one line per shipped recipe or registered component."""
    import importlib

    lines: list[str] = []
    if what in ("all", "recipes"):
        for folder, recipes in list_recipes().items():
            lines.append(f"recipes ({folder}/):")
            lines += [f"  {name:28s} {first}" for name, _, first in recipes]
    for key, title, reg in LISTS:
        if what in ("all", key):
            if key in REGISTERING:
                importlib.import_module(REGISTERING[key])
            lines.append(f"{title}:")
            lines += [f"  {e.name:28s} {e.description}" + (f" [task: {e.config.task}]" if key == "heads" else "")
                      for e in reg]
    if what in ("all", "tasks"):
        lines.append("tasks (recipe.task; chosen by the head):")
        lines += [f"  {k.name:28s} {k.runs}: reads data.{{{', '.join(sorted(k.data))}}}" for k in TASK_KEYS.values()]
    return lines


def copy_recipe(name: str, dest: str) -> Path:
    """`medfound cp`: a shipped recipe -> DEST (a file, or a folder to put NAME.yaml in); never replaces a file."""

    found = [p for recipes in list_recipes().values() for n, p, _ in recipes if n == Path(name).stem]
    if not found:
        raise ConfigError(f"no shipped recipe named {name!r}: `medfound ls recipes` lists them")
    target = Path(dest)
    if target.is_dir():
        target = target / found[0].name
    if target.exists():
        raise FileExistsError(f"{target} exists; choose another destination (medfound cp never replaces a file)")
    atomic_write_text(target, found[0].read_text())
    return target


def missing_paths(recipe) -> list[str]:
    """What the recipe names that does not exist (local paths only; URLs are checked when the run reads them),
    each with the command that makes it."""

    out = []
    head = getattr(recipe, "head", None)  # pretraining recipes have none
    mil = head is not None and type(head).backbone == "bags"  # the head reads a bag folder, not a shard set
    want = "bags.json" if mil else "manifest.json"
    for i, shards in enumerate(recipe.data.shards):
        if not is_url(shards) and not (Path(shards) / want).is_file():
            demo = None if mil else demo_set_command(Path(shards))
            make = (f"a demo set: `medfound demo` makes it, or `{demo}`" if demo else
                    ("`medfound extract TILE_SHARDS --backbone EXPORT --out " if mil else
                     "`medfound shard KIND INPUT --out ") + f"{shards}` makes it")
            out.append(f"data.shards[{i}]: {shards} holds no {want} ({make})")
    for i, ext in enumerate(getattr(getattr(recipe, "eval", None), "external", []) or []):
        if not is_url(ext) and not (Path(ext) / want).is_file():
            out.append(f"eval.external[{i}]: {ext} holds no {want}")
    backbone = getattr(recipe, "backbone", None)
    if backbone is not None and backbone.weights is not None and not (Path(backbone.weights) / "config.json").is_file():
        out.append(f"backbone.weights: {backbone.weights} holds no config.json (a run's export: `medfound pretrain "
                   f"RECIPE` writes RUN_DIR/export; `medfound import` converts published weights)")
    ds = recipe.trainer.deepspeed_config
    if ds is not None and not Path(ds).is_file():
        out.append(f"trainer.deepspeed_config: {ds} does not exist")
    return out


def print_resolved(recipe) -> None:
    """`validate --print`: the recipe with every default, its task, and the values derived at start (1 process)."""

    if recipe.derived is None:
        recipe = recipe.model_copy(update={"derived": derive(recipe, 1, __version__)})
    print(dump_recipe(recipe, header=f"task: {recipe.task}\nderived: for 1 process (world_size x batch scales the "
                                     "lr of optim.blr recipes)"), end="")
