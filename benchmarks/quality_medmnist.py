"""MedMNIST v2 on the official splits: RetinaMNIST (5 DR grades, ordinal) and PneumoniaMNIST (normal vs pneumonia),
our MAE-pretrained ViT tuned with LoRA beside a CNN baseline (ResNet-18, trained from scratch, full fine-tuning).

    python benchmarks/quality_medmnist.py --dataset retinamnist     -> benchmarks/results/retinamnist.json
    python benchmarks/quality_medmnist.py --dataset pneumoniamnist  -> benchmarks/results/pneumoniamnist.json

Steps: shard the whole npz (train/val/test); MAE-pretrain a small ViT (patch 4 on 32 px) on the training images
of that data set only (no outside data, no ImageNet weights); tune it with LoRA for each candidate number of steps
(`--steps`), choose the one with the best validation accuracy (MedMNIST v2 also selects on the validation split),
and report its test metrics (every candidate's validation and test numbers are kept in the JSON). The ResNet-18
baseline goes through the same shards, input size, augmentation, selection and evaluation code. MedMNIST v2 (Yang et al.
2023, Table 3) reports ResNet-18 (28) test AUC / ACC 0.717 / 0.524 (Retina) and 0.944 / 0.854 (Pneumonia).
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
    ap.add_argument("--dataset", choices=sorted(REFERENCE), required=True)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench" / "medmnist")
    ap.add_argument("--pretrain-steps", type=int, default=2000)
    ap.add_argument("--steps", default="300,600,1000,1500",
                    help="candidate fine-tuning lengths, chosen on the validation split")
    args = ap.parse_args()
    npz = SHARED / "medmnist" / f"{args.dataset}.npz"
    if not npz.is_file():
        print(f"{npz} is missing: this benchmark needs ../shared/data/medmnist", file=sys.stderr)
        return 2
    mf, start, work = medfound_bin(), time.time(), args.work / args.dataset
    shards = work / "shards"
    if not (shards / "manifest.json").is_file():
        run([mf, "shard", "npz", str(npz), "--out", str(shards), "--name", args.dataset, *SHARD_ARGS[args.dataset],
             "--license", "CC-BY-4.0", "--attribution", "MedMNIST v2 (Yang et al., Scientific Data 2023)"])
    backbone = work / "mae" / "export"
    pretrain = ["pretrain/demo_mae_tiny.yaml", f"data.shards=[{rel(shards)}]", "data.weights=null",
                f"trainer.max_steps={args.pretrain_steps}", "trainer.checkpoint_every=1000"]
    if not (backbone / "model.safetensors").is_file():
        run([mf, "pretrain", *pretrain, f"trainer.output_dir={work / 'mae'}"])
    common = [f"data.shards=[{rel(shards)}]", "trainer.checkpoint_every=1000", "optim.warmup_steps=100",
              "data.shuffle_buffer=2000"]
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
    for name, ft in models.items():
        candidates = {}
        for steps in (int(v) for v in args.steps.split(",")):
            out = work / f"{name}_{steps}"
            cmd = [*ft, f"trainer.max_steps={steps}"]
            if not (out / "eval.json").is_file():
                run([mf, "finetune", *cmd, f"trainer.output_dir={out}", "trainer.resume=null"])
            test = json.loads((out / "eval.json").read_text())["metrics"]
            run([mf, "evaluate", str(out), "--split", "val"])
            val = json.loads((out / "eval.json").read_text())["metrics"]
            run([mf, "evaluate", str(out)])  # leave the test evaluation in eval.json
            candidates[steps] = {"val": summary(val), "test": summary(test), "command": "medfound finetune " + " ".join(cmd)}
        best = max(candidates, key=lambda k: (candidates[k]["val"]["acc"], candidates[k]["val"]["auc"]))
        results[name] = {**candidates[best]["test"], "steps": best, "selected_on": "validation accuracy",
                         "command": candidates[best]["command"], "candidates": candidates}
    best = results["vit_mae_lora"]
    ref = REFERENCE[args.dataset]
    result = {"dataset": args.dataset, "split": "test (official MedMNIST v2)", "auc": best["auc"], "acc": best["acc"],
              "model": "ViT (6 blocks, 192-d, patch 4 on 32 px) MAE-pretrained on the training images, LoRA r=8 + "
                       "linear head on mean-pooled tokens",
              "command": f"python benchmarks/quality_medmnist.py --dataset {args.dataset}",
              "reference": ref, "meets_reference": best["auc"] >= ref["auc"] and best["acc"] >= ref["acc"],
              "models": results,
              "pretraining": backbone_record(backbone, "pretrain/demo_mae_tiny.yaml (MedMNIST overrides)",
                                             "medfound pretrain " + " ".join(pretrain)),
              "minutes": round((time.time() - start) / 60, 1), "hardware": "2 CPU cores"}
    save_result(args.dataset, result, ("auc", "acc", "meets_reference"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
