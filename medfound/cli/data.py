"""Verbs on data: `shard KIND` (one sub-command per registered ingest kind, showing only the options its reader
reads, plus `shard merge`), `inspect`, `plan` (nnU-Net-style recipe from a data fingerprint), `extract` (WSI tiles
-> MIL bags)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from medfound.cli.common import one_line, torch_stack
from medfound.data.ingest import reader_options
from medfound.data.ingest.options import OPTIONS
from medfound.data.journal import partial_dir
from medfound.data.location import is_url
from medfound.data.manifest import salt_caveat, salt_fingerprint
from medfound.io import atomic_write_text
from medfound.registry import INGEST_KINDS

# Loaded by torch-free commands (`medfound ls`, `validate`, `--help`): medfound modules that bring in torch or
# numpy are imported inside the functions that need them (tests/test_layering.py keeps it so).


def add(sub, argv: list[str]) -> None:
    s = sub.add_parser("shard", help="raw archive -> WebDataset shards + manifest.json (`shard KIND --help`: the "
                                     "options of that kind)")
    verb = next((a for a in argv if not a.startswith("-")), None)
    if verb in ("shard", None):  # the readers are imported only when shard is what runs (or every parser is built)
        add_shard_kinds(s)
    s.set_defaults(run=run_shard)
    s = sub.add_parser("inspect", help="print a shard set's summary and verify every checksum")
    s.add_argument("shards", nargs="+")
    s.set_defaults(run=run_inspect)
    s = sub.add_parser("plan", help="nnU-Net-style self-configuration: fingerprint a segmentation shard set and "
                                    "write a recipe")
    s.add_argument("shards", help="a shard set with masks (images reader `mask` column, or volumes with labels)")
    s.add_argument("--out", required=True, help="the recipe YAML to write (plus RECIPE.fingerprint.json)")
    s.add_argument("--split", default="train", help="split to fingerprint (default: train)")
    s.add_argument("--mask", help="mask member name (default: mask, else label)")
    s.add_argument("--memory-gb", type=float, default=8.0, help="training memory budget per process (default 8)")
    s.add_argument("--steps", type=int, default=5000, help="trainer.max_steps of the recipe (default 5000)")
    s.add_argument("--output-dir", help="trainer.output_dir of the recipe (default runs/NAME_plan)")
    s.set_defaults(run=run_plan)
    add_extract(sub)


def add_shard_kinds(s: argparse.ArgumentParser) -> None:
    """`shard KIND`: one sub-command per ingest kind with the shared options and exactly the options its reader
    reads (medfound.data.ingest.options); another kind's option is parsed (hidden) and refused by
    `workflows.shard`, naming the kinds that read it."""

    kinds = s.add_subparsers(dest="kind", required=True, metavar="KIND")
    for entry in INGEST_KINDS:
        k = kinds.add_parser(entry.name, help=entry.description, description=entry.description)
        k.add_argument("input", nargs="+", help="the archive: .npz file, image folder, DICOM file/folder, slide "
                                                "file/folder, volume folder")
        shared_shard_options(k)
        own = reader_options(entry.name)
        g = k.add_argument_group(f"{entry.name} options")
        for name, spec in OPTIONS.items():
            flag = "--" + name.replace("_", "-")
            if name in own:
                g.add_argument(flag, **spec)
            else:  # parsed so that the error names the kinds that read it
                k.add_argument(flag, **{**spec, "help": argparse.SUPPRESS})
    m = kinds.add_parser("merge", help="join the part folders written with --part into one shard set")
    m.add_argument("input", nargs="+", help="every part folder")
    m.add_argument("--out", required=True, help="the shard set to write")
    m.add_argument("--overwrite", action="store_true", help="replace an existing shard set (only once complete)")


def shared_shard_options(k: argparse.ArgumentParser) -> None:
    k.add_argument("--out", required=True, help="output shard-set directory, or an s3:// / gs:// prefix (shards "
                                                "uploaded first, manifest.json last)")
    k.add_argument("--name", help="data set name (default: the --out folder name)")
    k.add_argument("--modality", default="auto",
                   help="fundus, oct, cxr, xray, mammography, ct, mr, us, pathology, other; auto (default): from the "
                        "DICOM tags ('mixed' when several), else other")
    k.add_argument("--site", help="acquisition site for every sample (a CSV site column overrides it)")
    k.add_argument("--license", help="licence of the source data (recorded in the manifest and the card)")
    k.add_argument("--attribution", help="citation / attribution of the source data")
    k.add_argument("--max-count", type=int, default=1000, help="samples per shard (default 1000)")
    k.add_argument("--shard-size-mb", type=float, default=64.0, help="bytes per shard, in MB (default 64)")
    k.add_argument("--overwrite", action="store_true", help="replace an existing shard set (only once complete)")
    k.add_argument("--workers", type=int, default=None,
                   help="processes that decode, de-identify and encode (default: all cores); the shards are "
                        "byte-identical to --workers 1")
    k.add_argument("--resume", action="store_true",
                   help="continue an ingest that was killed or failed: its finished shards (kept in .NAME.partial "
                        "beside --out, checked against their sha256) stay, their inputs are not read again, the "
                        "rest is redone; the result is byte-identical to an uninterrupted run")
    k.add_argument("--part", metavar="I/N", help="ingest part I of N of the sorted inputs (0-based, e.g. a SLURM array "
                                                "task); join the parts with `medfound shard merge PART_DIRS --out DIR`")
    k.add_argument("--skipped-list", metavar="CSV",
                   help="write the skipped inputs' file names (input,path,reason) to this local file, outside --out; "
                        "the console shows only their index in the sorted input list (names can carry PHI)")


def add_extract(sub) -> None:
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
    s.set_defaults(run=run_extract)


def run_shard(args: argparse.Namespace, command: str) -> int:
    torch_stack()
    if args.kind == "merge":
        from medfound.data.shards import merge_parts

        m = merge_parts(args.input, args.out, overwrite=args.overwrite)
        print(f"merged {m.ingest['merged_parts']} parts: {len(m.shards)} shards ({m.counts['total']} samples: "
              f"{', '.join(f'{k} {v}' for k, v in m.counts['by_split'].items())}) to {args.out}; "
              f"digest {m.digest[:16]}")
        return 0
    from medfound import workflows
    from medfound.data.ingest.parallel import default_workers

    if len(args.input) != 1:
        raise ValueError(f"medfound shard {args.kind} takes one input (got {len(args.input)}); several part "
                         "folders are joined with `medfound shard merge`")
    # the options given (argparse leaves the others None / False; each reader owns its defaults), checked against
    # what the kind's reader reads by workflows.shard: another kind's option is an error naming the kinds that read it
    options = {k: v for k, v in vars(args).items() if k in OPTIONS and v is not None and v is not False}
    if args.skipped_list and Path(args.out).resolve() in Path(args.skipped_list).resolve().parents:
        raise ValueError(f"--skipped-list {args.skipped_list} is inside --out {args.out}: file names never go into "
                         "a shard set; write the list elsewhere")
    try:
        m, skipped = workflows.shard(args.kind, args.input[0], args.out, name=args.name, modality=args.modality,
                                     site=args.site, license=args.license, attribution=args.attribution,
                                     max_count=args.max_count, max_mb=args.shard_size_mb,
                                     overwrite=args.overwrite, workers=args.workers or default_workers(),
                                     part=args.part, resumable=not is_url(args.out), resume=args.resume, **options)
    except Exception as e:
        kept = [] if is_url(args.out) or args.traceback else list(partial_dir(args.out).glob("*.tar"))
        if not kept:
            raise
        print(f"medfound shard: error: {one_line(e)}; {len(kept)} finished shards are kept in "
              f"{partial_dir(args.out)}: fix the cause and rerun the same command with --resume to continue from "
              "them", file=sys.stderr)
        return 1
    print(f"wrote {len(m.shards)} shards ({m.counts['total']} samples: "
          f"{', '.join(f'{k} {v}' for k, v in m.counts['by_split'].items())}; modalities "
          f"{', '.join(f'{k} {v}' for k, v in m.counts['by_modality'].items())}) to {args.out}; "
          f"digest {m.digest[:16]}")
    if m.deidentification:
        print_deidentification(m.deidentification)
    if skipped:
        print_skipped(skipped, args.skipped_list)
    return 0


def print_deidentification(d: dict) -> None:
    burned = d.get("burned_in", {})
    print(f"de-identified: {d['files_deidentified']} files (allow-listed tags only; coded values only"
          + (f", {sum(d['dropped_values'].values())} free-text values dropped" if d.get("dropped_values") else "")
          + f"; patient IDs as salted tokens, salt {d['salt']})"
          + (f"; {burned['refused']} refused for burned-in PHI" if burned.get("refused") else "")
          + (f"; {burned['allowed']} possibly burned-in allowed by --allow-burned-in" if burned.get("allowed")
             else ""))


def print_skipped(skipped: list, listing: Optional[str]) -> None:
    """The skipped inputs by reference (never by name: names can carry PHI); their names only into `listing`."""
    print(f"skipped {len(skipped)} files (by table row, or index in the sorted input list; names are not "
          "printed" + (f", see {listing}" if listing else ": --skipped-list CSV writes them") + "):")
    for ref, _, reason in skipped:
        print(f"  {ref}: {reason}")
    if listing:
        import csv
        import io

        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["input", "path", "reason"])
        w.writerows(skipped)
        atomic_write_text(listing, buf.getvalue())


def run_inspect(args: argparse.Namespace, command: str) -> int:
    torch_stack()
    from medfound import workflows

    bad = 0
    salts: dict[str, Optional[str]] = {}
    for d in args.shards:
        m, problems, leakage = workflows.inspect_shards(d)
        if leakage is not None:
            salts[d] = salt_fingerprint(m)
        print_inspection(d, m, problems, leakage)
        bad += bool(problems) or bool(leakage)
    if len(set(salts.values())) > 1:  # several sets of one cohort: their tokens are comparable only under one salt
        print("salts: " + "; ".join(f"{d} {fp or 'not recorded'}" for d, fp in salts.items()) + " -- these sets' "
              "patient tokens come from different salts, so the same patient has unrelated tokens in them: a "
              "patient in one set's training split and another set's test split cannot be detected. Ingest the "
              "sets of one cohort with the same --salt")
    return 1 if bad else 0


def print_inspection(d: str, m, problems: list[str], leakage: Optional[dict]) -> None:
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


def run_plan(args: argparse.Namespace, command: str) -> int:
    torch_stack()
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


def run_extract(args: argparse.Namespace, command: str) -> int:
    torch_stack()
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
