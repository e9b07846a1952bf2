"""External-site validation: an external shard set scored beside the internal test, with the drop and the
interval of the drop, in eval.json, report.md and the card; a set with another label schema is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from medfound.cli import main
from medfound.workflows import evaluate as evaluate_run

from helpers import DATA


@pytest.fixture(scope="module")
def external_run(finetuned, tmp_path_factory) -> tuple[Path, Path]:
    """A copy of the tiny fine-tuned run, and RetinaMNIST's validation images sharded as a second site."""
    from medfound.workflows import shard

    root = tmp_path_factory.mktemp("external")
    ext = root / "site_b"
    shard("npz", DATA / "medmnist" / "retinamnist_demo.npz", ext, name="retina_site_b", modality="fundus",
          label_type="ordinal", label_names=["no DR", "mild", "moderate", "severe", "proliferative"],
          site="site-B")
    run = root / "run"
    shutil.copytree(finetuned, run)
    return run, ext


def test_external_set_is_scored_beside_the_internal_split(external_run, capsys, tmp_path_factory):
    from helpers import assert_matches_golden

    run, ext = external_run
    assert main(["evaluate", str(run), str(ext)]) == 0
    assert "external retina_site_b" in capsys.readouterr().out
    report = json.loads((run / "eval.json").read_text())
    (e,) = report["external"]
    assert e["name"] == "retina_site_b" and sorted(e["splits"]) == ["test", "train", "val"] and e["num_samples"] == 1120
    assert set(e["by_site"]) == {"site-B"} and e["by_site"]["site-B"]["n"] == 1120
    for k in ("auroc", "accuracy", "kappa_quadratic", "ece"):
        assert e["drop"][k] == pytest.approx(e["metrics"][k] - report["metrics"][k])
        lo, hi = e["drop_intervals"][k]
        assert lo - 1e-4 <= e["drop"][k] <= hi + 1e-4
        # the drop's interval is wider than either set's own: both sets' sampling error adds up
        assert hi - lo > (e["intervals"][k][1] - e["intervals"][k][0]) - 1e-4
    rows = (run / "predictions.csv").read_text().splitlines()
    assert len(rows) == 1 + 400 + 1120 and rows[-1].startswith("retina_site_b,")
    md = (run / "report" / "report.md").read_text()
    assert "## External validation" in md and f"{e['drop']['auroc']:.4f}" in md
    assert (run / "report" / "roc.png").is_file()
    assert_matches_golden(report, "classification_external", tmp_path_factory.getbasetemp())


def test_external_results_reach_the_card_and_pass_the_check(external_run, tmp_path):
    from huggingface_hub import ModelCard

    from medfound.publish.check import check_card
    from medfound.workflows import publish_run

    run, ext = external_run
    evaluate_run(run, external=[ext])
    publish_run(run, tmp_path / "pub")
    assert check_card(tmp_path / "pub") == []
    text = (tmp_path / "pub" / "README.md").read_text()
    assert "### External validation" in text and "Measured on external data: auroc changes by" in text
    names = {r.dataset_name for r in ModelCard.load(tmp_path / "pub" / "README.md").data.eval_results}
    assert names == {"retinamnist", "retina_site_b"}


def test_a_published_folder_is_evaluated_into_another_folder(external_run, tmp_path, capsys):
    """`medfound evaluate MODEL_DIR EXTERNAL --out DIR`: a hospital scores a downloaded model on its own shards; the
    published folder and its checked card stay as they were."""
    from medfound.publish.check import check_card
    from medfound.workflows import publish_run

    run, ext = external_run
    evaluate_run(run)
    publish_run(run, tmp_path / "pub")
    assert main(["evaluate", str(tmp_path / "pub"), str(ext)]) == 1
    assert "give --out DIR" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "pub"), str(ext), "--out", str(tmp_path / "ours")]) == 0
    ours = json.loads((tmp_path / "ours" / "eval.json").read_text())
    assert ours["external"][0]["name"] == "retina_site_b" and (tmp_path / "ours" / "report" / "report.md").is_file()
    assert ours["metrics"] == json.loads((run / "eval.json").read_text())["metrics"]
    assert check_card(tmp_path / "pub") == [] and not (tmp_path / "pub" / "predictions.csv").exists()


def test_external_set_with_other_classes_is_refused(external_run, shards):
    run, _ = external_run
    with pytest.raises(ValueError, match="must share the label schema"):
        evaluate_run(run, external=[shards["pneumonia"]])


def test_drop_interval_of_two_known_sets():
    from medfound.evaluate.bootstrap import bootstrap_intervals, difference_interval

    rng = np.random.default_rng(0)

    def data(shift, n=300):
        y = rng.integers(0, 2, n)
        s = rng.normal(size=n) + shift * y
        return np.stack([1 - 1 / (1 + np.exp(-s)), 1 / (1 + np.exp(-s))], 1), y

    from sklearn.metrics import roc_auc_score

    def fn(p, y):
        return {"auroc": roc_auc_score(y, p[:, 1])}

    (pa, ya), (pb, yb) = data(2.0), data(0.5)  # AUROC about 0.92 and 0.64: a real drop
    a = bootstrap_intervals(pa, ya, fn, 300, seed=1, keep_values=True)
    b = bootstrap_intervals(pb, yb, fn, 300, seed=2, keep_values=True)
    lo, hi = difference_interval(b["values"]["auroc"], a["values"]["auroc"])
    assert hi < 0  # the drop is significant
    same = difference_interval(a["values"]["auroc"], bootstrap_intervals(pa, ya, fn, 300, seed=3,
                                                                        keep_values=True)["values"]["auroc"])
    assert same[0] < 0 < same[1]  # the same data against itself: no drop


def test_a_single_class_external_site_warns_and_never_crashes(external_run, tmp_path):
    """An external site that only sent healthy eyes: AUROC is undefined (null + a warning naming the set), the
    other metrics and their drops are still reported, and the report and card still render."""
    from medfound.workflows import shard

    run, _ = external_run
    with np.load(DATA / "medmnist" / "retinamnist_demo.npz") as z:
        keep = z["test_labels"][:, 0] == 0
        np.savez(tmp_path / "healthy.npz", test_images=z["test_images"][keep], test_labels=z["test_labels"][keep])
    shard("npz", tmp_path / "healthy.npz", tmp_path / "healthy", name="healthy_site", modality="fundus",
          label_type="ordinal", label_names=["no DR", "mild", "moderate", "severe", "proliferative"])
    with pytest.warns(UserWarning, match="external healthy_site' holds a single class"):
        report = evaluate_run(run, external=[tmp_path / "healthy"])
    (e,) = report["external"]
    assert e["metrics"]["auroc"] is None and e["drop"]["auroc"] is None and e["intervals"].get("auroc") is None
    assert e["metrics"]["accuracy"] is not None and e["drop_intervals"]["accuracy"] is not None
    assert any("healthy_site" in w for w in report["warnings"])
    assert "| external: healthy_site | 174 | auroc | n/a (—) | n/a (—) |" in (run / "report" / "report.md").read_text()


def test_evaluate_shows_a_progress_bar_per_set_with_images_per_second(external_run, tmp_path, monkeypatch, capsys):
    """`evaluate` ran 30-70 s without a word: it now shows one bar per scored set, as training does."""
    run, ext = external_run
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    # key=value overrides of eval.* (no intervals: this test is about the bars) and trainer.progress
    assert main(["evaluate", str(run), str(ext), "eval.bootstrap=0", "trainer.progress=true", "--out",
                 str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err.replace("\r", "\n")
    assert "evaluate test: 100%" in err and "400/400" in err and "img/s" in err
    assert "external retina_site_b: 100%" in err and "1120/1120" in err
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert "intervals" not in report and report["external"][0]["name"] == "retina_site_b"
    assert main(["evaluate", str(run), "optim.lr=1", "--out", str(tmp_path / "o2")]) == 1
    assert "would describe another model than the one trained" in capsys.readouterr().err


def test_the_training_set_given_as_an_external_site_is_named_as_such(external_run, shards, tmp_path, capsys):
    """Same manifest digest as a data set of the model's lineage: not an external site (warned in the console,
    eval.json, report.md); a genuinely other set (site_b: another manifest) is not flagged."""
    run, ext = external_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    config = copy / "config.yaml"
    config.write_text(config.read_text().replace("bootstrap: 1000", "bootstrap: 0"))  # no intervals needed here
    with pytest.warns(UserWarning, match="is the very shard set the model was trained on in fine-tuning"):
        assert main(["evaluate", str(copy), str(shards["retina"]), str(ext), "--out", str(tmp_path / "o")]) == 0
    report = json.loads((tmp_path / "o" / "eval.json").read_text())
    same, other = report["external"]
    assert same["same_as_training"] == "fine-tuning (retinamnist)" and "same_as_training" not in other
    assert any("not an external site" in w for w in report["warnings"])
    md = (tmp_path / "o" / "report" / "report.md").read_text()
    assert "external: retinamnist (the training set, not external)" in md and "not an external site" in md
