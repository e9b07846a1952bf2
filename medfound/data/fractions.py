"""Training on a fraction of the labels: `data.train_fraction: 0.01` or `data.train_shots: 16` in a fine-tuning recipe.

How the subset is drawn (the label-efficiency protocol of RETFound and UNI, made reproducible):
- **units**: a patient (its token) when the samples carry patient tokens, else a sample; a patient's samples are
  all in or all out, so a 1% subset never holds half a patient;
- **stratified by class**: each class keeps `round(fraction x n_c)` of its units (at least one, else the fraction is
  refused naming the class), or `shots` of them; a unit's class is its first sample's label (multi-label: its rarest
  positive finding, or "none");
- **nested and seeded**: every unit gets a priority `sha256(seed, unit)`, and each class keeps its units with the
  lowest priorities, so for one `data.fraction_seed` the 1% subset lies inside the 10% one, which lies inside 100%,
  and a rerun draws the same keys on any machine.
The subset's record (fraction or shots, seed, unit, per-class counts, the sha256 of its sorted keys) goes into the
lineage, eval.json, report.md and the card. Only the training split is subsampled; validation-based selection
(`eval.every`) subsamples its split with the same rule, so selection never sees more labels than training, except that
every class keeps at least one validation sample (a 1% subset of a 120-image validation split would otherwise leave
classes empty and the selection metric undefined).
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Optional

# Loaded by torch-free commands (`medfound ls`, `validate`, `--help`): medfound modules that bring in torch or
# numpy are imported inside the functions that need them (tests/test_layering.py keeps it so).


@dataclass(frozen=True)
class Subset:
    """The chosen training samples (`keys`) and what the lineage and eval.json record of them."""

    keys: frozenset[str]
    record: dict[str, Any] = field(default_factory=dict)
    class_counts: Optional[list[int]] = None  # per class (multi-label: positives per finding): for class weights


def label_index(location: str, split: str) -> list[tuple[str, Any, Optional[str]]]:
    """(key, label, patient token) of every sample of `split` in the shard set at `location`, read from the tars'
    small members (labels and meta; images are not decoded), in shard order."""
    from medfound.data.pipeline import shard_urls
    from medfound.data.tario import tar_samples

    urls, _ = shard_urls([location], split)
    out = []
    for sample in tar_samples({"url": u} for u in urls):
        meta = json.loads(sample["json"]) if "json" in sample else {}
        if "cls" in sample:
            label: Any = int(sample["cls"])
        elif "labels.json" in sample:
            label = tuple(json.loads(sample["labels.json"]))
        else:
            label = None
        out.append((sample["__key__"], label, meta.get("patient")))
    return out


def _priority(seed: int, unit: str) -> bytes:
    return hashlib.sha256(f"medfound-fraction\0{seed}\0{unit}".encode()).digest()


def choose(index: list[tuple[str, Any, Optional[str]]], class_names: list[str], *, fraction: Optional[float] = None,
           shots: Optional[int] = None, seed: int = 0, what: str = "the training split",
           at_least_one: bool = False) -> Subset:
    """The subset of `index` (see the module docstring): `fraction` of each class's units, or `shots` of them.
    `at_least_one` (a validation subset for selection): a class that would get no unit gets one, so the selection
    metric stays defined, instead of the refusal a training subset gets."""
    if (fraction is None) == (shots is None):
        raise ValueError("give a fraction or a number of shots per class, not both")
    by_patient = bool(index) and all(p for _, _, p in index)
    units: dict[str, list[tuple[str, Any]]] = defaultdict(list)
    for key, label, patient in index:
        units[patient if by_patient else key].append((key, label))
    counts: dict[Any, int] = defaultdict(int)  # positives per finding, for a multi-label unit's rarest finding
    for _, label, _ in index:
        if isinstance(label, tuple):
            for c in label:
                counts[c] += 1

    def stratum(members: list[tuple[str, Any]]) -> Any:
        label = members[0][1]
        if isinstance(label, tuple):
            return min(label, key=lambda c: (counts[c], c)) if label else "none"
        return label

    classes: dict[Any, list[str]] = defaultdict(list)
    for unit, members in units.items():
        classes[stratum(members)].append(unit)
    chosen_units: list[str] = []
    per_class: dict[str, dict[str, int]] = {}

    def name(c: Any) -> str:
        return class_names[c] if isinstance(c, int) and 0 <= c < len(class_names) else str(c)

    for c in sorted(classes, key=lambda c: (str(type(c)), c)):
        ranked = sorted(classes[c], key=lambda u: _priority(seed, u))
        n = len(ranked)
        take = shots if shots is not None else round(fraction * n)
        if at_least_one:
            take = min(n, max(1, take))
        if take < 1:
            raise ValueError(f"data.train_fraction={fraction} leaves class {name(c)!r} without a training sample "
                             f"(it has {n} {'patients' if by_patient else 'samples'} in {what}; round({fraction} x "
                             f"{n}) = 0): raise the fraction, or use data.train_shots")
        if take > n and not at_least_one:
            raise ValueError(f"data.train_shots={shots} asks for more {'patients' if by_patient else 'samples'} of "
                             f"class {name(c)!r} than {what} holds ({n}): lower data.train_shots")
        chosen_units += ranked[:take]
        per_class[name(c)] = {"chosen": take, "of": n}
    keys = sorted(k for u in chosen_units for k, _ in units[u])
    class_counts = None  # per class (single-label) or positives per finding (multi-label), in the subset
    if index and all(isinstance(label, (int, tuple)) for _, label, _ in index):
        chosen = set(keys)
        tally: dict[int, int] = defaultdict(int)
        for key, label, _ in index:
            if key in chosen:
                for c in (label if isinstance(label, tuple) else (label,)):
                    tally[c] += 1
        class_counts = [tally[i] for i in range(len(class_names))]
    record = {**({"fraction": fraction} if fraction is not None else {"shots_per_class": shots}), "seed": seed,
              "unit": "patient" if by_patient else "sample", "stratified_by": "class",
              "samples": len(keys), "of_samples": len(index), "per_class": per_class,
              "keys_sha256": hashlib.sha256("\n".join(keys).encode()).hexdigest()}
    return Subset(frozenset(keys), record, class_counts)


def describe(record: dict[str, Any]) -> str:
    """One line for report.md and the card."""
    how = (f"{record['fraction']:.4g} of the labels" if "fraction" in record else
           f"{record['shots_per_class']} per class")
    return (f"{record['samples']:,} of {record['of_samples']:,} labelled samples ({how}; stratified by class, by "
            f"{record['unit']}, seed {record['seed']}; keys sha256 {record['keys_sha256'][:16]})")


def training_subset(data, location: str, split: str, class_names: list[str], validation: bool = False,
                    index: Optional[list[tuple[str, Any, Optional[str]]]] = None) -> Optional[Subset]:
    """The subset `data.train_fraction` / `data.train_shots` ask for of `split` at `location`, or None;
    `validation`: the subset selection scores (every class keeps at least one sample); `index`: the split's
    (key, label, patient) when the location is not a shard set (a bag folder's slides)."""
    if getattr(data, "train_fraction", None) is None and getattr(data, "train_shots", None) is None:
        return None
    return choose(label_index(location, split) if index is None else index, class_names,
                  fraction=data.train_fraction, shots=data.train_shots,
                  seed=data.fraction_seed, what=f"split '{split}' of {location}", at_least_one=validation)
