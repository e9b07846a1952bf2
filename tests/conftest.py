"""Fixtures: real sample data sharded once per session and a tiny pretraining run.

The bundled archive in data/ (RetinaMNIST and PneumoniaMNIST subsets, a CC0 H&E slide) is always
present. Larger real data sets live in ../shared/data; tests that need them skip with the reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import DATA, ROOT, tiny_pretrain_overrides

os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> dict[str, Path]:
    """The bundled archive sharded as `make demo` does (smaller shards so sets span several files)."""
    from medfound.workflows import shard

    root = tmp_path_factory.mktemp("shards")
    out = {
        "retina": root / "retinamnist",
        "pneumonia": root / "pneumoniamnist",
        "he": root / "he_cmu1",
    }
    shard("npz", DATA / "medmnist" / "retinamnist_demo.npz", out["retina"], name="retinamnist", modality="fundus",
          label_type="ordinal", label_names=["no DR", "mild", "moderate", "severe", "proliferative"], max_count=128,
          license="CC-BY-4.0")
    shard("npz", DATA / "medmnist" / "pneumoniamnist_demo.npz", out["pneumonia"], name="pneumoniamnist",
          modality="cxr", label_names=["normal", "pneumonia"], max_count=256)
    shard("wsi", DATA / "wsi" / "CMU-1-Small-Region.svs", out["he"], name="he_cmu1", modality="pathology", mpp=1.0,
          tile_size=64, min_tissue=0.5, keep_names=True, max_count=64)
    return out


@pytest.fixture(scope="session")
def pretrained(shards, tmp_path_factory) -> Path:
    """A tiny MAE pretraining run (a few steps) whose export fine-tuning tests start from."""
    from medfound.config import load_recipe
    from medfound.workflows import run_pretrain

    out = tmp_path_factory.mktemp("runs") / "pretrain"
    recipe = load_recipe(ROOT / "pretrain" / "demo_mae_tiny.yaml", tiny_pretrain_overrides(shards, out, steps=3))
    run_pretrain(recipe)
    return out


@pytest.fixture(scope="session")
def finetuned(shards, pretrained, tmp_path_factory) -> Path:
    """A tiny LoRA fine-tuning run on RetinaMNIST from the tiny pretraining export (export + eval.json)."""
    from medfound.config import load_recipe
    from medfound.workflows import run_finetune

    from helpers import tiny_finetune_overrides

    out = tmp_path_factory.mktemp("runs") / "finetune"
    recipe = load_recipe(ROOT / "adapt" / "demo_classify_lora.yaml",
                         tiny_finetune_overrides(shards, pretrained / "export", out, steps=4))
    run_finetune(recipe)
    return out


@pytest.fixture(scope="session")
def seg_shards(tmp_path_factory) -> dict[str, Path]:
    """Bundled segmentation data sharded: CT slices with aorta masks (2-D: 2 train, 1 test, 8-bit PNG) and a
    breast MRI volume with its lesion label (3-D, 45x120x21 at 0.66x0.66x2.1 mm; split train)."""
    from medfound.workflows import shard

    root = tmp_path_factory.mktemp("seg_shards")
    out = {"ct": root / "ct_aorta", "volume": root / "breast"}
    shard("images", DATA / "ct_organs", out["ct"], table=DATA / "ct_organs" / "aorta.csv", name="ct_aorta",
          modality="ct", keep_names=True)
    shard("volumes", DATA / "volumes", out["volume"], name="breast", modality="mr", keep_names=True,
          split_fractions={"train": 1.0})
    return out
