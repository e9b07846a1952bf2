"""Classification completed: multi-label findings, class weights, balanced sampling, binary endpoints of grades."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medfound.adapt.tasks import class_weights, endpoint, endpoint_counts
from medfound.data.manifest import LabelSchema, read_manifest

from helpers import ROOT, tiny_finetune_overrides


def test_balanced_class_weights_follow_the_sklearn_convention():
    from sklearn.utils.class_weight import compute_class_weight

    y = np.array([0] * 30 + [1] * 10 + [2] * 5)
    expected = compute_class_weight("balanced", classes=np.arange(3), y=y)
    torch.testing.assert_close(class_weights("balanced", [30, 10, 5], False), torch.tensor(expected, dtype=torch.float32))
    torch.testing.assert_close(class_weights("balanced", [10, 40], True, total=50), torch.tensor([4.0, 0.25]))
    torch.testing.assert_close(class_weights([1.0, 2.0], None, False), torch.tensor([1.0, 2.0]))
    assert class_weights(None, [1, 2], False) is None
    with pytest.raises(ValueError, match="class counts"):
        class_weights("balanced", [0, 0], False)


def test_binary_endpoint_of_grades():
    grades = LabelSchema(type="ordinal", names=["no DR", "mild", "moderate", "severe", "proliferative"])
    assert endpoint(grades, 2) == LabelSchema(type="binary", names=["below moderate", "moderate or worse"])
    assert endpoint(grades, None) is grades
    assert endpoint_counts([10, 5, 3, 2, 1], 2) == [15, 6]
    with pytest.raises(ValueError, match="1..4"):
        endpoint(grades, 5)
    with pytest.raises(ValueError, match="graded"):
        endpoint(LabelSchema(type="multilabel", names=["a", "b"]), 1)


def test_multilabel_loss_is_weighted_sigmoid_bce():
    from medfound.adapt.tasks import ClassificationTask

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    schema = LabelSchema(type="multilabel", names=["a", "b"])
    w = torch.tensor([3.0, 0.5])
    task = ClassificationTask(model, "weight", schema, weights=w)
    x, y = torch.randn(8, 4), (torch.rand(8, 2) > 0.5).float()
    out = task({"image": x, "label": y})
    expected = F.binary_cross_entropy_with_logits(model(x), y, pos_weight=w)
    torch.testing.assert_close(out["loss"], expected)


def test_weighted_cross_entropy_and_endpoint_labels_in_the_task():
    from medfound.adapt.tasks import ClassificationTask

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    schema = LabelSchema(type="binary", names=["below moderate", "moderate or worse"])
    task = ClassificationTask(model, "weight", schema, weights=torch.tensor([1.0, 4.0]), threshold=2)
    x, grades = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 4, 1])
    out = task({"image": x, "label": grades})
    expected = F.cross_entropy(model(x), (grades >= 2).long(), weight=torch.tensor([1.0, 4.0]))
    torch.testing.assert_close(out["loss"], expected)


def test_balanced_sampling_draws_classes_equally_often(shards):
    from medfound.data.pipeline import Decoding, TrainOrder, balanced_keep, make_loader, shard_sets

    sets, (m,) = shard_sets([shards["retina"]], "train")
    counts = m.class_counts("train")
    keep = balanced_keep(counts)
    assert keep[int(np.argmin(counts))] == 1.0 and min(keep) == pytest.approx(min(counts) / max(counts))
    seen = np.zeros(5)
    for epoch in range(4):
        for batch in make_loader(sets, Decoding(lambda s: {"image": torch.zeros(3, 2, 2)}, labelled=True),
                                 batch_size=50, order=TrainOrder(epoch=epoch, class_keep=keep), drop_last=False):
            seen += np.bincount(batch["label"].numpy(), minlength=5)
    share = seen / seen.sum()
    assert np.all(np.abs(share - 0.2) < 0.06), share  # raw shares are 0.46 / 0.13 / 0.19 / 0.16 / 0.06
    with pytest.raises(ValueError, match="two classes"):
        balanced_keep([5, 0])


def test_multilabel_npz_ingest(findings_shards):
    m = read_manifest(findings_shards)
    assert m.label_schema == LabelSchema(type="multilabel", names=["any_dr", "referable_dr"])
    with np.load(ROOT / "data" / "medmnist" / "retinamnist_demo.npz") as z:
        grades = z["train_labels"].reshape(-1)
    assert m.class_counts("train") == [int((grades >= 1).sum()), int((grades >= 2).sum())]


def test_multilabel_npz_ingest_errors(tmp_path):
    from medfound.data.ingest.npz import read_npz

    np.savez(tmp_path / "a.npz", train_images=np.zeros((2, 4, 4), np.uint8), train_labels=np.array([[0, 2], [1, 0]]))
    with pytest.raises(ValueError, match="0/1"):
        list(read_npz(tmp_path / "a.npz").samples)
    np.savez(tmp_path / "b.npz", train_images=np.zeros((2, 4, 4), np.uint8), train_labels=np.array([[0, 1], [1, 0]]))
    with pytest.raises(ValueError, match="2 findings per image but 3"):
        read_npz(tmp_path / "b.npz", label_names=["a", "b", "c"])


def test_multilabel_finetune_reports_per_finding_auroc(findings_shards, pretrained, tmp_path):
    from medfound.config import load_recipe
    from medfound.workflows import run_finetune

    overrides = tiny_finetune_overrides({"findings": findings_shards}, pretrained / "export", tmp_path / "run", 4,
                                        "findings") + ["head.class_weights=balanced"]
    summary = run_finetune(load_recipe(ROOT / "adapt" / "demo_classify_lora.yaml", overrides))
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert report["label_type"] == "multilabel" and set(report["per_class"]) == {"any_dr", "referable_dr"}
    assert summary["eval"]["auroc"] is not None and "auprc" in report["metrics"] and "auprc" in report["definitions"]
    cfg = json.loads((tmp_path / "run" / "export" / "config.json").read_text())
    assert cfg["label_names"] == ["any_dr", "referable_dr"]
    assert "sigmoid" in cfg["medfound"]["objective"]


def test_balanced_sampling_of_multilabel_data_points_to_class_weights(findings_shards, pretrained, tmp_path):
    from medfound.config import load_recipe
    from medfound.workflows import run_finetune

    overrides = tiny_finetune_overrides({"findings": findings_shards}, pretrained / "export", tmp_path / "run", 2,
                                        "findings") + ["data.balanced_sampling=true"]
    with pytest.raises(ValueError, match="class_weights=balanced"):
        run_finetune(load_recipe(ROOT / "adapt" / "demo_classify_lora.yaml", overrides))


def test_positive_class_names_which_class_sensitivity_and_auprc_follow():
    """Column 0 as the positive class gives exactly the metrics of the flipped problem with column 1 positive."""
    from medfound.evaluate.metrics import classification_metrics, positive_index

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 200)
    p1 = np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.25, 200), 0.01, 0.99)
    probs = np.stack([1 - p1, p1], 1)
    first = classification_metrics(probs, y, "binary", ["malignant", "benign"], positive=0)
    flipped = classification_metrics(probs[:, ::-1].copy(), 1 - y, "binary", ["benign", "malignant"], positive=1)
    for k in ("auroc", "auprc", "sensitivity", "specificity", "sens_at_spec", "ece", "accuracy"):
        assert first["metrics"][k] == pytest.approx(flipped["metrics"][k], abs=1e-9), k
    assert first["metrics"]["auprc"] == first["per_class"]["malignant"]["auprc"]
    default = classification_metrics(probs, y, "binary", ["malignant", "benign"])
    assert default["metrics"]["sensitivity"] == pytest.approx(first["metrics"]["specificity"])
    assert default["metrics"]["auprc"] != pytest.approx(first["metrics"]["auprc"])
    assert first["operating_point"]["positive_class"] == "malignant"
    assert positive_index(["malignant", "benign"], "malignant") == 0
    with pytest.raises(ValueError, match="not a class name; the classes are"):
        positive_index(["malignant", "benign"], "cancer")
    with pytest.raises(ValueError, match="applies to binary tasks"):
        positive_index(["a", "b", "c"], "a")


def test_a_run_with_positive_class_reports_it_and_refuses_an_unknown_name(shards, pretrained, tmp_path):
    from medfound.config import load_recipe
    from medfound.workflows import run_finetune

    from helpers import ROOT, tiny_finetune_overrides

    base = tiny_finetune_overrides(shards, pretrained / "export", tmp_path / "run", steps=2, key="pneumonia")
    recipe = load_recipe(ROOT / "adapt" / "demo_classify_lora.yaml", base + ["head.positive_class=normal",
                                                                              "eval.bootstrap=20"])
    run_finetune(recipe)
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert report["positive_class"] == "normal" and report["operating_point"]["positive_class"] == "normal"
    assert report["metrics"]["auprc"] == report["per_class"]["normal"]["auprc"]
    assert "Positive class: normal." in (tmp_path / "run" / "report" / "report.md").read_text()
    bad = load_recipe(ROOT / "adapt" / "demo_classify_lora.yaml",
                      tiny_finetune_overrides(shards, pretrained / "export", tmp_path / "bad", key="pneumonia")
                      + ["head.positive_class=Pneumonia"])
    with pytest.raises(ValueError, match=r"head.positive_class='Pneumonia' is not a class name; the classes are "
                                         r"\['normal', 'pneumonia'\]"):
        run_finetune(bad)
    assert not (tmp_path / "bad" / "checkpoints").exists()
