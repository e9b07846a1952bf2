"""MedMNIST v2 on the official splits: our MAE-pretrained ViT tuned with LoRA beside a CNN baseline (ResNet-18,
trained from scratch, full fine-tuning), on any MedMNIST-layout npz.

    python benchmarks/quality_medmnist.py --dataset retinamnist     -> benchmarks/results/retinamnist.json
    python benchmarks/quality_medmnist.py --dataset pneumoniamnist  -> benchmarks/results/pneumoniamnist.json
    python benchmarks/quality_medmnist.py --npz breastmnist.npz --name breastmnist \\
        --modality us --label-names malignant,normal_or_benign --positive-class malignant

Any npz in the MedMNIST layout (`{train,val,test}_images`, `{train,val,test}_labels`) works with `--npz` and
`--name` (`--label-names`, `--label-type`, `--modality` and `--positive-class` describe it; the results go to
`benchmarks/results/NAME.json`, or `--results FILE`).

Steps: shard the whole npz (train/val/test); MAE-pretrain a small ViT (patch 4 on 32 px) on the training images of
that data set only (no outside data, no ImageNet weights); fine-tune for `--steps` optimizer steps with
validation-based selection (`eval.every=--every`, `eval.select=--select` on the val split: the export is the best
validation step, as MedMNIST v2 and RETFound select), and report the test metrics computed once on that export
(eval.json says which step won). The ResNet-18 baseline goes through the same shards, input size, augmentation,
selection and evaluation code. MedMNIST v2 (Yang et al. 2023, Table 3) reports ResNet-18 (28) test AUC / ACC
0.717 / 0.524 (Retina) and 0.944 / 0.854 (Pneumonia).

The committed retinamnist.json and pneumoniamnist.json were made before eval.every existed, by fine-tuning once per
candidate length and choosing on validation accuracy by hand (their `candidates` block); a rerun writes the
`selection` block instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from _quality import ROOT, SHARED, backbone_record, medfound_bin, run, save_result

REFERENCE = {"retinamnist": {"model": "MedMNIST v2 ResNet-18 (28)", "auc": 0.717, "acc": 0.524},
             "pneumoniamnist": {"model": "MedMNIST v2 ResNet-18 (28)", "auc": 0.944, "acc": 0.854}}
SHARD_ARGS = {"retinamnist": ["--modality", "fundus", "--label-type", "ordinal",
                              "--label-names", "no DR,mild,moderate,severe,proliferative"],
              "pneumoniamnist": ["--modality", "cxr", "--label-names", "normal,pneumonia"]}


def rel(p: Path) -> str:
    return str(p).replace(f"{ROOT}/", "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=sorted(REFERENCE), help="a MedMNIST set from ../shared/data/medmnist")
    ap.add_argument("--npz", type=Path, help="any MedMNIST-layout npz (with --name)")
    ap.add_argument("--name", help="the data set's name (results/NAME.json, shard set name)")
    ap.add_argument("--modality", default="other")
    ap.add_argument("--label-type", choices=["binary", "multiclass", "ordinal", "multilabel"])
    ap.add_argument("--label-names", help="comma-separated class names in label order")
    ap.add_argument("--positive-class", help="binary sets: the class that counts as positive (head.positive_class)")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench" / "medmnist")
    ap.add_argument("--results", type=Path, help="write the result JSON here instead of benchmarks/results/NAME.json")
    ap.add_argument("--pretrain-steps", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=1500, help="fine-tuning optimizer steps")
    ap.add_argument("--every", type=int, default=100, help="validate every N steps (eval.every)")
    ap.add_argument("--select", default="accuracy", help="the validation metric that picks the export (eval.select)")
    args = ap.parse_args()
    if (args.dataset is None) == (args.npz is None):
        ap.error("give --dataset NAME, or --npz PATH --name NAME")
    if args.npz is not None and not args.name:
        ap.error("--npz needs --name")
    name = args.dataset or args.name
    npz = SHARED / "medmnist" / f"{args.dataset}.npz" if args.dataset else args.npz
    if not npz.is_file():
        print(f"{npz} is missing" + (": this benchmark needs ../shared/data/medmnist" if args.dataset else ""),
              file=sys.stderr)
        return 2
    if args.dataset:
        shard_args = SHARD_ARGS[args.dataset]
    else:
        shard_args = ["--modality", args.modality, *(["--label-type", args.label_type] if args.label_type else []),
                      *(["--label-names", args.label_names] if args.label_names else [])]
    mf, start, work = medfound_bin(), time.time(), args.work / name
    shards = work / "shards"
    if not (shards / "manifest.json").is_file():
        run([mf, "shard", "npz", str(npz), "--out", str(shards), "--name", name, *shard_args,
             "--license", "CC-BY-4.0", "--attribution", "MedMNIST v2 (Yang et al., Scientific Data 2023)"])
    backbone = work / "mae" / "export"
    pretrain = ["pretrain/demo_mae_tiny.yaml", f"data.shards=[{rel(shards)}]", "data.weights=null",
                f"trainer.max_steps={args.pretrain_steps}", "trainer.checkpoint_every=1000"]
    if not (backbone / "model.safetensors").is_file():
        run([mf, "pretrain", *pretrain, f"trainer.output_dir={work / 'mae'}"])
    common = [f"data.shards=[{rel(shards)}]", "trainer.checkpoint_every=1000",
              f"optim.warmup_steps={min(100, args.steps // 10)}", "data.shuffle_buffer=2000",
              f"trainer.max_steps={args.steps}", f"eval.every={args.every}", f"eval.select={args.select}",
              *([f"head.positive_class={args.positive_class}"] if args.positive_class else [])]
    models = {
        "vit_mae_lora": ["adapt/demo_classify_lora.yaml", f"backbone.weights={rel(backbone)}", *common],
        "resnet18_scratch": ["adapt/demo_classify_lora.yaml", "backbone.weights=null", "backbone.name=resnet18",
                             "tuning=full", "optim.lr=1e-3", *common],
    }

    def summary(ev: dict) -> dict:
        return {"auc": round(ev["auroc"], 4), "acc": round(ev["accuracy"], 4),
                **({"kappa_quadratic": round(ev["kappa_quadratic"], 4)} if "kappa_quadratic" in ev else {}),
                "balanced_accuracy": round(ev["balanced_accuracy"], 4)}

    results = {}
    for model, ft in models.items():
        out = work / model
        if not (out / "eval.json").is_file():
            run([mf, "finetune", *ft, f"trainer.output_dir={out}", "trainer.resume=auto"])
        report = json.loads((out / "eval.json").read_text())
        sel = report["selection"]
        results[model] = {**summary(report["metrics"]), "selected_step": sel["selected_step"],
                          "trained_steps": sel["trained_steps"], "selected_on": f"validation {sel['metric']}",
                          "validation_value": sel["value"], "intervals": report.get("intervals"),
                          "command": "medfound finetune " + " ".join(ft)}
    best = results["vit_mae_lora"]
    ref = REFERENCE.get(name)
    result = {"dataset": name, "split": "test (official MedMNIST v2 split of the npz)", "auc": best["auc"],
              "acc": best["acc"],
              "model": "ViT (6 blocks, 192-d, patch 4 on 32 px) MAE-pretrained on the training images, LoRA r=8 + "
                       "linear head on mean-pooled tokens",
              "command": "python benchmarks/quality_medmnist.py " + " ".join(sys.argv[1:]),
              "reference": ref, "meets_reference": None if ref is None else
              best["auc"] >= ref["auc"] and best["acc"] >= ref["acc"],
              "models": results,
              "pretraining": backbone_record(backbone, "pretrain/demo_mae_tiny.yaml (MedMNIST overrides)",
                                             "medfound pretrain " + " ".join(pretrain)),
              "minutes": round((time.time() - start) / 60, 1), "hardware": "2 CPU cores"}
    if args.results is not None:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({k: result.get(k) for k in ("auc", "acc", "meets_reference")}), f"-> {args.results}")
    else:
        save_result(name, result, ("auc", "acc", "meets_reference"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
