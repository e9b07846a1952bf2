"""`medfound plan`: fingerprints and nnU-Net-style plans on real data (anisotropic MRI, DRIVE, CT slices)."""

from __future__ import annotations

import json

import pytest
import yaml

from medfound.adapt.plan import estimate_memory, fingerprint, make_plan, topology, write_plan
from medfound.config import load_recipe

from helpers import shared


def test_topology_pools_in_plane_first_on_anisotropic_volumes():
    strides = topology([192, 192, 40], [0.78, 0.78, 3.0], max_levels=5)
    assert strides[0] == [2, 2, 1]  # z is ~4x coarser: only in-plane until the spacings meet
    assert strides[1] == [2, 2, 1] or strides[1] == [2, 2, 2]
    assert all(s == [2, 2] for s in topology([512, 512], [1.0, 1.0], 6)) and len(topology([512, 512], [1, 1], 6)) == 6
    assert topology([8, 8], [1.0, 1.0], 5) == [[2, 2]]  # stops while the map is still >= 4 voxels


def test_memory_estimate_scales_with_patch_and_width():
    small = estimate_memory([64, 64], [[2, 2]], [32, 64])
    assert estimate_memory([128, 128], [[2, 2]], [32, 64]) == pytest.approx(4 * small)
    assert small == pytest.approx((64 * 64 * 32 + 32 * 32 * 64) * 12 * 4)


def test_plan_on_the_anisotropic_brain_volumes(tmp_path):
    from medfound.workflows import shard

    shard("volumes", shared("volumes"), tmp_path / "vol", name="volumes", modality="mr", keep_names=True,
          split_fractions={"train": 1.0})
    fp = fingerprint(tmp_path / "vol")
    assert fp["spatial_dims"] == 3 and fp["images"] == 3 and fp["mask"] == "label"
    assert fp["spacing"]["median"] == pytest.approx([0.78125, 0.78125, 6.5])
    plan = make_plan(fp, memory_gb=8)
    assert plan["spacing"][:2] == pytest.approx([0.78125, 0.78125])
    assert plan["spacing"][2] < 6.5  # anisotropic: the thick axis takes the 10th percentile (nnU-Net)
    assert plan["strides"][0] == [2, 2, 1] and plan["intensity"] == "zscore" and plan["num_classes"] == 2
    assert plan["estimated_memory_gb"] <= 8 and plan["batch_size"] >= 2
    assert all(p % d == 0 for p, d in zip(plan["patch_size"], [
        __import__("math").prod(s[a] for s in plan["strides"]) for a in range(3)]))
    tighter = make_plan(fp, memory_gb=1)
    assert __import__("math").prod(tighter["patch_size"]) < __import__("math").prod(plan["patch_size"])


def test_plan_on_drive_writes_a_valid_recipe(tmp_path):
    from medfound.workflows import shard

    drive = shared("drive")
    rows = ["path,mask,fov,split"] + [
        f"training/images/{n}_training.tif,training/1st_manual/{n}_manual1.gif,training/mask/{n}_training_mask.gif,train"
        for n in (21, 22, 23)]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    shard("images", drive, tmp_path / "drive", table=tmp_path / "t.csv", name="drive", modality="fundus")
    out = tmp_path / "plan.yaml"
    result = write_plan(tmp_path / "drive", out, memory_gb=4, steps=100)
    fp, plan = result["fingerprint"], result["plan"]
    assert fp["spatial_dims"] == 2 and fp["channels"] == [3] and fp["spacing"] is None
    assert plan["num_classes"] == 2  # vessels stored as 0/255
    assert 0.05 < fp["classes"]["255"]["fraction"] < 0.2  # vessels are ~9-13% of a DRIVE image
    recipe = load_recipe(out)
    assert recipe.head.type == "unet" and recipe.segment.patch_size == plan["patch_size"]
    assert recipe.segment.intensity == "zscore" and recipe.trainer.max_steps == 100
    assert out.read_text().startswith("# Planned by `medfound plan")
    assert json.loads(out.with_suffix(".fingerprint.json").read_text())["plan"] == plan


def test_plan_for_ct_clips_and_normalises_with_data_set_statistics(seg_shards, tmp_path):
    out = tmp_path / "ct.yaml"
    plan = write_plan(seg_shards["ct"], out)["plan"]
    assert plan["intensity"] == "ct" and plan["clip"][0] < plan["clip"][1]
    recipe = yaml.safe_load(out.read_text())
    assert recipe["segment"]["clip"] == plan["clip"] and recipe["segment"]["stats"] == plan["stats"]
    with pytest.raises(ValueError, match="--mask"):
        write_plan(seg_shards["ct"], tmp_path / "x.yaml", mask="organ")


def test_plan_cli(seg_shards, tmp_path):
    from medfound.cli import main

    assert main(["plan", str(seg_shards["volume"]), "--out", str(tmp_path / "p.yaml"), "--steps", "2",
                 "--output-dir", str(tmp_path / "run")]) == 0
    assert load_recipe(tmp_path / "p.yaml").segment.spatial_dims == 3


def test_a_planned_recipe_trains_and_evaluates(seg_shards, tmp_path):
    from medfound.workflows import run_finetune

    write_plan(seg_shards["volume"], tmp_path / "p.yaml", memory_gb=0.5, steps=2, output_dir=str(tmp_path / "run"))
    recipe = load_recipe(tmp_path / "p.yaml", ["eval.split=train", "trainer.progress=false", "trainer.loggers=[]"])
    assert recipe.segment.spacing is not None and recipe.head.strides
    summary = run_finetune(recipe)
    assert summary["step"] == 2 and "dice" in summary["eval"]
    assert recipe.segment.crops_per_image * 1 >= 2 * recipe.data.batch_size  # one volume must fill the batches
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["per_class"]["foreground"]["hd95_excluded"] >= 0
