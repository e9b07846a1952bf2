"""Label fractions (`data.train_fraction`, `data.train_shots`): stratified by class, by patient, nested across
fractions, seeded, refused when a class would be empty, and recorded in the lineage, eval.json, report.md and the
card; the training stream holds exactly the chosen samples, and selection validates on the same fraction."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from medfound.data.fractions import choose, label_index

from helpers import ROOT, tiny_finetune_overrides


def _index(n_per_class=(300, 100, 20), patients: bool = False):
    out = []
    for c, n in enumerate(n_per_class):
        for i in range(n):
            key = f"c{c}_{i:04d}"
            out.append((key, c, f"p{c}_{i // 3}" if patients else None))
    return out


def test_fractions_are_stratified_nested_and_seeded():
    index = _index()
    names = ["a", "b", "c"]
    subsets = {f: choose(index, names, fraction=f, seed=7) for f in (0.05, 0.1, 0.5, 1.0)}
    label = {k: c for k, c, _ in index}
    for f, s in subsets.items():
        assert Counter(label[k] for k in s.keys) == {c: round(f * n) for c, n in enumerate((300, 100, 20))}
        assert s.record["per_class"]["a"] == {"chosen": round(f * 300), "of": 300}
        assert s.class_counts == [round(f * n) for n in (300, 100, 20)]
    assert subsets[0.05].keys < subsets[0.1].keys < subsets[0.5].keys < subsets[1.0].keys  # nested
    assert subsets[1.0].keys == {k for k, _, _ in index}
    again = choose(list(reversed(index)), names, fraction=0.1, seed=7)  # input order does not matter
    assert again.keys == subsets[0.1].keys and again.record["keys_sha256"] == subsets[0.1].record["keys_sha256"]
    assert choose(index, names, fraction=0.1, seed=8).keys != subsets[0.1].keys
    with pytest.raises(ValueError, match="leaves class 'c' without a training sample .*20 samples"):
        choose(index, names, fraction=0.02, seed=0)
    shots = choose(index, names, shots=4, seed=0)
    assert Counter(label[k] for k in shots.keys) == {0: 4, 1: 4, 2: 4} and shots.record["shots_per_class"] == 4
    with pytest.raises(ValueError, match="more samples of class 'c' than"):
        choose(index, names, shots=21, seed=0)


def test_a_patient_is_all_in_or_all_out():
    index = _index(patients=True)
    s = choose(index, ["a", "b", "c"], fraction=0.2, seed=1)
    assert s.record["unit"] == "patient"
    by_patient: dict[str, set] = {}
    for key, _, patient in index:
        by_patient.setdefault(patient, set()).add(key in s.keys)
    assert all(len(v) == 1 for v in by_patient.values())
    assert s.record["per_class"]["a"] == {"chosen": 20, "of": 100}  # 100 patients of class a, 20% of them


def test_multilabel_subsets_stratify_by_the_rarest_finding():
    index = [(f"k{i:03d}", (0,) if i % 10 else (0, 1), None) for i in range(200)] + \
        [(f"n{i:03d}", (), None) for i in range(50)]
    s = choose(index, ["common", "rare"], fraction=0.1, seed=0)
    assert s.record["per_class"] == {"common": {"chosen": 18, "of": 180}, "rare": {"chosen": 2, "of": 20},
                                     "none": {"chosen": 5, "of": 50}}
    assert s.class_counts == [20, 2]  # positives per finding in the subset


def test_a_fine_tuning_run_trains_and_selects_on_the_fraction(shards, pretrained, tmp_path):
    from medfound.config import load_recipe
    from medfound.data.loaders import image_train_loader, train_image_transform
    from medfound.tasks.images import image_training_data
    from medfound.workflows import run_finetune

    retina = shards["retina"]
    overrides = tiny_finetune_overrides(shards, pretrained / "export", tmp_path / "run", steps=4) + [
        "data.train_fraction=0.1", "data.fraction_seed=3", "eval.every=2", "eval.select=auroc", "eval.bootstrap=20"]
    recipe = load_recipe(ROOT / "adapt" / "demo_classify_lora.yaml", overrides)
    data = image_training_data(recipe)
    index = label_index(str(retina), "train")
    assert data.subset.record["samples"] == len(data.keys) and 40 <= len(data.keys) <= 80  # ~10% of 600
    assert data.subset.record["of_samples"] == len(index)
    loader = image_train_loader(recipe.data.model_copy(update={"batch_size": 8}), 0, data.sets, data.manifests,
                                train_image_transform(recipe.data), labelled=True, keys=data.keys)
    seen = [k for batch in loader(0) for k in batch["key"]]
    assert set(seen) <= data.keys and len(seen) >= len(data.keys) - 8  # every chosen sample, nothing else
    run_finetune(recipe)
    lineage = json.loads((tmp_path / "run" / "export" / "config.json").read_text())["medfound"]
    assert lineage["train_subset"] == data.subset.record and lineage["train_subset"]["fraction"] == 0.1
    assert lineage["selection"]["subset"]["fraction"] == 0.1  # validation on the same fraction
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert report["train_labels"]["keys_sha256"] == data.subset.record["keys_sha256"]
    assert report["selection"]["samples"] < report["selection"]["of_samples"]
    text = (tmp_path / "run" / "report" / "report.md").read_text()
    assert f"Trained on {len(data.keys)} of 600 labelled samples (0.1 of the labels; stratified by class" in text
    from medfound.publish.check import check_card
    from medfound.workflows import publish

    publish(tmp_path / "run", tmp_path / "model")
    card = (tmp_path / "model" / "README.md").read_text()
    assert f"trained on {len(data.keys)} of 600 labelled samples (0.1 of the labels" in card
    assert check_card(tmp_path / "model") == []
