"""`medfound plan SHARDS --out RECIPE`: nnU-Net-style self-configuration (Isensee et al., Nature Methods 2021).

1. Fingerprint the training split: image sizes, voxel spacings, channels, intensities (all voxels and the
   foreground, up to 10,000 sampled voxels per image), class frequencies in the masks, the modality.
2. Derive the plan by nnU-Net's rules, simplified:
   - target spacing: the median spacing per axis; for anisotropic data (coarsest / finest > 3) the coarse axis
     takes the 10th percentile instead, so thin slices are not interpolated away;
   - normalisation: CT -> clip to the foreground's 0.5-99.5 percentiles, then z-score with the clipped
     foreground's mean and std (data-set statistics: Hounsfield units mean the same everywhere); every other
     modality -> z-score per image and channel;
   - topology: per level, pool (stride 2) only the axes still at least 8 voxels long and not coarser than twice
     the finest current spacing (anisotropic volumes are pooled in-plane first), up to 5 (3-D) or 6 (2-D)
     levels; widths 32 doubling per level, capped at 320 (3-D) or 512 (2-D); the patch is a multiple of each
     axis' total stride;
   - patch and batch: start from the median image size (after resampling), shrink the axis that is largest
     relative to the median until one sample's estimated training memory fits `memory_gb`, then take the
     largest batch (at least 2) that fits and covers no more than 5% of the data set's voxels; small data sets
     get several crops per decoded image (`crops_per_image`) so that an epoch fills at least two batches.
3. Write a segmentation recipe (MONAI U-Net, `tuning: full`) whose header lists the fingerprint, and the full
   fingerprint as JSON beside it (`RECIPE.fingerprint.json`).

The memory estimate (`estimate_memory`) counts activations kept for the backward pass: about 12 tensors of
the level's width per voxel and level with two residual units, in fp32 (measured within a factor of 2 of
peak RSS on CPU); it is a planning number, not a guarantee.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np

from medfound.config import FinetuneRecipe
from medfound.data.masks import instance_like
from medfound.data.pipeline import decode_member, shard_urls
from medfound.data.tario import tar_samples
from medfound.io import atomic_write_json, atomic_write_text

MAX_SAMPLES_PER_IMAGE = 10_000
INSTANCE_CHECKS = 8  # masks checked for instance labels when the set does not state its --mask-mode
TENSORS_PER_VOXEL = 12


def _masks_of(sample: dict) -> list[str]:
    return [k.rsplit(".", 1)[0] for k in sample if k.endswith((".png", ".npy")) and "." in k]


def fingerprint(shards: str | Path, split: str = "train", mask: Optional[str] = None, seed: int = 0) -> dict[str, Any]:
    """Statistics of a shard set's `split` that the plan is derived from (see the module docstring)."""

    urls, (manifest,) = shard_urls([shards], split)
    mask_mode = manifest.ingest.get("mask_mode")  # stated at ingest (--mask-mode)
    rng = np.random.default_rng(seed)
    shapes, spacings, channels, fg_values, all_values = [], [], set(), [], []
    counts: dict[int, int] = {}
    mask_name = mask
    n = 0
    for sample in tar_samples({"url": u} for u in urls):
        key = sample["__key__"]
        member = "png" if "png" in sample else "npy"
        image = np.asarray(decode_member(member, sample[member]))
        meta = json.loads(sample["json"]) if "json" in sample else {}
        names = _masks_of(sample)
        if mask_name is None:
            found = [m for m in ("mask", "label") if m in names]
            if not found:
                raise ValueError(f"{shards}: sample {key} has no 'mask' or 'label' member (it has "
                                 f"{', '.join(names) or 'no masks'}); pass --mask NAME")
            mask_name = found[0]
        if mask_name not in names:
            raise ValueError(f"{shards}: sample {key} has no '{mask_name}' mask (it has {', '.join(names) or 'none'}); "
                             "pass --mask with one of those")
        ext = next(k for k in sample if k.startswith(mask_name + "."))
        m = np.asarray(decode_member(ext.split(".", 1)[1], sample[ext]))
        volume = image.ndim == 3 and image.shape[-1] not in (1, 3, 4)
        spatial = image.shape if volume else image.shape[:2]
        channels.add(1 if volume or image.ndim == 2 else image.shape[-1])
        shapes.append(list(spatial))
        if meta.get("spacing_mm") and len(meta["spacing_mm"]) == len(spatial):
            spacings.append([float(s) for s in meta["spacing_mm"]])
        if mask_mode is None and n < INSTANCE_CHECKS and (why := instance_like(m if m.ndim == len(spatial)
                                                                             else m[..., 0])):
            raise ValueError(f"{shards}: sample {key}'s {mask_name} mask looks like instance labels ({why}); planned "
                             f"as they are, every id would be a class. Re-shard with `medfound shard images ... "
                             "--mask-mode instance` (or binary): both plan as foreground vs background; or "
                             "--mask-mode semantic if the values are classes")
        if mask_mode in ("binary", "instance"):  # foreground vs background, whatever the ids
            m = (m > 0).astype(np.uint8)
        values, labels = np.unique(m if m.ndim == len(spatial) else m[..., 0], return_counts=True)
        for v, c in zip(values.tolist(), labels.tolist()):
            counts[int(v)] = counts.get(int(v), 0) + int(c)
        flat = image.reshape(-1) if volume or image.ndim == 2 else image.reshape(-1, image.shape[-1]).mean(1)
        fg = flat[(m if m.ndim == len(spatial) else m[..., 0]).reshape(-1) > 0]
        for src, dest in ((fg, fg_values), (flat, all_values)):
            if src.size:
                dest.append(rng.choice(src, size=min(MAX_SAMPLES_PER_IMAGE, src.size), replace=False).astype(np.float64))
        n += 1
    if n == 0:
        raise ValueError(f"{shards} has no '{split}' samples to fingerprint")
    dims = len(shapes[0])
    if any(len(s) != dims for s in shapes):
        raise ValueError(f"{shards} mixes 2-D images and 3-D volumes; plan one kind at a time")
    fg_all = np.concatenate(fg_values) if fg_values else np.zeros(0)
    every = np.concatenate(all_values)

    def stats(v: np.ndarray) -> Optional[dict[str, float]]:
        if not v.size:
            return None
        p = np.percentile(v, [0.5, 50, 99.5])
        return {"mean": float(v.mean()), "std": float(v.std()), "p00_5": float(p[0]), "median": float(p[1]),
                "p99_5": float(p[2]), "min": float(v.min()), "max": float(v.max())}

    total = sum(counts.values())
    return {
        "shards": str(shards), "split": split, "name": manifest.name, "modality": manifest.modality, "images": n,
        "spatial_dims": dims, "channels": sorted(channels), "mask": mask_name, "mask_mode": mask_mode,
        "shapes": {"median": [int(v) for v in np.median(shapes, axis=0)], "min": np.min(shapes, axis=0).tolist(),
                   "max": np.max(shapes, axis=0).tolist()},
        "spacing": ({"median": np.median(spacings, axis=0).tolist(), "p10": np.percentile(spacings, 10, axis=0).tolist(),
                     "min": np.min(spacings, axis=0).tolist(), "max": np.max(spacings, axis=0).tolist()}
                    if len(spacings) == n else None),
        "intensity": {"foreground": stats(fg_all), "all": stats(every)},
        "classes": {str(k): {"voxels": v, "fraction": v / total} for k, v in sorted(counts.items())},
        "voxels": int(sum(int(np.prod(s)) for s in shapes)),
    }


def target_spacing(fp: dict[str, Any]) -> Optional[list[float]]:
    sp = fp["spacing"]
    if sp is None:
        return None
    median = list(sp["median"])
    if max(median) / min(median) > 3:
        axis = int(np.argmax(median))
        median[axis] = float(sp["p10"][axis])
    return [round(v, 6) for v in median]


def topology(patch: list[int], spacing: list[float], max_levels: int) -> list[list[int]]:
    """Per-level strides (one list per level, one entry per axis) by nnU-Net's pooling rule."""
    size, sp, strides = list(patch), list(spacing), []
    for _ in range(max_levels):
        finest = min(sp)
        pool = [s >= 8 and v <= 2 * finest for s, v in zip(size, sp)]
        if not any(pool):
            break
        strides.append([2 if p else 1 for p in pool])
        size = [s // 2 if p else s for s, p in zip(size, pool)]
        sp = [v * 2 if p else v for v, p in zip(sp, pool)]
    return strides


def estimate_memory(patch: list[int], strides: list[list[int]], channels: list[int]) -> float:
    """Bytes of activations one training sample keeps for the backward pass (see the module docstring)."""
    voxels = float(np.prod(patch))
    total = 0.0
    for level, width in enumerate(channels):
        total += voxels * width * TENSORS_PER_VOXEL * 4
        if level < len(strides):
            voxels /= float(np.prod(strides[level]))
    return total


def make_plan(fp: dict[str, Any], memory_gb: float = 8.0) -> dict[str, Any]:
    """The plan (patch, spacing, topology, batch, normalisation) for a fingerprint."""
    dims = fp["spatial_dims"]
    spacing = target_spacing(fp)
    scale = [s / t for s, t in zip(fp["spacing"]["median"], spacing)] if spacing else [1.0] * dims
    median = [max(1, round(n * f)) for n, f in zip(fp["shapes"]["median"], scale)]
    max_levels, cap = (5, 320) if dims == 3 else (6, 512)
    budget = memory_gb * 2 ** 30
    patch = [min(n, 512 if dims == 2 else 256) for n in median]
    sp = spacing or [1.0] * dims
    while True:
        strides = topology(patch, sp, max_levels)
        div = [int(np.prod([s[a] for s in strides])) for a in range(dims)]
        patch = [max(d, (p // d) * d) for p, d in zip(patch, div)]
        channels = [min(32 * 2 ** i, cap) for i in range(len(strides) + 1)]
        per_sample = estimate_memory(patch, strides, channels)
        if per_sample * 2 <= budget or all(p <= d for p, d in zip(patch, div)):
            break
        axis = int(np.argmax([p / n for p, n in zip(patch, median)]))
        patch[axis] = max(div[axis], patch[axis] - div[axis])
    data_cap = max(2, int(0.05 * fp["voxels"] * float(np.prod(scale)) / float(np.prod(patch))))
    batch = int(max(2, min(budget // per_sample, data_cap, 64)))
    ct = fp["modality"] == "ct"
    fg = fp["intensity"]["foreground"] or fp["intensity"]["all"]
    values = sorted(int(k) for k in fp["classes"])
    # a binary mask stored as 0/255 (or 0/1) is two classes, and so are instance masks (foreground vs background);
    # otherwise the values are the class indices
    num_classes = 2 if fp.get("mask_mode") in ("binary", "instance") or len([v for v in values if v != 0]) <= 1 \
        else max(values) + 1
    # nnU-Net samples patches with replacement; here each decoded image gives `crops_per_image` crops, enough that
    # an epoch of a small data set still fills two batches
    crops = int(min(8, max(1, math.ceil(2 * batch / fp["images"]))))
    return {
        "spatial_dims": dims, "patch_size": patch, "spacing": spacing, "median_shape_resampled": median,
        "strides": strides, "channels": channels, "batch_size": batch, "crops_per_image": crops,
        "estimated_memory_gb": round(per_sample * batch / 2 ** 30, 2), "memory_budget_gb": memory_gb,
        "intensity": "ct" if ct else "zscore",
        "clip": [round(fg["p00_5"], 3), round(fg["p99_5"], 3)] if ct else None,
        "stats": [round(fg["mean"], 3), round(max(fg["std"], 1e-6), 3)] if ct else None,
        "num_classes": num_classes,
        "foreground_fraction": 0.33,
    }


def plan_recipe(fp: dict[str, Any], plan: dict[str, Any], output_dir: str, steps: int = 5000) -> dict[str, Any]:
    """The finetune recipe (as a dict) that trains the plan."""
    dims = plan["spatial_dims"]
    strides = [s if len(set(s)) > 1 else s[0] for s in plan["strides"]]
    segment = {"mask": fp["mask"], "num_classes": plan["num_classes"], "spatial_dims": dims,
               "patch_size": plan["patch_size"], "intensity": plan["intensity"],
               "foreground_fraction": plan["foreground_fraction"], "rot90": dims == 2,
               "crops_per_image": plan["crops_per_image"]}
    if plan["spacing"] is not None:
        segment["spacing"] = plan["spacing"]
    if plan["intensity"] == "ct":
        segment.update(clip=plan["clip"], stats=plan["stats"])
    return {
        "kind": "finetune", "tuning": "full",
        "head": {"type": "unet", "channels": plan["channels"], "strides": strides, "num_res_units": 2},
        "segment": segment,
        "data": {"shards": [fp["shards"]], "train_split": fp["split"], "batch_size": plan["batch_size"],
                 "shuffle_buffer": 64},
        "optim": {"lr": 1.0e-3, "weight_decay": 1.0e-4, "warmup_steps": min(100, steps // 10)},
        "trainer": {"output_dir": output_dir, "max_steps": steps, "checkpoint_every": max(1, steps // 5),
                    "log_every": max(1, min(100, steps // 20))},
    }


def write_plan(shards: str | Path, out: str | Path, *, split: str = "train", mask: Optional[str] = None,
               memory_gb: float = 8.0, steps: int = 5000, output_dir: Optional[str] = None) -> dict[str, Any]:
    """Fingerprint `shards`, plan, validate the recipe and write it (+ the fingerprint JSON) atomically."""
    import yaml

    out = Path(out)
    fp = fingerprint(shards, split, mask)
    plan = make_plan(fp, memory_gb)
    recipe = plan_recipe(fp, plan, output_dir or f"runs/{fp['name']}_plan", steps)
    FinetuneRecipe(**recipe)  # the plan must be a valid recipe before anything is written
    sp = fp["spacing"]
    header = [
        f"Planned by `medfound plan {shards} --out {out}` (nnU-Net-style self-configuration; medfound/adapt/plan.py).",
        f"Fingerprint of '{split}': {fp['images']} images, {fp['modality']}, {fp['spatial_dims']}-D, median size "
        f"{fp['shapes']['median']}" + (f", median spacing {[round(v, 3) for v in sp['median']]} mm" if sp else ""),
        "Class voxel fractions: " + ", ".join(f"{k}: {v['fraction']:.4f}" for k, v in fp["classes"].items()),
        f"Plan: target spacing {plan['spacing']}, patch {plan['patch_size']}, {len(plan['strides'])} poolings "
        f"{plan['strides']}, batch {plan['batch_size']} (~{plan['estimated_memory_gb']} GB of {memory_gb} GB), "
        f"normalisation {plan['intensity']}" + (f" clip {plan['clip']} stats {plan['stats']}" if plan["clip"] else ""),
        f"Run: medfound finetune {out}",
    ]
    text = "".join(f"# {h}\n" for h in header) + yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None)
    atomic_write_json(out.with_suffix(".fingerprint.json"), {"fingerprint": fp, "plan": plan})
    atomic_write_text(out, text)
    return {"recipe": str(out), "fingerprint": fp, "plan": plan}
