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

FRESH_VENV_TEST = "test_medfound_demo_runs_from_the_wheel_in_a_fresh_venv_without_extras"
_fresh: dict = {}


def pytest_collection_finish(session):
    """When the fresh-venv wheel test is selected, its environment (the wheel and ~6 GB of base requirements, mostly
    disk work) is installed in a background thread from the start, so the tests before it run meanwhile."""
    if not any(item.name == FRESH_VENV_TEST for item in session.items):
        return
    import tempfile
    import threading

    from helpers import install_fresh_venv

    root = Path(tempfile.mkdtemp(prefix="medfound-fresh-venv-"))

    def install() -> None:
        try:
            _fresh["result"] = install_fresh_venv(root)
        except BaseException as e:  # reported by the test that needs it
            _fresh["error"] = e

    _fresh["root"] = root
    _fresh["thread"] = threading.Thread(target=install, name="fresh-venv", daemon=True)
    _fresh["thread"].start()


def pytest_sessionfinish(session, exitstatus):
    import shutil

    if "thread" in _fresh:
        _fresh["thread"].join(timeout=1800)
        shutil.rmtree(_fresh["root"], ignore_errors=True)  # several GB: never left in /tmp


@pytest.fixture(scope="session")
def fresh_venv() -> dict:
    """The wheel installed into a new virtual environment with its base requirements only (helpers.install_fresh_venv),
    installed in the background since the session started."""
    if "thread" not in _fresh:
        pytest.fail(f"the fresh environment is installed for {FRESH_VENV_TEST} only")
    _fresh["thread"].join(timeout=1800)
    if "error" in _fresh:
        raise _fresh["error"]
    return _fresh["result"]


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


@pytest.fixture(scope="session")
def findings_shards(tmp_path_factory) -> Path:
    """Multi-label shards on real fundus images: the bundled RetinaMNIST subset with two findings per image derived
    from its grade, "any DR" (grade >= 1) and "referable DR" (grade >= 2), stored as (N, 2) 0/1 arrays (the
    ChestMNIST layout CheXNet-style recipes read)."""
    import numpy as np

    from medfound.workflows import shard

    root = tmp_path_factory.mktemp("findings")
    with np.load(DATA / "medmnist" / "retinamnist_demo.npz") as z:
        arrays = {k: z[k] for k in z.files}
    for split in ("train", "val", "test"):
        grade = arrays[f"{split}_labels"].reshape(-1)
        arrays[f"{split}_labels"] = np.stack([grade >= 1, grade >= 2], axis=1).astype(np.uint8)
    np.savez(root / "findings.npz", **arrays)
    shard("npz", root / "findings.npz", root / "shards", name="retina_findings", modality="fundus",
          label_names=["any_dr", "referable_dr"], max_count=256)
    return root / "shards"


@pytest.fixture(scope="session")
def view_shards(tmp_path_factory) -> Path:
    """Real chest X-ray images from the bundled PneumoniaMNIST subset, listed in an images table as pairs of
    'views' (patient_id, laterality, view columns) so per-unit aggregation (McKinney-style per-breast scoring) runs
    on real pixels; the pairing itself is made up for the test."""
    import csv

    import numpy as np
    from PIL import Image

    from medfound.workflows import shard

    root = tmp_path_factory.mktemp("views")
    (root / "images").mkdir()
    with np.load(DATA / "medmnist" / "pneumoniamnist_demo.npz") as z:
        rows = []
        for split, n in (("train", 32), ("test", 24)):
            pick = np.random.default_rng(0).permutation(len(z[f"{split}_labels"]))[:n]  # both classes
            images, labels = z[f"{split}_images"][pick], z[f"{split}_labels"].reshape(-1)[pick]
            for i, (img, y) in enumerate(zip(images, labels)):
                Image.fromarray(img).save(root / "images" / f"{split}_{i}.png")
                rows.append({"path": f"images/{split}_{i}.png", "label": int(y), "patient_id": f"{split}{i // 4}",
                             "laterality": "LR"[(i // 2) % 2], "view": ("CC", "MLO")[i % 2], "split": split,
                             "spacing_mm": "12.5"})  # stated: 28 px over a chest
    with open(root / "table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    shard("images", root, root / "shards", table=root / "table.csv", name="views", modality="cxr",
          label_names=["normal", "pneumonia"], keep_names=True)
    return root / "shards"


@pytest.fixture(scope="session")
def organ_shards(tmp_path_factory) -> Path:
    """The bundled SAM-Med2D CT slices, one sample per structure mask (30: 19 train, 11 test), label = structure."""
    from medfound.workflows import shard

    out = tmp_path_factory.mktemp("organs") / "shards"
    shard("images", DATA / "ct_organs", out, table=DATA / "ct_organs" / "organs.csv", name="ct_organs",
          modality="ct", keep_names=True)
    return out


@pytest.fixture(scope="session")
def bags(pretrained, tmp_path_factory) -> Path:
    """MIL bags from the bundled CC0 slide (CMU-1-Small-Region.svs, labelled 'benign' in a binary schema), tiled at
    4 µm/px into 32-px tiles and embedded by the tiny pretraining export."""
    from medfound.adapt.extract import extract_bags
    from medfound.workflows import shard

    root = tmp_path_factory.mktemp("bags")
    (root / "slides.csv").write_text("slide,label,split\nCMU-1-Small-Region.svs,benign,train\n")
    shard("wsi", DATA / "wsi" / "CMU-1-Small-Region.svs", root / "tiles", name="cmu1", modality="pathology",
          mpp=4.0, tile_size=32, min_tissue=0.5, keep_names=True, table=root / "slides.csv",
          label_names=["benign", "malignant"])
    extract_bags(root / "tiles", pretrained / "export", root / "bags")
    return root / "bags"
