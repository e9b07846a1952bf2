"""`medfound` command line: thin argument parsing over `medfound.workflows`, one module per verb group.

    medfound demo [--out DIR] [--quick]              the whole pipeline on the bundled sample archive
    medfound shard KIND INPUT --out DIR [options]    raw archive -> WebDataset shards + manifest.json
                                                     (`medfound shard KIND --help`: that kind's options)
    medfound inspect SHARDS [SHARDS ...]             summary + verify every shard's checksum
    medfound ls [recipes|heads|objectives|...]       what is shipped and registered, one line each
    medfound cp RECIPE DEST                          copy a shipped recipe to edit
    medfound validate RECIPE [key=value ...] [--print]  check a recipe without running it (--print: resolved)
    medfound pretrain RECIPE [key=value ...]         self-supervised pretraining -> RUN_DIR/export
    medfound finetune RECIPE [key=value ...]         LoRA / full / linear-probe fine-tuning -> export + eval.json
    medfound plan SHARDS --out RECIPE                nnU-Net-style segmentation recipe from a data fingerprint
    medfound extract TILE_SHARDS --backbone DIR --out BAGS   WSI tiles -> per-slide MIL bags
    medfound import SOURCE --format F --out DIR      RETFound/MAE/UNI/DINOv2/DINOv3/timm weights -> timm export
    medfound evaluate RUN_OR_MODEL [EXTERNAL ...]    eval.json, predictions.csv, report/report.md (--out DIR)
    medfound publish RUN_DIR --out DIR [--push ID]   Hugging Face-style folder with a model card (+ upload)
    medfound predict MODEL INPUT... --out DIR        a trained model on new images / DICOM / volumes / slides
    medfound prompt RUN IMAGE --box ... --out DIR    box-prompt segmentation of one image
    medfound bench BACKBONE... --suite S --out DIR   backbones side by side: k-NN, probes, few-shot, fine-tuning
    medfound card check|push DIR                     verify a card against its folder / upload it to the Hub

The verbs live in `cli/recipes.py` (validate, ls, cp: torch-free), `cli/train.py` (demo, pretrain, finetune),
`cli/data.py` (shard, inspect, plan, extract) and `cli/models.py` (import, evaluate, publish, card, predict,
prompt, bench); each adds its parsers with `add(sub, argv)` and runs through the `run` default it sets. Heavy
libraries (torch, timm) are imported only by the verbs that need them, so a recipe typo is reported in well under a
second.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import traceback
from typing import Optional

from medfound import __version__
from medfound.cli import data, models, recipes, train
from medfound.cli.common import is_input_error, one_line
from medfound.config import ConfigError
from medfound.process import end_group


def build_parser(argv: Optional[list[str]] = None) -> argparse.ArgumentParser:
    """The parser of every verb (`argv`: what is parsed, so a verb group builds only what it needs)."""
    p = argparse.ArgumentParser(prog="medfound", description="Medical-imaging foundation models on timm backbones.")
    p.add_argument("--version", action="version", version=f"medfound {__version__}")
    p.add_argument("--traceback", action="store_true", help="show the full traceback on errors")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    for group in (train, data, recipes, models):
        group.add(sub, argv or [])
    return p


def main(argv: Optional[list[str]] = None) -> int:
    code = 1
    try:
        code = _main(argv)
        return code
    finally:
        end_group(code == 0)  # a torchrun verb's gloo group is closed before exit (an open one can abort the process)


def _main(argv: Optional[list[str]]) -> int:
    given = list(argv if argv is not None else sys.argv[1:])
    parser = build_parser(given)
    args, rest = parser.parse_known_args(given)
    if rest:  # `medfound evaluate RUN --out DIR eval.bootstrap=200`: key=value overrides may follow the options
        if getattr(args, "takes_rest", False) and all("=" in r and not r.startswith("-") for r in rest):
            args.external += rest
        else:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
    command = "medfound " + " ".join(shlex.quote(a) for a in given)
    args.main = main  # a verb that runs other verbs (the demo) calls the CLI itself
    try:
        return args.run(args, command)
    except KeyboardInterrupt:  # Ctrl-C: one line, and an exit code the demo (and shells) read as "stopped"
        print(f"medfound {args.verb}: interrupted; what was written before is intact (runs continue with "
              "trainer.resume=auto, ingests with --resume)", file=sys.stderr)
        return 130
    except ConfigError as e:
        print(f"medfound {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, ValueError, ImportError, RuntimeError, TypeError,
            FloatingPointError, KeyError, ConnectionError, OSError) as e:
        if args.traceback:
            traceback.print_exc()
        print(f"medfound {args.verb}: error: {one_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # a library's own error on bad input (unpickling, safetensors header, tar)
        if args.traceback or not is_input_error(e):
            raise
        print(f"medfound {args.verb}: error: {one_line(e)} (--traceback shows where)", file=sys.stderr)
        return 1
