"""Which `data.*` and `eval.*` keys each task kind reads, so a recipe that sets one it ignores fails at validation.

This is the torch-free half of a task kind (the behaviour is `medfound.tasks`): the recipe validator rejects, before
any work starts, a key the run's task would silently ignore, naming the key and why. A key counts as set when it
differs from its default, so a resolved `config.yaml` (which spells out every default) still loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from medfound.config.data import AUGMENT_KEYS, AUGMENT_READS

IMAGE_STREAM = frozenset({"shards", "train_split", "eval_split", "batch_size", "num_workers", "shuffle_buffer",
                          "resampled", "global_order", "weights", "samples_per_epoch", "max_bad_fraction", "verify",
                          "balanced_sampling", "stain_normalize", "window", "mean", "std"})
FRACTIONS = frozenset({"train_fraction", "train_shots", "fraction_seed"})  # labelled training subsets (fine-tuning)
IMAGE_TRANSFORM = frozenset({"img_size", "augment", "fundus_crop", "hed_sigma", "crop_scale", "multicrop",
                             "spacing_mm"})
SPACING_WHY = ("segmentation resamples its images with segment.mpp / segment.fov_diameter / segment.scale (2-D) "
               "and segment.spacing (volumes)")
NO_CLASS_BALANCE = (False, "site")


@dataclass(frozen=True)
class TaskKeys:
    """The keys one task kind reads (`data`, `eval`), the values it accepts where it reads only some (`values`),
    and why it ignores the rest (`why`: key -> reason; `default_why` otherwise)."""

    name: str
    runs: str  # "box-prompt runs": the subject of the messages
    data: frozenset[str]
    eval: frozenset[str] = frozenset()
    values: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    why: dict[str, str] = field(default_factory=dict)
    default_why: str = ""


ALL_EVAL = frozenset({"split", "bootstrap", "seed", "interval", "min_per_class", "specificity", "external",
                      "external_split", "report", "aggregate", "every", "select", "select_split", "strict_scale"})
CLASS_INTERVALS = frozenset({"interval", "min_per_class"})  # classification / MIL intervals (segmentation: images)

TASK_KEYS: dict[str, TaskKeys] = {t.name: t for t in (
    TaskKeys("pretrain", "pretraining runs", IMAGE_STREAM | IMAGE_TRANSFORM, values={
        "balanced_sampling": NO_CLASS_BALANCE}, why={
        "eval_batch_size": "pretraining has no evaluation",
        "balanced_sampling": "pretraining has no labels to balance: use 'site' or false",
        **{k: "pretraining uses no labels and reads the whole split" for k in FRACTIONS}}),
    TaskKeys("classification", "classification runs", IMAGE_STREAM | IMAGE_TRANSFORM | FRACTIONS |
             {"eval_batch_size"}, ALL_EVAL),
    TaskKeys("segmentation", "segmentation runs", IMAGE_STREAM | FRACTIONS,
             ALL_EVAL - {"specificity", "aggregate"} - CLASS_INTERVALS | {"tta_scales"}, values={
        "balanced_sampling": NO_CLASS_BALANCE}, why={
        "img_size": "crops are segment.patch_size", "spacing_mm": SPACING_WHY,
        "eval_batch_size": "evaluation slides a window over one image at a time",
        "balanced_sampling": "it draws single-label classes equally often and masks have no image class (for rare "
                             "structures raise segment.foreground_fraction); 'site' balances sites",
        "specificity": "there is no ROC operating point in segmentation",
        "interval": "Dice and HD95 intervals are percentile intervals over images",
        "min_per_class": "intervals are over images, not classes",
        "aggregate": "images are scored one by one"},
        default_why="training augmentation is set in the segment section (flips, rot90, intensity_jitter)"),
    TaskKeys("box_prompt", "box-prompt runs", IMAGE_STREAM | FRACTIONS | {"img_size"},
             ALL_EVAL - {"specificity", "aggregate", "strict_scale"} - CLASS_INTERVALS,
             values={"balanced_sampling": NO_CLASS_BALANCE}, why={
        "eval_batch_size": "evaluation predicts one image and box at a time",
        "spacing_mm": "the box-prompt window is cut around the structure at head.img_size",
        "balanced_sampling": "a sample's label names its structure, not a class to balance; 'site' balances sites",
        "specificity": "there is no ROC operating point for box prompts",
        "interval": "Dice and HD95 intervals are percentile intervals over images",
        "min_per_class": "intervals are over images, not classes",
        "aggregate": "images are scored one by one",
        "strict_scale": "a box prompt is cut around its structure at head.img_size: no scale check"},
        default_why="training augmentation is head.augment (windows around the structure, flips, intensity jitter)"),
    TaskKeys("mil", "MIL runs", frozenset({"shards", "train_split", "eval_split", "batch_size", "eval_batch_size",
                                           "balanced_sampling"}) | FRACTIONS, ALL_EVAL - {"aggregate", "strict_scale"},
             values={"balanced_sampling": (False, True, "class")}, why={
        "balanced_sampling": "slides have no site-balanced sampler (sites are reported per site in evaluation)",
        "aggregate": "the unit is already the slide",
        "strict_scale": "bags are tile features of a backbone: the tiles' um/px is fixed at extraction"},
        default_why="they train on stored tile features, not images: image settings apply when extracting the "
                    "bags (`medfound extract`)"),
)}


def unused_key_errors(task: str, data: Any, eval: Any = None) -> list[str]:
    """One message per `data.*` / `eval.*` key set (different from its default) that `task` does not read."""
    spec = TASK_KEYS[task]
    errors = []
    for section, model, read in (("data", data, spec.data), ("eval", eval, spec.eval)):
        if model is None:
            continue
        for key in type(model).model_fields:
            value = getattr(model, key)
            if key in read:
                allowed = spec.values.get(key)
                if allowed is None or any(value == a and type(value) is type(a) for a in allowed):
                    continue
            elif _is_default(model, key):
                continue
            why = spec.why.get(key, spec.default_why)
            errors.append(f"{spec.runs} do not use {section}.{key}={_shown(value)!r}" + (f": {why}" if why else "")
                          + "; remove it from the recipe")
    return errors + _preset_key_errors(spec, data)


def _preset_key_errors(spec: TaskKeys, data: Any) -> list[str]:
    """A key only some augment presets read (data.multicrop, data.hed_sigma, data.crop_scale), set under a preset
    that ignores it: the run would train without it and nothing would say so."""
    augment = getattr(data, "augment", None)
    if data is None or "augment" not in spec.data or augment not in AUGMENT_READS:
        return []
    errors = []
    for key in sorted(AUGMENT_KEYS & spec.data - AUGMENT_READS[augment]):
        if _is_default(data, key):
            continue
        readers = ", ".join(p for p, keys in AUGMENT_READS.items() if key in keys)
        errors.append(f"data.augment={augment!r} does not use data.{key}={_shown(getattr(data, key))!r} (read with "
                      f"augment {readers}); remove it from the recipe or set data.augment")
    return errors


def _is_default(model: Any, key: str) -> bool:
    return getattr(model, key) == type(model).model_fields[key].get_default(call_default_factory=True)


def _shown(value: Any) -> Any:
    return value.model_dump() if hasattr(value, "model_dump") else value
