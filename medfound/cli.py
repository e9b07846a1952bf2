"""`medfound` command line: thin argument parsing over `medfound.workflows`.

    medfound demo [--out DIR] [--quick]              the whole pipeline on the bundled sample archive
    medfound shard KIND INPUT --out DIR [options]    raw archive -> WebDataset shards + manifest.json
    medfound inspect SHARDS [SHARDS ...]             summary + verify every shard's checksum
    medfound ls [recipes|heads|objectives|tunings|ingest|tasks]   what is shipped and registered, one line each
    medfound cp RECIPE DEST                          copy a shipped recipe to edit
    medfound validate RECIPE [key=value ...] [--print]  check a recipe without running it (--print: resolved)
    medfound pretrain RECIPE [key=value ...]         self-supervised pretraining -> RUN_DIR/export
    medfound finetune RECIPE [key=value ...]         LoRA / full / linear-probe fine-tuning -> export + eval.json
    medfound plan SHARDS --out RECIPE                nnU-Net-style segmentation recipe from a data fingerprint
    medfound import SOURCE --format F --out DIR      RETFound/MAE/UNI/DINOv2/timm weights -> timm export
    medfound evaluate RUN_OR_MODEL [EXTERNAL ...]    eval.json, predictions.csv, report/report.md (--out DIR)
    medfound publish RUN_DIR --out DIR [--push ID]   Hugging Face-style folder with a model card (+ upload)
    medfound predict MODEL INPUT... --out DIR        a trained model on new images / DICOM / volumes (box prompts:
                                                     --box or --boxes) -> predictions.csv, masks/
    medfound bench BACKBONE... --suite S --out DIR   backbones side by side: k-NN, probes, few-shot, fine-tuning
    medfound card check DIR                          verify a card's numbers and hashes against its folder
    medfound card push DIR --repo ID [--dry-run]     upload a checked folder to the Hugging Face Hub

Heavy libraries (torch, timm) are imported only by the verbs that need them, so a recipe typo is
reported in well under a second.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import traceback
from pathlib import Path
from typing import Optional

from medfound import __version__
from medfound.config import ConfigError, find_recipe, load_recipe
from medfound.data.manifest import MODALITIES
from medfound.process import end_group
from medfound.registry import (BENCH_PROTOCOLS, EXPORT_FORMATS, HEADS, IMPORT_FORMATS, INGEST_KINDS, METRICS,
                               OBJECTIVES, TUNINGS)


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _fractions(value: str) -> dict[str, float]:
    out = {}
    for part in _csv(value):
        k, _, v = part.partition("=")
        try:
            out[k] = float(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--split-fractions expects name=fraction pairs, got {part!r}") from None
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medfound", description="Medical-imaging foundation models on timm backbones.")
    p.add_argument("--version", action="version", version=f"medfound {__version__}")
    p.add_argument("--traceback", action="store_true", help="show the full traceback on errors")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    s = sub.add_parser("demo", help="the whole pipeline on the bundled sample archive (as `make demo`)")
    s.add_argument("--out", default="runs/demo", help="folder for everything the demo writes (default: runs/demo)")
    s.add_argument("--quick", action="store_true", help="a few optimizer steps per stage (a smoke test, ~1 min)")
    s.add_argument("--overwrite", action="store_true", help="replace an earlier demo folder at --out")

    s = sub.add_parser("shard", help="raw archive -> WebDataset shards + manifest.json")
    import medfound.data.ingest  # noqa: F401  (registers the ingest kinds; torch-free)

    s.add_argument("kind", choices=[*INGEST_KINDS.names(), "merge"],
                   help="; ".join(f"{e.name}: {e.description}" for e in INGEST_KINDS)
                   + "; merge: join the part folders written with --part into one shard set")
    s.add_argument("input", nargs="+", help="the archive: .npz file, image folder, DICOM file/folder, slide "
                                            "file/folder, volume folder; for merge: every part folder")
    s.add_argument("--out", required=True, help="output shard-set directory, or an s3:// / gs:// prefix (shards uploaded first, manifest.json last)")
    s.add_argument("--name", help="data set name (default: the --out folder name)")
    s.add_argument("--modality", default="auto",
                   help="fundus, oct, cxr, xray, mammography, ct, mr, us, pathology, other; auto (default): from the "
                        "DICOM tags ('mixed' when several), else other")
    s.add_argument("--site", help="acquisition site for every sample (a CSV site column overrides it)")
    s.add_argument("--label-type", choices=["none", "binary", "multiclass", "ordinal", "multilabel"],
                   help="default: binary for 2 classes, else multiclass; use ordinal for grades")
    s.add_argument("--label-names", type=_csv, help="class names in index order, comma-separated")
    s.add_argument("--license", help="licence of the source data (recorded in the manifest and the card)")
    s.add_argument("--attribution", help="citation / attribution of the source data")
    s.add_argument("--max-count", type=int, default=1000, help="samples per shard (default 1000)")
    s.add_argument("--shard-size-mb", type=float, default=64.0, help="bytes per shard, in MB (default 64)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing shard set (only once complete)")
    s.add_argument("--workers", type=int, default=None,
                   help="processes that decode, de-identify and encode (default: all cores); the shards are "
                        "byte-identical to --workers 1")
    s.add_argument("--resume", action="store_true",
                   help="continue an ingest that was killed or failed: its finished shards (kept in .NAME.partial "
                        "beside --out, checked against their sha256) stay, their inputs are not read again, the "
                        "rest is redone; the result is byte-identical to an uninterrupted run")
    s.add_argument("--part", metavar="I/N", help="ingest part I of N of the sorted inputs (0-based, e.g. a SLURM array "
                                                "task); join the parts with `medfound shard merge PART_DIRS --out DIR`")
    s.add_argument("--keep-names", action="store_true",
                   help="use file/slide names in sample keys (only for public data whose names carry no PHI)")
    s.add_argument("--salt", help="secret for patient tokens and keys (default: derived from the inputs' bytes, "
                                  "never stored); give the same salt to every shard set of one cohort")
    s.add_argument("--skipped-list", metavar="CSV",
                   help="write the skipped inputs' file names (input,path,reason) to this local file, outside --out; "
                        "the console shows only their index in the sorted input list (names can carry PHI)")
    s.add_argument("--allow-burned-in", action="store_true",
                   help="dicom: ingest images that may show PHI in their pixels (BurnedInAnnotation=YES, or "
                        "ultrasound / secondary captures without BurnedInAnnotation=NO); only after cleaning them")
    s.add_argument("--require-spacing", action="store_true",
                   help="dicom: skip images without a pixel spacing (PixelSpacing / ImagerPixelSpacing absent or "
                        "zero), counted with that reason, so every sample can be resampled by data.spacing_mm")
    g = s.add_argument_group("images, dicom, volumes")
    g.add_argument("--table", help="CSV or Parquet. images: path,label|labels[,patient_id,site,split,laterality,view,mask,fov,mask_NAME]; "
                                   "dicom: path,label|labels[,split,site]; wsi: slide,label|labels[,split,site]; "
                                   "volumes: path[,mask,label,patient_id,site,split]")
    g.add_argument("--split-fractions", type=_fractions,
                   help="split by patient when there is no split column, e.g. train=0.8,val=0.1,test=0.1")
    g.add_argument("--fov", choices=["none", "detect", "crop"],
                   help="images (colour fundus): store a detected field-of-view mask, or also crop to it (default none)")
    g.add_argument("--scale", type=float, help="images: resize every image (and its masks, by nearest neighbour) by "
                                               "this factor, e.g. 0.5 to match another set's scale; recorded in the "
                                               "manifest (and --mpp is divided by it)")
    g.add_argument("--fov-diameter", type=int, help="images (fundus, with --fov detect): resize each image so its "
                                                    "field of view is this many px wide (DRIVE: about 540)")
    g.add_argument("--mask-mode", choices=["binary", "semantic", "instance"],
                   help="images: what mask values mean: binary (foreground where > 0, stored 0/255), semantic (class "
                        "indices, at most 255), instance (object ids 1..N, kept at full depth, trained as foreground "
                        "vs background). Needed for 16-bit masks and masks that look like instance labels")
    g.add_argument("--spacing-mm", type=float, help="images (radiographs, mammograms): the images' pixel spacing in "
                                                    "mm, stored per sample for data.spacing_mm (a spacing_mm column "
                                                    "in the --table gives it per image instead)")
    g = s.add_argument_group("volumes")
    g.add_argument("--layout", choices=["volume", "slices", "patches"], help="default volume")
    g.add_argument("--axis", type=int, help="slice axis (default: the one with the coarsest spacing)")
    g.add_argument("--patch", type=lambda v: [int(x) for x in v.split(",")], help="patch size, e.g. 64,64,16")
    g = s.add_argument_group("wsi")
    g.add_argument("--mpp", type=float, help="wsi: target micrometres per pixel of the tiles (default 0.5); images: "
                                             "the images' resolution, recorded in the manifest and the model card")
    g.add_argument("--tile-size", type=int, help="tile side in pixels at --mpp (default 224)")
    g.add_argument("--min-tissue", type=float, help="minimum tissue fraction of a tile (default 0.5)")
    g.add_argument("--slide-mpp", type=float, help="scan resolution for slides without mpp metadata")
    g.add_argument("--split", help="split of tiles from slides without a table row (default train)")
    g.add_argument("--backend", choices=["tiffslide", "openslide"], help="default tiffslide")

    s = sub.add_parser("inspect", help="print a shard set's summary and verify every checksum")
    s.add_argument("shards", nargs="+")

    for verb, text in (("validate", "check a recipe without running it"), ("pretrain", "self-supervised pretraining"),
                       ("finetune", "fine-tune a backbone on a labelled shard set")):
        s = sub.add_parser(verb, help=text)
        s.add_argument("recipe", help="a recipe YAML path, or a recipe name from pretrain/ or adapt/")
        s.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. optim.lr=1e-4 trainer.max_steps=50")
        if verb == "validate":
            s.add_argument("--no-paths", action="store_true",
                           help="check the schema only, not that the shard sets, weights and files it names exist")
            s.add_argument("--print", action="store_true", dest="print_recipe",
                           help="print the resolved recipe (every default spelled out, the task kind, and the values "
                                "derived at run start for one process)")

    s = sub.add_parser("ls", help="list shipped recipes and registered heads, objectives, tunings, ingest kinds, "
                                          "checkpoint and export formats, metrics, tasks")
    s.add_argument("what", nargs="?", default="all",
                   choices=["all", "recipes", "heads", "objectives", "tunings", "ingest", "formats", "exports",
                            "metrics", "protocols", "tasks"])

    s = sub.add_parser("cp", help="copy a shipped recipe (a name from `medfound ls recipes`) to edit it")
    s.add_argument("recipe", help="a recipe name, e.g. demo_mae_tiny or medsam")
    s.add_argument("dest", help="the file (or folder) to write; an existing file is never replaced")

    s = sub.add_parser("import", help="RETFound / MAE / UNI / DINOv2 / timm weights -> a timm backbone export")
    s.add_argument("source", help="checkpoint file (.pth, .bin, .safetensors) or a timm/HF folder")
    s.add_argument("--format", required=True, choices=IMPORT_FORMATS.names(),
                   help="; ".join(f"{e.name}: {e.description}" for e in IMPORT_FORMATS))
    s.add_argument("--out", required=True)
    s.add_argument("--model", help="timm architecture (default: inferred from the weights for ViTs)")
    s.add_argument("--model-args", type=json.loads, help='JSON timm arguments, e.g. \'{"num_heads": 16}\'')
    s.add_argument("--img-size", type=int, help="resample position embeddings to this input size")
    s.add_argument("--license", default="other", help="licence of the imported weights (for the card)")
    s.add_argument("--overwrite", action="store_true")

    s = sub.add_parser("plan", help="nnU-Net-style self-configuration: fingerprint a segmentation shard set and "
                                    "write a recipe")
    s.add_argument("shards", help="a shard set with masks (images reader `mask` column, or volumes with labels)")
    s.add_argument("--out", required=True, help="the recipe YAML to write (plus RECIPE.fingerprint.json)")
    s.add_argument("--split", default="train", help="split to fingerprint (default: train)")
    s.add_argument("--mask", help="mask member name (default: mask, else label)")
    s.add_argument("--memory-gb", type=float, default=8.0, help="training memory budget per process (default 8)")
    s.add_argument("--steps", type=int, default=5000, help="trainer.max_steps of the recipe (default 5000)")
    s.add_argument("--output-dir", help="trainer.output_dir of the recipe (default runs/NAME_plan)")

    s = sub.add_parser("extract", help="embed WSI tiles with a frozen backbone into per-slide MIL bags")
    s.add_argument("shards", help="a tile shard set from `medfound shard wsi` (a folder or an s3:// gs:// https:// "
                                  "prefix; slide labels via its --table)")
    s.add_argument("--backbone", required=True, help="an export folder (RUN_DIR/export, `medfound import` output)")
    s.add_argument("--out", required=True, help="the bag folder to write (bags.json + one file per slide); a rerun "
                                                "reuses the bags an earlier (killed) run made with the same backbone")
    s.add_argument("--format", choices=["safetensors", "h5"], default="safetensors")
    s.add_argument("--batch-size", type=int, default=64, help="tiles per forward pass (GPU: 256-1024)")
    s.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                   help="GPU: run the backbone under bf16 autocast (default) or in fp32; the CPU always uses fp32")
    s.add_argument("--num-workers", type=int, default=0, help="DataLoader workers decoding tiles per process")
    s.add_argument("--overwrite", action="store_true", help="replace bags made by another backbone")

    s = sub.add_parser("prompt", help="segment the structures inside boxes with a box-prompt (MedSAM) run")
    s.add_argument("run_dir", help="a run of a head.type=box_prompt recipe (e.g. adapt/medsam.yaml)")
    s.add_argument("image", help="an image file (PNG, JPEG, TIFF)")
    s.add_argument("--box", action="append", required=True, type=lambda v: [float(x) for x in v.split(",")],
                   help="x0,y0,x1,y1 in image pixels (or x,y,w,h with --box-format xywh); repeat for several "
                        "structures (one mask each)")
    s.add_argument("--box-format", choices=["xyxy", "xywh"], default="xyxy",
                   help="xyxy: corners x0,y0,x1,y1 (default); xywh: COCO's x,y,width,height")
    s.add_argument("--out", required=True, help="folder for mask_<i>.png (0/255) and overlay.png")
    s.add_argument("--threshold", type=float, default=0.5,
                   help="a pixel is in the mask when its predicted probability exceeds this (default 0.5); lower "
                        "it for faint or thin structures, raise it when masks spill outside the structure")
    s.add_argument("--modality", choices=[m for m in MODALITIES if m not in ("other", "mixed")],
                   help="the image's modality; warned about when the run was not trained on it")

    s = sub.add_parser("evaluate", help="score a fine-tuned run's export -> RUN_DIR/eval.json + report/")
    s.add_argument("run_dir")
    s.add_argument("external", nargs="*", help="external-site shard sets scored beside the internal split "
                                               "(default: the recipe's eval.external), and key=value overrides of "
                                               "eval.* (eval.bootstrap=200, eval.interval=percentile...) and "
                                               "data.eval_batch_size / num_workers / verify / max_bad_fraction")
    s.add_argument("--split", help="split to evaluate (default: the recipe's eval.split)")
    s.add_argument("--out", help="folder for eval.json, predictions.csv and report/ (default: RUN_DIR; required "
                                 "for a published folder); a new folder, or one of yours without those names")
    s.add_argument("--overwrite", action="store_true",
                   help="replace an earlier evaluation in --out (only the files it wrote; your own files stay)")

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

    s = sub.add_parser("predict", help="a trained model (run or published folder) on new studies: images, DICOM "
                                       "files or folders, or a shard set -> predictions.csv")
    s.add_argument("model", help="a run directory or a published folder")
    s.add_argument("inputs", nargs="+", metavar="INPUT", help="image files (PNG, JPEG, TIFF), NIfTI/NRRD volumes, "
                                                             "whole-slide images (MIL models), DICOM files or "
                                                             "folders, or one shard set")
    s.add_argument("--out", required=True, help="a new folder for predictions.csv and summary.json")
    s.add_argument("--overwrite", action="store_true", help="replace an earlier prediction in --out")
    s.add_argument("--batch-size", type=int, help="images per forward pass (default: the recipe's data.eval_batch_size)")
    s.add_argument("--box", action="append", type=lambda v: [float(x) for x in v.split(",")],
                   help="box-prompt models: x0,y0,x1,y1 in image pixels, the same on every image; repeat for several "
                        "structures (one mask each)")
    s.add_argument("--boxes", metavar="TABLE.csv", help="box-prompt models: one row per structure, columns "
                                                        "input,x0,y0,x1,y1 (input: a path as given, or its file name)")
    s.add_argument("--box-format", choices=["xyxy", "xywh"], help="box-prompt models: xyxy corners (default) or "
                                                                  "COCO's x,y,w,h")
    s.add_argument("--threshold", type=float, help="box-prompt models: mask probability threshold (default 0.5)")
    s.add_argument("--modality", choices=[m for m in MODALITIES if m not in ("other", "mixed")],
                   help="box-prompt models: the images' modality, warned about when the model was not trained on it")
    s.add_argument("--backbone", metavar="DIR", help="MIL models: the tile backbone (export folder) the head was "
                                                     "trained on, where its recorded path is not on this machine")
    s.add_argument("--save-probabilities", action="store_true", help="segmentation: also write each input's class "
                                                                     "probabilities on its grid "
                                                                     "(probabilities/KEY.npz, float16, nnU-Net's)")
    s.add_argument("--mask-format", choices=["auto", "png", "dicom-seg"], help="segmentation of DICOM inputs: a "
                                                                            "DICOM SEG referencing each source "
                                                                            "(auto, the default) or PNG")
    s.add_argument("--anonymous", action="store_true", help="segmentation: never write DICOM SEG (it carries the "
                                                            "source's patient and study attributes): PNG / NIfTI "
                                                            "only")
    s.add_argument("--overlay", action="store_true", help="segmentation (2-D): also write overlays/KEY.png, the "
                                                          "mask painted over the image")
    s.add_argument("--device", help="cpu, cuda or cuda:N (default: the first GPU when there is one)")
    s.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 autocast on a GPU, fp32 on the CPU")
    s.add_argument("--num-workers", type=int, help="DataLoader workers decoding inputs (default: the recipe's)")

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

    s = sub.add_parser("card", help="check or push a published folder")
    card = s.add_subparsers(dest="card_verb", required=True)
    c = card.add_parser("check", help="verify the card's numbers against eval.json and its weight hashes")
    c.add_argument("dir")
    c = card.add_parser("push", help="upload a published folder (after the check) to the Hugging Face Hub")
    c.add_argument("dir")
    c.add_argument("--repo", help="Hub repo id, e.g. my-org/retina-vit (needed unless --dry-run)")
    c.add_argument("--dry-run", action="store_true")
    c.add_argument("--private", action="store_true")
    return p


def _print_push(push: dict) -> None:
    if push.get("dry_run"):
        print(f"dry run: would upload {len(push['files'])} files ({push['bytes']:,} bytes) to "
              f"{push['repo_id'] or '<REPO_ID>'}:")
        for f in push["files"]:
            print(f"  {f['path']}  {f['bytes']:,} bytes")
    else:
        print(f"uploaded {len(push['files'])} files ({push['bytes']:,} bytes) to {push['repo_id']}: {push['url']}")


def _load(args: argparse.Namespace, kind: Optional[str]):
    folder = "adapt" if kind == "finetune" else "pretrain"
    try:
        path = find_recipe(args.recipe, folder)
    except ConfigError:
        if kind is not None:
            raise
        path = find_recipe(args.recipe, "adapt")
    return path, load_recipe(path, args.overrides, expect=kind)


def main(argv: Optional[list[str]] = None) -> int:
    try:
        return _main(argv)
    finally:
        end_group()  # a torchrun verb's gloo group is closed before exit (an open one can abort the process)


def _main(argv: Optional[list[str]]) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if rest:  # `medfound evaluate RUN --out DIR eval.bootstrap=200`: key=value overrides may follow the options
        if args.verb == "evaluate" and all("=" in r and not r.startswith("-") for r in rest):
            args.external += rest
        else:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
    command = "medfound " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    try:
        return _run(args, command)
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
        print(f"medfound {args.verb}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # a library's own error on bad input (unpickling, safetensors header, tar)
        if args.traceback or not _is_input_error(e):
            raise
        print(f"medfound {args.verb}: error: {_one_line(e)} (--traceback shows where)", file=sys.stderr)
        return 1


def _is_input_error(e: BaseException) -> bool:
    import pickle
    import tarfile

    return isinstance(e, (pickle.UnpicklingError, tarfile.TarError)) or type(e).__name__ == "SafetensorError"


def _one_line(e: BaseException) -> str:
    """The error as one line; a failed write (full disk, read-only) names the file and the fix."""
    from medfound.io import write_failure

    reason = write_failure(e)
    if reason is not None and "writing checkpoint" not in str(e):
        where = getattr(e, "filename", None)
        return (f"{reason}{f' writing {where}' if where else ''}: free space or write elsewhere; outputs are written "
                "atomically, so what was there before is intact")
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename and str(e.filename) not in e.strerror else e.strerror
    if _is_input_error(e):  # a library's message: its first line only
        text = str(e).strip()
        return f"{type(e).__name__}: {text.splitlines()[0][:500] if text else ''}"
    return str(e)


def _listing(what: str) -> list[str]:
    """`medfound ls`: one line per shipped recipe or registered component."""
    from medfound.config import TASK_KEYS, list_recipes

    lines: list[str] = []
    if what in ("all", "recipes"):
        for folder, recipes in list_recipes().items():
            lines.append(f"recipes ({folder}/):")
            lines += [f"  {name:28s} {first}" for name, _, first in recipes]
    for key, title, reg in (("heads", "heads (head.type)", HEADS), ("objectives", "objectives (objective.name)",
                                                                  OBJECTIVES),
                            ("tunings", "tunings (tuning)", TUNINGS), ("ingest", "ingest kinds (medfound shard KIND)",
                                                                       INGEST_KINDS),
                            ("formats", "checkpoint formats (medfound import --format)", IMPORT_FORMATS),
                            ("exports", "export formats (a task kind's export_format, or its head's)",
                             EXPORT_FORMATS),
                            ("metrics", "metrics", METRICS),
                            ("protocols", "bench protocols (medfound bench, suite protocols[].name)",
                             BENCH_PROTOCOLS)):
        if key == "metrics" and what in ("all", key):
            import medfound.evaluate.definitions  # noqa: F401  (registers them, torch-free)
        if key == "protocols" and what in ("all", key):
            import medfound.bench.suite  # noqa: F401  (registers them, torch-free)
        if key == "exports" and what in ("all", key):
            import medfound.publish.formats  # noqa: F401  (registers them, torch-free)
        if what in ("all", key):
            lines.append(f"{title}:")
            lines += [f"  {e.name:28s} {e.description}" + (f" [task: {e.config.task}]" if key == "heads" else "")
                      for e in reg]
    if what in ("all", "tasks"):
        lines.append("tasks (recipe.task; chosen by the head):")
        lines += [f"  {k.name:28s} {k.runs}: reads data.{{{', '.join(sorted(k.data))}}}" for k in TASK_KEYS.values()]
    return lines


def _copy_recipe(name: str, dest: str) -> Path:
    """`medfound cp`: a shipped recipe -> DEST (a file, or a folder to put NAME.yaml in); never replaces a file."""
    from medfound.config import list_recipes
    from medfound.io import atomic_write_text

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
    from medfound.data.location import is_url
    from medfound.data.samples import demo_set_command

    out = []
    head = getattr(recipe, "head", None)  # pretraining recipes have none
    mil = head is not None and type(head).backbone == "bags"  # the head reads a bag folder, not a shard set
    for i, shards in enumerate(recipe.data.shards):
        want = "bags.json" if mil else "manifest.json"
        if not is_url(shards) and not (Path(shards) / want).is_file():
            demo = None if mil else demo_set_command(Path(shards))
            make = (f"a demo set: `medfound demo` makes it, or `{demo}`" if demo else
                    ("`medfound extract TILE_SHARDS --backbone EXPORT --out " if mil else
                     "`medfound shard KIND INPUT --out ") + f"{shards}` makes it")
            out.append(f"data.shards[{i}]: {shards} holds no {want} ({make})")
    for i, ext in enumerate(getattr(getattr(recipe, "eval", None), "external", []) or []):
        want = "bags.json" if mil else "manifest.json"
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


def _print_resolved(recipe) -> None:
    """`validate --print`: the recipe with every default, its task, and the values derived at start (1 process)."""
    from medfound.config import derive, dump_recipe

    if recipe.derived is None:
        recipe = recipe.model_copy(update={"derived": derive(recipe, 1, __version__)})
    print(dump_recipe(recipe, header=f"task: {recipe.task}\nderived: for 1 process (world_size x batch scales the "
                                     "lr of optim.blr recipes)"), end="")


def _demo(args: argparse.Namespace) -> int:
    """`medfound demo`: the CLI's own verbs, one after the other, on the bundled sample archive."""
    from medfound import demo

    out = Path(args.out)
    data = demo.sample_data()
    demo.prepare_out(out, args.overwrite)
    steps = demo.demo_steps(out, data, quick=args.quick)
    from medfound.env import check_torch_stack

    check_torch_stack()  # before step 1: a broken torch install is named at once, not after the sharding
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


def _run(args: argparse.Namespace, command: str) -> int:
    if args.verb == "demo":
        return _demo(args)
    if args.verb == "validate":
        path, recipe = _load(args, None)
        missing = [] if args.no_paths else missing_paths(recipe)
        if args.print_recipe:
            _print_resolved(recipe)
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
    if args.verb == "ls":
        print("\n".join(_listing(args.what)))
        return 0
    if args.verb == "cp":
        target = _copy_recipe(args.recipe, args.dest)
        print(f"wrote {target}: edit it, then `medfound validate {target}`")
        return 0
    recipe = _load(args, args.verb)[1] if args.verb in ("pretrain", "finetune") else None  # fail fast on typos
    from medfound.env import check_torch_stack

    check_torch_stack()  # a torchvision built for another torch is named here, with the command that fixes it
    from medfound import workflows

    if args.verb in ("pretrain", "finetune"):
        summary = workflows.train(recipe, command)
        _report(summary, args.verb)
        return 0
    if args.verb == "predict":
        from medfound.predict import predict

        done = predict(args.model, args.inputs, args.out, overwrite=args.overwrite, batch_size=args.batch_size,
                       boxes=args.box, box_table=args.boxes, box_format=args.box_format, threshold=args.threshold,
                       modality=args.modality, backbone=args.backbone, save_probabilities=args.save_probabilities,
                       overlay=args.overlay, mask_format=args.mask_format, anonymous=args.anonymous,
                       device=args.device, precision=args.precision,
                       num_workers=args.num_workers)
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
    if args.verb == "bench":
        from medfound.bench.runner import run_bench

        if (args.suite is None) == (not args.quick):
            raise ValueError("give --suite SUITE (a YAML or a shipped suite's name) or --quick")
        done = run_bench(args.backbones, args.suite or "quick", args.out, cache=args.cache)
        print(f"{len(done['results'])} results, {len(done['paired'])} paired differences:")
        for path in done["written"]:
            print(f"  {path}")
        return 0
    if args.verb == "plan":
        from medfound.adapt.plan import write_plan
        result = write_plan(args.shards, args.out, split=args.split, mask=args.mask, memory_gb=args.memory_gb,
                            steps=args.steps, output_dir=args.output_dir)
        plan, fp = result["plan"], result["fingerprint"]
        print(f"fingerprint: {fp['images']} {fp['spatial_dims']}-D images ({fp['modality']}), median size "
              f"{fp['shapes']['median']}, spacing {fp['spacing']['median'] if fp['spacing'] else 'none'}")
        print(f"plan: patch {plan['patch_size']}, spacing {plan['spacing']}, strides {plan['strides']}, channels "
              f"{plan['channels']}, batch {plan['batch_size']} (~{plan['estimated_memory_gb']} GB), "
              f"normalisation {plan['intensity']}")
        print(f"wrote {result['recipe']}: run it with `medfound finetune {result['recipe']}`")
        return 0
    if args.verb == "prompt":
        from medfound.adapt.prompt import segment_boxes
        from medfound.run import read_run

        run = read_run(args.run_dir)
        from medfound.tasks import task_for

        if "boxes" not in getattr(task_for(run.recipe), "predict_options", ()):  # a kind that takes box prompts
            raise ValueError(f"{args.run_dir} is not a box-prompt run (head.type=box_prompt)")
        from medfound.evaluate.records import trained_modalities

        predictor = workflows.load(args.run_dir)
        paths, warnings = segment_boxes(predictor, args.image, args.box, args.out, threshold=args.threshold,
                                        box_format=args.box_format, modalities=trained_modalities(run.export),
                                        modality=args.modality)
        for path in paths:
            print(f"wrote {path}")
        for w in warnings:
            print(f"medfound prompt: warning: {w}", file=sys.stderr)
        return 0
    if args.verb == "extract":
        from medfound.adapt.extract import extract_bags
        index = extract_bags(args.shards, args.backbone, args.out, batch_size=args.batch_size, format=args.format,
                             overwrite=args.overwrite, precision=args.precision, num_workers=args.num_workers)
        if not index:  # ranks > 0 under torchrun: rank 0 reports
            return 0
        splits: dict[str, int] = {}
        for s in index["slides"]:
            splits[s["split"]] = splits.get(s["split"], 0) + 1
        tiles = sum(s["tiles"] for s in index["slides"])
        t = index["throughput"]
        rate = f", {t['tiles_per_s']} tiles/s on {t['processes']} process(es)" if t["tiles_per_s"] else ""
        print(f"wrote {len(index['slides'])} bags ({tiles} tiles, {index['backbone']['feature_dim']}-d features from "
              f"{index['backbone']['architecture']}; slides per split {splits}) to {args.out} in {index['seconds']} s"
              f"{rate}; {t['slides_embedded']} slides embedded, {t['slides_reused']} reused from an earlier run")
        return 0
    if args.verb == "evaluate":
        import re

        is_key = re.compile(r"^[a-z_]+(\.[a-z_0-9]+)+=")  # key=value overrides among the external sets
        overrides = [a for a in args.external if is_key.match(a)]
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
    if args.verb == "publish":
        result = workflows.publish(args.run_dir, args.out, overwrite=args.overwrite, name=args.name,
                                   push=args.push, dry_run=args.dry_run, private=args.private,
                                   base_model=args.base_model, license=args.license, rights=args.rights_cleared)
        print(f"published {result['out']} under licence {result['license']}: {', '.join(result['files'])}"
              + (f" (timm reload reproduces the trained model: max abs diff {result['reload_max_abs_diff']})"
                 if "reload_max_abs_diff" in result else "") + "; card checked against the folder")
        if "push" in result:
            _print_push(result["push"])
        return 0
    if args.verb == "card":
        if args.card_verb == "check":
            from medfound.publish.check import check_card
            problems = check_card(args.dir)
            for p in problems:
                print(f"MISMATCH: {p}", file=sys.stderr)
            if problems:
                print(f"{args.dir}: the card does not match its folder ({len(problems)} problems)", file=sys.stderr)
                return 1
            checked = "weights' sha256, preprocessing" + (", eval.json" if (Path(args.dir) / "eval.json").is_file()
                                                          else "")
            print(f"{args.dir}: the card matches its folder ({checked})")
            return 0
        from medfound.publish.hub import push_folder
        _print_push(push_folder(args.dir, args.repo, dry_run=args.dry_run, private=args.private))
        return 0
    if args.verb == "import":
        from medfound.importing import import_checkpoint
        r = import_checkpoint(args.source, args.format, args.out, model=args.model, model_args=args.model_args,
                              img_size=args.img_size, license=args.license, overwrite=args.overwrite)
        print(f"imported {args.source} as {r['architecture']} ({r['params']:,} parameters) into {r['out']}"
              + (f"; MAE decoder kept ({r['mae_decoder']})" if r["mae_decoder"] else "")
              + (f"; DINO heads kept ({r['dino_heads']['out_dim']} prototypes)" if r.get("dino_heads") else "")
              + (f"; dropped {len(r['dropped'])} non-backbone keys: {', '.join(r['dropped'][:6])}" if r["dropped"] else "")
              + "".join(f"\nnote: {n}" for n in r.get("notes", [])))
        return 0
    if args.verb == "shard" and args.kind == "merge":
        from medfound.data.shards import merge_parts

        m = merge_parts(args.input, args.out, overwrite=args.overwrite)
        print(f"merged {m.ingest['merged_parts']} parts: {len(m.shards)} shards ({m.counts['total']} samples: "
              f"{', '.join(f'{k} {v}' for k, v in m.counts['by_split'].items())}) to {args.out}; "
              f"digest {m.digest[:16]}")
        return 0
    if args.verb == "shard":
        from medfound.data.ingest.parallel import default_workers
        from medfound.data.location import is_url

        if len(args.input) != 1:
            raise ValueError(f"medfound shard {args.kind} takes one input (got {len(args.input)}); several part "
                             "folders are joined with `medfound shard merge`")
        args.input = args.input[0]
        from medfound.data.ingest import reader_options

        # the options given (argparse leaves the others None / False; each reader owns its defaults), checked
        # against what the kind's reader reads by workflows.shard: another kind's option is an error naming it
        known = set().union(*(reader_options(k) for k in INGEST_KINDS.names()))
        options = {k: v for k, v in vars(args).items() if k in known and v is not None and v is not False}
        if args.skipped_list and Path(args.out).resolve() in Path(args.skipped_list).resolve().parents:
            raise ValueError(f"--skipped-list {args.skipped_list} is inside --out {args.out}: file names never go into "
                             "a shard set; write the list elsewhere")
        try:
            m, skipped = workflows.shard(args.kind, args.input, args.out, name=args.name, modality=args.modality,
                                         site=args.site, license=args.license, attribution=args.attribution,
                                         max_count=args.max_count, max_mb=args.shard_size_mb,
                                         overwrite=args.overwrite, workers=args.workers or default_workers(),
                                         part=args.part, resumable=not is_url(args.out), resume=args.resume, **options)
        except Exception as e:
            from medfound.data.journal import partial_dir

            kept = [] if is_url(args.out) or args.traceback else list(partial_dir(args.out).glob("*.tar"))
            if not kept:
                raise
            print(f"medfound shard: error: {_one_line(e)}; {len(kept)} finished shards are kept in "
                  f"{partial_dir(args.out)}: fix the cause and rerun the same command with --resume to continue from "
                  "them", file=sys.stderr)
            return 1
        print(f"wrote {len(m.shards)} shards ({m.counts['total']} samples: "
              f"{', '.join(f'{k} {v}' for k, v in m.counts['by_split'].items())}; modalities "
              f"{', '.join(f'{k} {v}' for k, v in m.counts['by_modality'].items())}) to {args.out}; "
              f"digest {m.digest[:16]}")
        if m.deidentification:
            d = m.deidentification
            burned = d.get("burned_in", {})
            print(f"de-identified: {d['files_deidentified']} files (allow-listed tags only; coded values only"
                  + (f", {sum(d['dropped_values'].values())} free-text values dropped" if d.get("dropped_values") else "")
                  + f"; patient IDs as salted tokens, salt {d['salt']})"
                  + (f"; {burned['refused']} refused for burned-in PHI" if burned.get("refused") else "")
                  + (f"; {burned['allowed']} possibly burned-in allowed by --allow-burned-in" if burned.get("allowed")
                     else ""))
        if skipped:
            print(f"skipped {len(skipped)} files (by table row, or index in the sorted input list; names are not "
                  "printed" + (f", see {args.skipped_list}" if args.skipped_list else ": --skipped-list CSV writes them")
                  + "):")
            for ref, _, reason in skipped:
                print(f"  {ref}: {reason}")
            if args.skipped_list:
                import csv
                import io

                buf = io.StringIO()
                w = csv.writer(buf)
                w.writerow(["input", "path", "reason"])
                w.writerows(skipped)
                from medfound.io import atomic_write_text
                atomic_write_text(args.skipped_list, buf.getvalue())
        return 0
    if args.verb == "inspect":
        from medfound.data.manifest import salt_caveat, salt_fingerprint

        bad = 0
        salts: dict[str, Optional[str]] = {}
        for d in args.shards:
            m, problems, leakage = workflows.inspect_shards(d)
            if leakage is not None:
                salts[d] = salt_fingerprint(m)
            print(f"{d}: {m.name} ({m.modality}{', site ' + m.site if m.site else ''}), labels {m.label_schema.type}"
                  f"{' ' + str(m.label_schema.names) if m.label_schema.names else ''}")
            print(f"  {m.counts['total']} samples in {len(m.shards)} shards: {m.counts['by_split']}; "
                  f"modalities {m.counts.get('by_modality', {})}; sites {m.counts.get('by_site', {})}; digest {m.digest}")
            if not problems:
                from medfound.data.scale import describe_scale, scale_stats

                print(f"  scale: {describe_scale(scale_stats(d))}")
            for p in problems:
                print(f"  PROBLEM {p}")
            if problems:
                print(f"  -> re-create the shard set with `medfound shard ... --out {d} --overwrite`")
            else:
                print("  all checksums verified, samples recounted, keys unique")
            if leakage:
                print(f"  LEAKAGE {len(leakage)} patients appear in more than one split, e.g. "
                      + "; ".join(f"patient {p}: {', '.join(v)}" for p, v in list(leakage.items())[:3]))
                print("  -> fix the split column so each patient is in one split, or drop it to split by patient")
            elif leakage == {} and salt_caveat(m):
                print(f"  CAVEAT no patient token is in two splits, but the set was {salt_caveat(m)}")
            elif leakage == {}:
                print("  no patient in two splits")
            elif not problems:
                print("  no patient IDs recorded: split leakage cannot be checked")
            bad += bool(problems) or bool(leakage)
        if len(set(salts.values())) > 1:  # several sets of one cohort: their tokens are comparable only under one salt
            print("salts: " + "; ".join(f"{d} {fp or 'not recorded'}" for d, fp in salts.items()) + " -- these sets' "
                  "patient tokens come from different salts, so the same patient has unrelated tokens in them: a "
                  "patient in one set's training split and another set's test split cannot be detected. Ingest the "
                  "sets of one cohort with the same --salt")
        return 1 if bad else 0
    raise AssertionError(args.verb)


def _report(summary: dict, verb: str) -> None:
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
        print(f"  monitor (last look): k-NN auroc {m.get('knn_auroc', 'n/a')}, accuracy {m.get('knn_accuracy')}, "
              f"feature std {m.get('feature_std')}, effective rank {m.get('effective_rank')}"
              + ("  COLLAPSED" if m.get("collapsed") else ""))
    if "selected_step" in summary:
        print(f"  selected: step {summary['selected_step']} (eval.select on the validation split; RUN_DIR/selection)")
    if "eval" in summary:
        print(f"  eval: {json.dumps(summary['eval'])} -> {summary['eval_file']}")


if __name__ == "__main__":
    sys.exit(main())
