"""Verbs that train: `demo` (the whole pipeline on the bundled sample archive), `pretrain`, `finetune`."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from medfound import demo
from medfound.cli.common import torch_stack
from medfound.cli.recipes import load, recipe_arguments

# Loaded by torch-free commands (`medfound ls`, `validate`, `--help`): medfound modules that bring in torch or
# numpy are imported inside the functions that need them (tests/test_layering.py keeps it so).


def add(sub, argv: list[str]) -> None:
    s = sub.add_parser("demo", help="the whole pipeline on the bundled sample archive (as `make demo`)")
    s.add_argument("--out", default="runs/demo", help="folder for everything the demo writes (default: runs/demo)")
    s.add_argument("--quick", action="store_true", help="a few optimizer steps per stage (a smoke test, ~1 min)")
    s.add_argument("--overwrite", action="store_true", help="replace an earlier demo folder at --out")
    s.set_defaults(run=run_demo)
    for verb, text in (("pretrain", "self-supervised pretraining"),
                       ("finetune", "fine-tune a backbone on a labelled shard set")):
        s = sub.add_parser(verb, help=text)
        recipe_arguments(s)
        s.set_defaults(run=run_train)


def run_train(args: argparse.Namespace, command: str) -> int:
    recipe = load(args, args.verb)[1]  # fail fast on typos, before torch is imported
    torch_stack()
    from medfound import workflows

    report(workflows.train(recipe, command), args.verb)
    return 0


def run_demo(args: argparse.Namespace, command: str) -> int:
    """`medfound demo`: the CLI's own verbs, one after the other, on the bundled sample archive."""

    main = args.main  # the CLI itself: the demo runs its own verbs
    out = Path(args.out)
    data = demo.sample_data()
    demo.prepare_out(out, args.overwrite)
    steps = demo.demo_steps(out, data, quick=args.quick)
    torch_stack()  # before step 1: a broken torch install is named at once, not after the sharding
    for i, (title, commands, produces) in enumerate(steps, 1):
        print(f"== {i}/{len(steps)} {title} ==", flush=True)
        for argv in commands:
            print("medfound " + " ".join(shlex.quote(a) for a in argv), flush=True)
            rc = main(argv)
            if rc:
                print(f"medfound demo: step {i} failed (exit {rc}); the folder {out} keeps what was written",
                      file=sys.stderr)
                return rc
        why = demo.unfinished(produces)
        if why:  # e.g. SIGTERM during pretraining: the run checkpointed and exited 0, but has no export
            print(f"medfound demo: step {i} ({title}) did not finish: {why}. The demo stops here", file=sys.stderr)
            return 1
    print("\n" + demo.outputs(out))
    return 0


def report(summary: dict, verb: str) -> None:
    """What a training verb prints at the end (rank 0 only)."""
    if not summary.get("main", True):
        return  # other ranks of a multi-process run stay quiet
    if summary.get("preempted"):
        print(f"stopped by SIGTERM at step {summary['step']}: resume with trainer.resume=auto")
        return
    print(f"{verb} finished at step {summary['step']}; run directory {summary['run_dir']}")
    if "export" in summary:
        check = f" (timm reload max abs diff {summary['reload_max_abs_diff']})" if "reload_max_abs_diff" in summary else ""
        print(f"  export: {summary['export']}{check}")
    if summary.get("monitor"):
        m = summary["monitor"]
        look = (f"exported look, step {summary['monitor_step']}" if summary.get("monitor_step") is not None
                and summary["monitor_step"] != summary["step"] else "last look")
        print(f"  monitor ({look}): k-NN auroc {m.get('knn_auroc', 'n/a')}, accuracy {m.get('knn_accuracy')}, "
              f"feature std {m.get('feature_std')}, effective rank {m.get('effective_rank')}"
              + ("  COLLAPSED" if m.get("collapsed") else ""))
    if "selected_step" in summary:
        print(f"  selected: step {summary['selected_step']} (eval.select on the validation split; RUN_DIR/selection)")
    if "eval" in summary:
        print(f"  eval: {json.dumps(summary['eval'])} -> {summary['eval_file']}")
