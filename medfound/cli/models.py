"""Verbs on trained models: `import`, `evaluate`, `publish`, `card check|push`, `predict`, `prompt`, `bench`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from medfound.bench.runner import run_bench as bench
from medfound.cli.common import print_push, torch_stack
from medfound.config.eval import EVALUATE_DATA_KEYS, EVALUATE_SCALE_KEYS, EvalConfig
from medfound.data.manifest import MODALITIES
from medfound.predict import predict
from medfound.publish.check import check_card
from medfound.publish.hub import push_folder
from medfound.registry import IMPORT_FORMATS
from medfound.run import read_run

# Loaded by torch-free commands (`medfound ls`, `validate`, `--help`): medfound modules that bring in torch or
# numpy are imported inside the functions that need them (tests/test_layering.py keeps it so).

MODALITY_CHOICES = [m for m in MODALITIES if m not in ("other", "mixed")]


def box(value: str) -> list[float]:
    return [float(x) for x in value.split(",")]


def add(sub, argv: list[str]) -> None:
    for adder in (add_import, add_evaluate, add_publish, add_card, add_predict, add_prompt, add_bench):
        adder(sub)


def add_import(sub) -> None:
    s = sub.add_parser("import", help="RETFound / MAE / UNI / DINOv2 / DINOv3 / timm weights -> a timm backbone "
                                      "export")
    s.add_argument("source", help="checkpoint file (.pth, .bin, .safetensors) or a timm/HF folder")
    s.add_argument("--format", required=True, choices=IMPORT_FORMATS.names(),
                   help="; ".join(f"{e.name}: {e.description}" for e in IMPORT_FORMATS))
    s.add_argument("--out", required=True)
    s.add_argument("--model", help="timm architecture (default: inferred from the weights for ViTs)")
    s.add_argument("--model-args", type=json.loads, help='JSON timm arguments, e.g. \'{"num_heads": 16}\'')
    s.add_argument("--img-size", type=int, help="resample position embeddings to this input size")
    s.add_argument("--license", default="other", help="licence of the imported weights (for the card)")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(run=run_import)


def add_evaluate(sub) -> None:
    s = sub.add_parser("evaluate", help="score a fine-tuned run's export -> RUN_DIR/eval.json + report/",
                       epilog="key=value overrides it accepts: "
                              + ", ".join(f"eval.{k}" for k in EvalConfig.model_fields) + ", trainer.progress, "
                              + ", ".join(f"data.{k}" for k in EVALUATE_DATA_KEYS) + "; and for segmentation "
                              "models, resampling the external sets only (the internal split is scored as "
                              "trained): " + ", ".join(f"segment.{k}" for k in EVALUATE_SCALE_KEYS) + ".")
    s.add_argument("run_dir")
    s.add_argument("external", nargs="*", help="external-site shard sets scored beside the internal split "
                                               "(default: the recipe's eval.external), and key=value overrides "
                                               "(listed below), e.g. eval.bootstrap=200 segment.scale=0.5")
    s.add_argument("--split", help="split to evaluate (default: the recipe's eval.split)")
    s.add_argument("--out", help="folder for eval.json, predictions.csv and report/ (default: RUN_DIR; required "
                                 "for a published folder); a new folder, or one of yours without those names")
    s.add_argument("--overwrite", action="store_true",
                   help="replace an earlier evaluation in --out (only the files it wrote; your own files stay)")
    s.add_argument("--strict-scale", action="store_true",
                   help="stop (before any scoring) when an external set's scale differs from the training data's "
                        "beyond the tolerance, instead of a warning (eval.strict_scale=true)")
    s.set_defaults(run=run_evaluate, takes_rest=True)


def add_publish(sub) -> None:
    s = sub.add_parser("publish", help="RUN_DIR -> Hugging Face-style folder with model card")
    s.add_argument("run_dir")
    s.add_argument("--out", required=True)
    s.add_argument("--name", help="model name in the card (default: the --out folder name)")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--push", metavar="REPO_ID", help="then upload the folder to this Hugging Face Hub repo")
    s.add_argument("--dry-run", action="store_true", help="list what --push would upload; no network")
    s.add_argument("--private", action="store_true", help="create the Hub repo as private")
    s.add_argument("--base-model", metavar="REPO_ID", help="the Hub id of the backbone the run started from (card "
                                                           "metadata base_model, the LoRA adapter's base; default: "
                                                           "the recipe's card.base_model)")
    s.add_argument("--license", help="the licence to publish under (default: the recipe's card.license, else the most "
                                     "restrictive licence of the training data and imported weights); one less "
                                     "restrictive than those is refused without --rights-cleared")
    s.add_argument("--rights-cleared", metavar="REASON",
                   help="you hold the rights to publish under --license although the data or weights it was made "
                        "from are more restrictive: say who granted them and when; printed in the card")
    s.set_defaults(run=run_publish)


def add_card(sub) -> None:
    s = sub.add_parser("card", help="check or push a published folder")
    card = s.add_subparsers(dest="card_verb", required=True)
    c = card.add_parser("check", help="verify the card's numbers against eval.json and its weight hashes")
    c.add_argument("dir")
    c = card.add_parser("push", help="upload a published folder (after the check) to the Hugging Face Hub")
    c.add_argument("dir")
    c.add_argument("--repo", help="Hub repo id, e.g. my-org/retina-vit (needed unless --dry-run)")
    c.add_argument("--dry-run", action="store_true")
    c.add_argument("--private", action="store_true")
    s.set_defaults(run=run_card)


def add_predict(sub) -> None:
    s = sub.add_parser("predict", help="a trained model (run or published folder) on new studies: images, DICOM "
                                       "files or folders, or a shard set -> predictions.csv")
    s.add_argument("model", help="a run directory or a published folder")
    s.add_argument("inputs", nargs="+", metavar="INPUT", help="image files (PNG, JPEG, TIFF), NIfTI/NRRD volumes, "
                                                             "whole-slide images (MIL models), DICOM files or "
                                                             "folders, or one shard set")
    s.add_argument("--out", required=True, help="a new folder for predictions.csv and summary.json")
    s.add_argument("--overwrite", action="store_true", help="replace an earlier prediction in --out")
    s.add_argument("--batch-size", type=int, help="images per forward pass (default: the recipe's data.eval_batch_size)")
    s.add_argument("--device", help="cpu, cuda or cuda:N (default: the first GPU when there is one)")
    s.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 autocast on a GPU, fp32 on the CPU")
    s.add_argument("--num-workers", type=int, help="DataLoader workers decoding inputs (default: the recipe's)")
    g = s.add_argument_group("box-prompt models")
    g.add_argument("--box", action="append", type=box, help="x0,y0,x1,y1 in image pixels, the same on every image; "
                                                            "repeat for several structures (one mask each)")
    g.add_argument("--boxes", metavar="TABLE.csv", help="one row per structure, columns input,x0,y0,x1,y1 (input: a "
                                                        "path as given, or its file name)")
    g.add_argument("--box-format", choices=["xyxy", "xywh"], help="xyxy corners (default) or COCO's x,y,w,h")
    g.add_argument("--threshold", type=float, help="mask probability threshold (default 0.5)")
    g.add_argument("--modality", choices=MODALITY_CHOICES,
                   help="the images' modality, warned about when the model was not trained on it")
    g = s.add_argument_group("MIL models")
    g.add_argument("--backbone", metavar="DIR", help="the tile backbone (export folder) the head was trained on, "
                                                     "where its recorded path is not on this machine")
    g = s.add_argument_group("segmentation models")
    g.add_argument("--save-probabilities", action="store_true", help="also write each input's class probabilities "
                                                                     "on its grid (probabilities/KEY.npz, float16, "
                                                                     "nnU-Net's)")
    g.add_argument("--mask-format", choices=["auto", "png", "dicom-seg"], help="masks of DICOM inputs: a DICOM SEG "
                                                                            "referencing each source (auto, the "
                                                                            "default) or PNG")
    g.add_argument("--anonymous", action="store_true", help="never write DICOM SEG (it carries the source's patient "
                                                            "and study attributes): PNG / NIfTI only")
    g.add_argument("--overlay", action="store_true", help="2-D: also write overlays/KEY.png, the mask painted over "
                                                          "the image")
    g.add_argument("--scale", metavar="auto|auto-image|FACTOR",
                   help="2-D: resize the inputs by FACTOR, or `auto` (label-free, for images from another camera or "
                        "resolution): each input's reading of the factor that gives its structures the training "
                        "images' calibre, and all inputs segmented at the median of their readings (one camera) "
                        "(recorded as scale_factor_image and scale_factor); `auto-image`: each input at its own "
                        "reading (inputs that mix cameras)")
    s.set_defaults(run=run_predict)


def add_prompt(sub) -> None:
    s = sub.add_parser("prompt", help="segment the structures inside boxes with a box-prompt (MedSAM) run")
    s.add_argument("run_dir", help="a run of a head.type=box_prompt recipe (e.g. adapt/medsam.yaml)")
    s.add_argument("image", help="an image file (PNG, JPEG, TIFF)")
    s.add_argument("--box", action="append", required=True, type=box,
                   help="x0,y0,x1,y1 in image pixels (or x,y,w,h with --box-format xywh); repeat for several "
                        "structures (one mask each)")
    s.add_argument("--box-format", choices=["xyxy", "xywh"], default="xyxy",
                   help="xyxy: corners x0,y0,x1,y1 (default); xywh: COCO's x,y,width,height")
    s.add_argument("--out", required=True, help="folder for mask_<i>.png (0/255) and overlay.png")
    s.add_argument("--threshold", type=float, default=0.5,
                   help="a pixel is in the mask when its predicted probability exceeds this (default 0.5); lower "
                        "it for faint or thin structures, raise it when masks spill outside the structure")
    s.add_argument("--modality", choices=MODALITY_CHOICES,
                   help="the image's modality; warned about when the run was not trained on it")
    s.set_defaults(run=run_prompt)


def add_bench(sub) -> None:
    s = sub.add_parser("bench", help="score backbones side by side: k-NN, linear probe, few-shot and fine-tuning at "
                                     "label fractions, with paired differences (medfound/bench)")
    s.add_argument("backbones", nargs="+", metavar="BACKBONE",
                   help="[LABEL=]SPEC: a run's export/, an imported or published timm folder, timm:NAME (random "
                        "init) or timm:same-as:FOLDER (an export's architecture, random weights)")
    s.add_argument("--suite", help="a suite YAML, or a shipped suite's name (quick, medmnist)")
    s.add_argument("--quick", action="store_true", help="the quick suite on the bundled demo sets (= --suite quick)")
    s.add_argument("--out", required=True, help="a new folder for results.csv/json, paired.csv, leaderboard.md and "
                                                "plots; a folder an earlier bench wrote is continued")
    s.add_argument("--cache", help="the feature cache (default: OUT/features); share it between benches")
    s.set_defaults(run=run_bench)


def run_import(args: argparse.Namespace, command: str) -> int:
    torch_stack()
    from medfound.importing import import_checkpoint

    r = import_checkpoint(args.source, args.format, args.out, model=args.model, model_args=args.model_args,
                          img_size=args.img_size, license=args.license, overwrite=args.overwrite)
    print(f"imported {args.source} as {r['architecture']} ({r['params']:,} parameters) into {r['out']}"
          + (f"; MAE decoder kept ({r['mae_decoder']})" if r["mae_decoder"] else "")
          + (f"; DINO heads kept ({r['dino_heads']['out_dim']} prototypes)" if r.get("dino_heads") else "")
          + (f"; dropped {len(r['dropped'])} non-backbone keys: {', '.join(r['dropped'][:6])}" if r["dropped"] else "")
          + "".join(f"\nnote: {n}" for n in r.get("notes", [])))
    return 0


def run_evaluate(args: argparse.Namespace, command: str) -> int:
    import re

    torch_stack()
    from medfound import workflows

    is_key = re.compile(r"^[a-z_]+(\.[a-z_0-9]+)+=")  # key=value overrides among the external sets
    overrides = [a for a in args.external if is_key.match(a)] + (["eval.strict_scale=true"] if args.strict_scale
                                                                  else [])
    external = [a for a in args.external if not is_key.match(a)]
    report = workflows.evaluate(args.run_dir, args.split, external=external or None, out=args.out,
                                overrides=overrides, overwrite=args.overwrite)
    print(json.dumps(report["metrics"], indent=2))
    for e in report.get("external", []):
        print(f"external {e['name']} ({e['num_samples']}): " + json.dumps(e["metrics"]))
    dest = Path(args.out or args.run_dir)
    print(f"wrote {dest / 'eval.json'}" + (f" and {dest / 'report' / 'report.md'}" if (dest / "report").is_dir()
                                           else ""))
    return 0


def run_publish(args: argparse.Namespace, command: str) -> int:
    torch_stack()
    from medfound import workflows

    result = workflows.publish(args.run_dir, args.out, overwrite=args.overwrite, name=args.name,
                               push=args.push, dry_run=args.dry_run, private=args.private,
                               base_model=args.base_model, license=args.license, rights=args.rights_cleared)
    print(f"published {result['out']} under licence {result['license']}: {', '.join(result['files'])}"
          + (f" (timm reload reproduces the trained model: max abs diff {result['reload_max_abs_diff']})"
             if "reload_max_abs_diff" in result else "") + "; card checked against the folder")
    if "push" in result:
        print_push(result["push"])
    return 0


def run_card(args: argparse.Namespace, command: str) -> int:
    torch_stack()
    if args.card_verb == "push":
        print_push(push_folder(args.dir, args.repo, dry_run=args.dry_run, private=args.private))
        return 0

    problems = check_card(args.dir)
    for p in problems:
        print(f"MISMATCH: {p}", file=sys.stderr)
    if problems:
        print(f"{args.dir}: the card does not match its folder ({len(problems)} problems)", file=sys.stderr)
        return 1
    checked = "weights' sha256, preprocessing" + (", eval.json" if (Path(args.dir) / "eval.json").is_file() else "")
    print(f"{args.dir}: the card matches its folder ({checked})")
    return 0


def run_predict(args: argparse.Namespace, command: str) -> int:
    torch_stack()

    done = predict(args.model, args.inputs, args.out, overwrite=args.overwrite, batch_size=args.batch_size,
                   boxes=args.box, box_table=args.boxes, box_format=args.box_format, threshold=args.threshold,
                   modality=args.modality, backbone=args.backbone, save_probabilities=args.save_probabilities,
                   overlay=args.overlay, mask_format=args.mask_format, anonymous=args.anonymous,
                   device=args.device, precision=args.precision, num_workers=args.num_workers,
                   scale=args.scale)
    if not done["main"]:  # other ranks under torchrun: rank 0 reports
        return 0
    print(f"{len(done['rows'])} rows in predictions.csv" +
          (f" ({done['reused']} inputs kept from the earlier prediction)" if done["reused"] else "") +
          (f"; {len(done['skipped'])} inputs skipped (by index; names are not printed):" if done["skipped"]
           else ""))
    for ref, reason in done["skipped"]:
        print(f"  {ref}: {reason}")
    for path in done["written"]:
        print(f"  {path}")
    return 0


def run_prompt(args: argparse.Namespace, command: str) -> int:
    torch_stack()
    from medfound import workflows
    from medfound.adapt.prompt import segment_boxes
    from medfound.evaluate.records import trained_modalities
    from medfound.tasks import task_for

    run = read_run(args.run_dir)
    if "boxes" not in getattr(task_for(run.recipe), "predict_options", ()):  # a kind that takes box prompts
        raise ValueError(f"{args.run_dir} is not a box-prompt run (head.type=box_prompt)")
    predictor = workflows.load(args.run_dir)
    paths, warnings = segment_boxes(predictor, args.image, args.box, args.out, threshold=args.threshold,
                                    box_format=args.box_format, modalities=trained_modalities(run.export),
                                    modality=args.modality)
    for path in paths:
        print(f"wrote {path}")
    for w in warnings:
        print(f"medfound prompt: warning: {w}", file=sys.stderr)
    return 0


def run_bench(args: argparse.Namespace, command: str) -> int:
    torch_stack()

    if (args.suite is None) == (not args.quick):
        raise ValueError("give --suite SUITE (a YAML or a shipped suite's name) or --quick")
    done = bench(args.backbones, args.suite or "quick", args.out, cache=args.cache)
    print(f"{len(done['results'])} results, {len(done['paired'])} paired differences:")
    for path in done["written"]:
        print(f"  {path}")
    return 0
