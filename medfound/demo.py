"""`medfound demo [--out DIR] [--quick]`: the whole pipeline on the bundled sample archive, from any directory.

The sample archive (data/README.md: RetinaMNIST and PneumoniaMNIST subsets, CC BY 4.0; a CC0 H&E slide) ships inside
the wheel as `medfound/sample_data`, so the demo runs after a plain `pip install medfound`. The steps are the CLI's
own verbs (`demo_steps` lists them as argument lists; `make demo` runs exactly these): shard the three sets,
inspect them, MAE-pretrain the tiny ViT, LoRA-tune it on RetinaMNIST, evaluate, publish the backbone and the
classifier, check the card. `--quick` runs the same steps with a few optimizer steps (a smoke test, ~1 min).
"""

from __future__ import annotations

from pathlib import Path

from medfound.data.samples import SAMPLES, sample_data, shard_commands

QUICK = {"pretrain": ["trainer.max_steps=3", "trainer.log_every=1", "optim.warmup_steps=1"],
         "finetune": ["trainer.max_steps=4", "trainer.log_every=1", "optim.warmup_steps=1", "eval.bootstrap=50"]}

__all__ = ["SAMPLES", "sample_data", "shard_commands", "demo_steps", "unfinished", "prepare_out", "outputs"]


def demo_steps(out: Path, data: Path, quick: bool = False) -> list[tuple[str, list[list[str]], list[Path]]]:
    """(title, [CLI argument list, ...], the files the step must leave behind) per step of the demo, writing
    everything under `out`. A step whose files are missing afterwards did not finish (stopped by SIGTERM mid-way):
    the demo stops there instead of running the next step on nothing."""
    s = out / "shards"
    sets = [str(s / n) for n in ("retinamnist", "pneumoniamnist", "he_cmu1")]
    pretrain = ["pretrain", "demo_mae_tiny", f"data.shards=[{','.join(sets)}]",
                f"trainer.output_dir={out / 'pretrain'}", *(QUICK["pretrain"] if quick else [])]
    finetune = ["finetune", "demo_classify_lora", f"data.shards=[{sets[0]}]",
                f"backbone.weights={out / 'pretrain' / 'export'}", f"trainer.output_dir={out / 'finetune'}",
                *(QUICK["finetune"] if quick else [])]
    return [
        ("shard the bundled sample archive (data/README.md)", shard_commands(out, data),
         [Path(d) / "manifest.json" for d in sets]),
        ("inspect: verify every shard against its manifest", [["inspect", *sets]], []),
        ("MAE pretraining of a tiny ViT on all three modalities", [pretrain],
         [out / "pretrain" / "export" / "config.json"]),
        ("LoRA fine-tuning on RetinaMNIST diabetic-retinopathy grades", [finetune],
         [out / "finetune" / "export" / "config.json"]),
        ("evaluate on the official RetinaMNIST test split", [["evaluate", str(out / "finetune")]],
         [out / "finetune" / "eval.json"]),
        ("publish timm-loadable folders with their model cards (backbone and classifier), check the cards",
         [["publish", str(out / "pretrain"), "--out", str(out / "backbone"), "--name", "medfound-demo-vit-tiny-mae",
           "--overwrite"],
          ["publish", str(out / "finetune"), "--out", str(out / "model"), "--name",
           "medfound-demo-vit-tiny-retinamnist", "--overwrite", "--dry-run"],
          ["card", "check", str(out / "model")]],
         [out / "backbone" / "README.md", out / "model" / "README.md"]),
    ]


def unfinished(produces: list[Path]) -> str | None:
    """Why a step that exited 0 did not finish (its outputs are missing), or None."""
    missing = [p for p in produces if not p.is_file()]
    if not missing:
        return None
    run = next((p.parents[1] for p in missing if p.parent.name == "export"), None)
    last = run / "checkpoints" / "last" if run is not None else None
    if last is not None and last.is_file():
        return (f"{run} stopped before its end (SIGTERM?) at {last.read_text().strip()}, so {missing[0]} was never "
                f"written: rerun the demo (`medfound demo --overwrite`), or continue that run with "
                "trainer.resume=auto")
    return f"{missing[0]} was not written"


MARKER = ".medfound-demo"


def prepare_out(out: Path, overwrite: bool) -> None:
    """An empty or new --out; an earlier demo folder (it holds MARKER) is replaced with `overwrite`; anything else
    is refused, so the demo never deletes a folder it did not make."""
    import shutil

    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise FileExistsError(f"{out} exists and is not a medfound demo folder: choose another --out")
        if not overwrite:
            raise FileExistsError(f"{out} holds an earlier demo: pass --overwrite to replace it, or another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by `medfound demo`; `medfound demo --overwrite` may replace this folder\n")


def outputs(out: Path) -> str:
    return "\n".join([
        "Demo outputs:",
        f"  shards + manifests    {out}/shards/{{retinamnist,pneumoniamnist,he_cmu1}}/manifest.json",
        f"  pretraining run       {out}/pretrain  (config.yaml, logs/metrics.jsonl, logs/tensorboard, checkpoints/, "
        "export/)",
        f"  fine-tuning run       {out}/finetune  (same layout, plus eval.json and export/adapter/)",
        f"  evaluation            {out}/finetune/eval.json, predictions.csv, report/report.md (+ PNG plots)",
        f"  published backbone    {out}/backbone  (model.safetensors, config.json, preprocessing.json, README.md card)",
        f"  published model       {out}/model     (the same + eval.json, adapter/, report/; card checked)",
        f"  load it:  python -c \"import timm; print(timm.create_model('local-dir:{out}/model', pretrained=True))\"",
    ])
