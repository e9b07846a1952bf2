"""`medfound bench`: the protocols against independent scikit-learn / scipy references on a synthetic separable set,
the feature cache keyed by hashes, the quick suite end to end (twice, the same numbers), and bad input named."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from medfound.evaluate.probes import knn_probs, logistic_probs, simpleshot_probs
from medfound.bench.stats import paired, score
from medfound.evaluate.probes import metric_value
from medfound.cli import main



def _separable(n=300, d=16, k=3, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (k, d))
    y = rng.integers(0, k, n)
    return centres[y] + rng.normal(0, 1, (n, d)), y


def test_knn_equals_scikit_learns_weighted_cosine_neighbours():
    from sklearn.neighbors import KNeighborsClassifier

    x, y = _separable()
    xtr, ytr, xte = x[:200], y[:200], x[200:]
    ours = knn_probs(xtr, ytr, xte, 3, k=20, temperature=0.07)
    ref = KNeighborsClassifier(n_neighbors=20, metric="cosine", algorithm="brute",
                               weights=lambda d: np.exp((1 - d) / 0.07)).fit(xtr, ytr).predict_proba(xte)
    assert np.allclose(ours, ref, atol=1e-6)
    assert metric_value("accuracy", ours, y[200:], "multiclass") > 0.9


def test_the_linear_probe_is_scikit_learns_logistic_regression_on_standardised_features():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = _separable()
    ours = logistic_probs(x[:200], y[:200], x[200:], 3, c=0.1)
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=1000)).fit(x[:200], y[:200])
    assert np.allclose(ours, ref.predict_proba(x[200:]), atol=1e-6)
    missing = logistic_probs(x[:200][y[:200] != 2], y[:200][y[:200] != 2], x[200:], 3, c=1.0)
    assert missing.shape == (100, 3) and (missing[:, 2] == 0).all()  # a class absent from training: column 0


def test_simpleshot_is_the_nearest_centroid_of_centred_normalised_features():
    from sklearn.neighbors import NearestCentroid

    x, y = _separable(seed=1)
    support = np.concatenate([np.flatnonzero(y == c)[:4] for c in range(3)])
    ours = simpleshot_probs(x[support], y[support], x, 3)
    mu = x[support].mean(0)
    norm = lambda a: (a - mu) / np.linalg.norm(a - mu, axis=1, keepdims=True)  # noqa: E731
    ref = NearestCentroid().fit(norm(x[support]), y[support]).predict(norm(x))
    assert (ours.argmax(1) == ref).all() and np.allclose(ours.sum(1), 1)


def test_paired_differences_match_scipys_paired_bootstrap():
    from scipy.stats import bootstrap

    from medfound.bench.protocols import Prediction
    from medfound.evaluate.probes import auroc

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    a = np.clip(y * 0.3 + rng.normal(0.35, 0.25, 400), 0, 1)
    b = np.clip(y * 0.2 + rng.normal(0.4, 0.25, 400), 0, 1)
    pa, pb = (Prediction("x", "s", 1.0, None, 0, np.stack([1 - p, p], 1), 400) for p in (a, b))
    sa = score(pa, y, "auroc", "binary", 1, 4000, 0)
    sb = score(pb, y, "auroc", "binary", 1, 4000, 0)
    q = paired(sa, sb)
    assert q["diff"] == pytest.approx(auroc(y, a) - auroc(y, b), abs=1e-4)
    # scipy resamples pairs without stratifying by class; the intervals of the same paired statistic agree closely
    ref = bootstrap((a, b, y), lambda u, v, t: auroc(t, u) - auroc(t, v), paired=True, vectorized=False,
                    n_resamples=4000, method="percentile", random_state=0).confidence_interval
    assert q["low"] == pytest.approx(ref.low, abs=0.012) and q["high"] == pytest.approx(ref.high, abs=0.012)
    assert q["low"] > 0 and q["p"] < 0.05


def test_features_are_cached_by_the_hashes_of_backbone_data_and_preprocessing(pretrained, shards, tmp_path):
    from medfound.bench.backbones import resolve
    from medfound.bench.features import cached_features

    export = tmp_path / "export"
    shutil.copytree(pretrained / "export", export)
    backbone = resolve(f"b={export}")
    prep = backbone.input_config()
    built = []

    def model_fn():
        built.append(1)
        return backbone.build()

    first, hit = cached_features(backbone, model_fn, str(shards["retina"]), "val", prep, tmp_path / "cache", 5,
                                 progress=False)
    assert not hit and built == [1] and first.x.shape[0] == 120
    again, hit = cached_features(backbone, model_fn, str(shards["retina"]), "val", prep, tmp_path / "cache", 5,
                                 progress=False)
    assert hit and built == [1] and np.array_equal(again.x, first.x) and again.keys == first.keys
    from safetensors.torch import load_file, save_file

    weights = load_file(str(export / "model.safetensors"))
    name = next(iter(weights))
    weights[name] = weights[name] + 1  # other weights: another backbone
    save_file(weights, str(export / "model.safetensors"))
    changed, hit = cached_features(resolve(f"b={export}"), model_fn, str(shards["retina"]), "val", prep,
                                   tmp_path / "cache", 5, progress=False)
    assert not hit and built == [1, 1] and not np.array_equal(changed.x, first.x)
    _, hit = cached_features(backbone, model_fn, str(shards["retina"]), "val", {**prep, "mean": [0.5, 0.5, 0.5]},
                             tmp_path / "cache", 5, progress=False)
    assert not hit  # another preprocessing


@pytest.mark.slow
def test_bench_quick_end_to_end_twice_the_same_numbers(pretrained, tmp_path, capsys):
    export = pretrained / "export"
    args = [f"mae={export}", f"timm:same-as:{export}", "--quick", "--cache", str(tmp_path / "cache")]
    assert main(["bench", *args, "--out", str(tmp_path / "one")]) == 0
    printed = capsys.readouterr().out
    for name in ("results.csv", "results.json", "paired.csv", "leaderboard.md",
                 "pneumoniamnist_demo_label_efficiency.png"):
        assert str(tmp_path / "one" / name) in printed
    assert main(["bench", *args, "--out", str(tmp_path / "two")]) == 0
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert one["results"] == two["results"] and one["paired"] == two["paired"]
    rows = one["results"]
    assert {r["protocol"] for r in rows} == {"knn", "linear", "fewshot"}
    assert {(r["backbone"], r["task"]) for r in rows} == {(b, t) for b in ("mae", "random:pretrain")
                                                         for t in ("pneumoniamnist_demo", "retinamnist_demo")}
    linear = [r for r in rows if r["protocol"] == "linear"]
    assert all(r["notes"]["C"] in (0.001, 0.01, 0.1, 1.0, 10.0) and r["low"] <= r["value"] <= r["high"]
               for r in linear)
    assert {(q["a"], q["b"]) for q in one["paired"]} == {("mae", "random:pretrain")}
    board = (tmp_path / "one" / "leaderboard.md").read_text()
    assert "## pneumoniamnist_demo (auroc)" in board and "Paired differences on the same test samples" in board


def test_bad_input_is_one_line_naming_it(pretrained, tmp_path, capsys):
    export = pretrained / "export"
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("x")
    cases = [
        ([f"{export}", "--quick", "--out", str(theirs)], "holds files medfound bench did not write"),
        ([str(tmp_path / "nothing"), "--quick", "--out", str(tmp_path / "o1")], "does not exist"),
        (["timm:not_a_model_xyz", "--quick", "--out", str(tmp_path / "o2")], "is not a timm architecture"),
        ([str(export), "--out", str(tmp_path / "o3")], "give --suite SUITE"),
    ]
    bad_suite = tmp_path / "bad.yaml"
    bad_suite.write_text("name: bad\ntasks:\n  - name: t\n    sample: retinamnist\nprotocols:\n  - name: knn\n"
                         "    neighbours: 5\n")
    cases.append(([str(export), "--suite", str(bad_suite), "--out", str(tmp_path / "o4")],
                  "protocols.0.knn.neighbours: Extra inputs are not permitted"))
    split_suite = tmp_path / "split.yaml"
    split_suite.write_text("name: split\ntasks:\n  - name: t\n    sample: retinamnist\n    val_split: validation\n"
                           "protocols:\n  - name: knn\n")
    cases.append(([str(export), "--suite", str(split_suite), "--out", str(tmp_path / "o5")],
                  "has no split ['validation']"))
    for argv, why in cases:
        assert main(["bench", *argv]) in (1, 2), argv
        err = capsys.readouterr().err
        assert why in err and "Traceback" not in err, (argv, err)
    assert (theirs / "notes.txt").read_text() == "x" and not (theirs / ".medfound-bench.json").exists()


@pytest.mark.slow
def test_finetuning_protocols_select_on_validation_or_fix_the_steps_in_advance(pretrained, tmp_path, capsys):
    """`lora`/`full` go through medfound finetune at the fraction; `every: null` exports the last step (no validation
    labels used), `every: N` the best look, and each row says which; rerun into the same OUT with other settings,
    a finished run is refused by name instead of reported as if it had them."""
    suite = tmp_path / "ft.yaml"
    suite.write_text("name: ft\ntasks:\n  - name: t\n    sample: pneumoniamnist\n    metric: auroc\n"
                     "fractions: [0.5]\nseeds: [0]\nbootstrap: 50\nprotocols:\n"
                     "  - name: lora\n    steps: 4\n    every: null\n    batch_size: 8\n"
                     "  - name: full\n    steps: 4\n    every: 2\n    batch_size: 8\n")
    assert main(["bench", f"mae={pretrained / 'export'}", "--suite", str(suite), "--out", str(tmp_path / "o"),
                 "--cache", str(tmp_path / "cache")]) == 0
    rows = {r["protocol"]: r for r in json.loads((tmp_path / "o" / "results.json").read_text())["results"]}
    assert rows["lora"]["notes"]["selection"] == "fixed steps" and rows["lora"]["notes"]["selected_step"] == 4
    assert rows["full"]["notes"]["selection"] == "best on validation"
    assert rows["full"]["notes"]["selected_step"] in (2, 4) and rows["full"]["notes"]["validation_value"] is not None
    ran = json.loads((tmp_path / "o" / "runs" / "t" / "mae" / "lora_f0.5_s0" / "eval.json").read_text())
    assert ran["selection"]["policy"] == "fixed steps" and ran["train_labels"]["fraction"] == 0.5
    # the same OUT with other settings: the finished runs are not reported as if they had them
    suite.write_text(suite.read_text().replace("steps: 4\n    every: null", "steps: 5\n    every: null"))
    before = (tmp_path / "o" / "results.json").read_text()
    assert main(["bench", f"mae={pretrained / 'export'}", "--suite", str(suite), "--out", str(tmp_path / "o"),
                 "--cache", str(tmp_path / "cache")]) in (1, 2)
    err = capsys.readouterr().err
    assert "lora_f0.5_s0 was run with other settings (trainer.max_steps: 4 -> 5" in err and "Traceback" not in err
    assert (tmp_path / "o" / "results.json").read_text() == before


@pytest.mark.slow
def test_a_fraction_whose_validation_subset_is_too_thin_to_select_runs_its_steps_fixed_in_advance(pretrained,
                                                                                                   tmp_path):
    """At 10% of the demo's 100 validation images (22 normal, 78 pneumonia) the selection subset holds 2 normal
    images: under min_val_per_class 5 the run trains its fixed steps and exports the last, and the row and the
    leaderboard say why; with 2, and by default (no minimum), the same fraction selects on validation."""
    rows = {}
    for least in (5, 2, None):
        suite = tmp_path / f"thin{least}.yaml"  # None: the default
        suite.write_text("name: thin\ntasks:\n  - name: t\n    sample: pneumoniamnist\n    metric: auroc\n"
                         "fractions: [0.1]\nseeds: [0]\nbootstrap: 20\nprotocols:\n"
                         "  - name: full\n    steps: 4\n    every: 2\n    batch_size: 8\n"
                         + (f"    min_val_per_class: {least}\n" if least else ""))
        assert main(["bench", f"mae={pretrained / 'export'}", "--suite", str(suite), "--out",
                     str(tmp_path / f"o{least}"), "--cache", str(tmp_path / "cache")]) == 0
        rows[least] = json.loads((tmp_path / f"o{least}" / "results.json").read_text())["results"][0]["notes"]
    assert rows[5]["selection"] == "fixed steps" and rows[5]["selected_step"] == 4
    assert "2 samples of class 'normal'" in rows[5]["fixed_steps_because"], rows[5]
    ran = json.loads((tmp_path / "o5" / "runs" / "t" / "mae" / "full_f0.1_s0" / "eval.json").read_text())
    assert ran["selection"]["policy"] == "fixed steps"
    board = (tmp_path / "o5" / "leaderboard.md").read_text()
    assert "- mae / full at fraction=0.1, seed 0: the validation subset has 2 samples of class 'normal'" in board
    for least in (2, None):
        assert rows[least]["selection"] == "best on validation" and "fixed_steps_because" not in rows[least]
        assert "steps fixed in advance" not in (tmp_path / f"o{least}" / "leaderboard.md").read_text()


@pytest.mark.slow
def test_a_sigterm_in_fine_tuning_stops_the_bench_in_one_line_and_a_rerun_continues(pretrained, tmp_path, capsys):
    """As SLURM preempts: SIGTERM during a `lora` run checkpoints it; the bench stops with one line saying so (not a
    missing eval.json), and the same command continues the run from its checkpoint and finishes."""
    import os
    import signal
    import threading
    import time

    suite = tmp_path / "ft.yaml"
    suite.write_text("name: ft\ntasks:\n  - name: t\n    sample: pneumoniamnist\n    metric: auroc\n"
                     "fractions: [0.5]\nseeds: [0]\nbootstrap: 50\nprotocols:\n"
                     "  - name: lora\n    steps: 30\n    every: null\n    batch_size: 8\n"
                     "    overrides: [trainer.log_every=1]\n")
    argv = ["bench", f"mae={pretrained / 'export'}", "--suite", str(suite), "--out", str(tmp_path / "o"),
            "--cache", str(tmp_path / "cache")]
    run = tmp_path / "o" / "runs" / "t" / "mae" / "lora_f0.5_s0"
    log = run / "logs" / "metrics.jsonl"

    def preempt():  # once the loop logs a step its SIGTERM handler is installed
        deadline = time.time() + 300
        while time.time() < deadline and not (log.is_file() and log.read_text().strip()):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=preempt, daemon=True)
    killer.start()
    assert main(argv) == 1
    killer.join()
    err = capsys.readouterr().err
    assert "stopped by SIGTERM in the fine-tuning run" in err and "run the same medfound bench command" in err, err
    assert "Traceback" not in err and not (run / "eval.json").exists() and list((run / "checkpoints").glob("step_*"))
    assert main(argv) == 0
    assert json.loads((run / "eval.json").read_text())["selection"]["selected_step"] == 30
