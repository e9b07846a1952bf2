"""Gated-attention MIL: padding invariance, attention, gradients; bags from real slides; the MIL run end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medfound.adapt.heads.mil import GatedAttentionMIL


def _head(seed: int = 0) -> GatedAttentionMIL:
    torch.manual_seed(seed)
    return GatedAttentionMIL(in_dim=12, num_classes=3, hidden_dim=16, attention_dim=8, dropout=0.0).eval()


def test_a_padded_bag_gives_the_same_output_as_the_bag_alone():
    head = _head()
    torch.manual_seed(1)
    bag = torch.randn(1, 5, 12)
    other = torch.randn(1, 9, 12)
    alone_logits, alone_att = head(bag)
    junk = torch.full((1, 4, 12), float("nan"))  # padding may hold anything, even NaN
    junk[0, 0] = 1e6
    feats = torch.cat([torch.cat([bag, junk], 1), other], 0)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, :5] = True
    mask[1] = True
    logits, att = head(feats, mask)
    torch.testing.assert_close(logits[0], alone_logits[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(att[0, :5], alone_att[0], rtol=0, atol=1e-6)
    assert torch.all(att[0, 5:] == 0) and torch.isfinite(logits).all()
    torch.testing.assert_close(logits[1], head(other)[0][0], rtol=0, atol=1e-6)  # the other bag is unaffected too


def test_attention_is_a_distribution_over_the_real_tiles_and_permutation_invariant():
    head = _head()
    x = torch.randn(3, 7, 12)
    logits, att = head(x)
    torch.testing.assert_close(att.sum(1), torch.ones(3))
    perm = torch.randperm(7)
    logits_p, att_p = head(x[:, perm])
    torch.testing.assert_close(logits_p, logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(att_p, att[:, perm], rtol=0, atol=1e-6)


def test_attention_follows_the_gated_formula_of_ilse_et_al():
    head = _head()
    x = torch.randn(1, 4, 12)
    h = head.embed(x)
    score = head.attention_w(torch.tanh(head.attention_v(h)) * torch.sigmoid(head.attention_u(h))).squeeze(-1)
    a = torch.softmax(score, 1)
    expected = head.classifier((a[..., None] * h).sum(1))
    logits, att = head(x)
    torch.testing.assert_close(att, a)
    torch.testing.assert_close(logits, expected)


def test_backward_reaches_every_parameter_and_bad_bags_are_named():
    from helpers import assert_gradients_only_where_trainable

    head = _head()
    head.train()
    mask = torch.tensor([[True, True, False], [True, True, True]])
    head(torch.randn(2, 3, 12), mask)[0].sum().backward()
    assert_gradients_only_where_trainable(head, "abmil")
    with pytest.raises(ValueError, match="no tiles"):
        head(torch.randn(1, 3, 12), torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="same backbone"):
        head(torch.randn(1, 3, 7))


def test_extract_writes_a_bag_per_slide_from_real_tiles(bags):
    from safetensors.torch import load_file

    from medfound.data.bags import read_bags

    index = read_bags(bags)
    (slide,) = index["slides"]
    assert slide["slide"] == "CMU-1-Small-Region" and slide["label"] == 0 and slide["split"] == "train"
    tensors = load_file(str(bags / slide["file"]))
    assert tensors["features"].shape == (slide["tiles"], index["backbone"]["feature_dim"])
    assert tensors["coords"].shape == (slide["tiles"], 2) and tensors["coords"].dtype == torch.int64
    assert torch.isfinite(tensors["features"]).all() and slide["tiles"] > 10
    # tiles of 32 px at 4 µm/px from a 0.499 µm/px scan cover ~256 level-0 px and lie on that grid
    assert slide["tile_extent"] == round(32 * 4.0 / 0.499)
    assert len({tuple(c) for c in tensors["coords"].tolist()}) == slide["tiles"]
    from PIL import Image
    thumb = Image.open(bags / slide["thumbnail"])
    assert max(thumb.size) <= 1024 and index["backbone"]["sha256"] and index["label_schema"]["type"] == "binary"


def test_extract_refuses_tiles_without_coordinates(shards, pretrained, tmp_path):
    from medfound.adapt.extract import extract_bags

    with pytest.raises(ValueError, match="shard wsi"):
        extract_bags(shards["retina"], pretrained / "export", tmp_path / "bags")


def test_bag_loader_pads_batches_and_caps_tiles(tmp_path):
    from medfound.data.bags import BAGS_FORMAT, bag_loader, save_bag

    slides = []
    for i, n in enumerate((3, 8, 5)):
        save_bag(tmp_path / f"s{i}.safetensors", np.full((n, 4), i, dtype=np.float32), np.zeros((n, 2), np.int64))
        slides.append({"slide": f"s{i}", "label": i % 2, "split": "train", "site": None, "tiles": n,
                       "file": f"s{i}.safetensors"})
    (tmp_path / "bags.json").write_text(json.dumps({"format": BAGS_FORMAT, "slides": slides, "label_schema":
                                                    {"type": "binary", "names": ["a", "b"]}}))
    (batch,) = list(bag_loader(tmp_path, "train", 3, train=False))
    assert batch["features"].shape == (3, 8, 4) and batch["mask"].sum(1).tolist() == [3, 8, 5]
    assert batch["label"].tolist() == [0, 1, 0]
    capped = list(bag_loader(tmp_path, "train", 3, train=True, max_tiles=4))[0]
    assert capped["features"].shape[1] == 4 and capped["mask"].sum(1).max() == 4
    orders = [[b["key"] for b in bag_loader(tmp_path, "train", 1, train=True, epoch=e)] for e in (0, 0, 1)]
    assert orders[0] == orders[1] and sorted(sum(orders[0], [])) == ["s0", "s1", "s2"]  # seeded by epoch
    with pytest.raises(ValueError, match="no 'test' slides"):
        list(bag_loader(tmp_path, "test", 1, train=False))


def test_h5_bags_need_h5py_and_say_so(tmp_path):
    from medfound.data.bags import save_bag

    try:
        import h5py  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install h5py"):
            save_bag(tmp_path / "a.h5", np.zeros((2, 3), np.float32), np.zeros((2, 2), np.int64))
    else:
        from medfound.data.bags import load_bag
        save_bag(tmp_path / "a.h5", np.ones((2, 3), np.float32), np.zeros((2, 2), np.int64))
        assert load_bag(tmp_path / "a.h5")[0].shape == (2, 3)


def test_heatmap_paints_the_most_attended_tile_red():
    from PIL import Image

    from medfound.evaluate.heatmap import attention_heatmap

    thumb = Image.new("RGB", (40, 20), (255, 255, 255))
    img = np.asarray(attention_heatmap(thumb, np.array([[0, 0], [100, 0]]), np.array([0.1, 0.9]), 100, 5.0, alpha=1.0))
    assert tuple(img[5, 25]) == (220, 0, 0) and tuple(img[5, 5]) == (0, 0, 160)
    assert tuple(img[19, 39]) == (220, 0, 0)


def test_mil_run_trains_evaluates_and_reloads(bags, tmp_path):
    """Two slides' worth of bags (the same real slide under two labels) so the head has something to separate."""
    import shutil

    import medfound
    from medfound.config import load_recipe
    from medfound.data.bags import read_bags
    from medfound.workflows import evaluate as evaluate_run
    from medfound.workflows import run_finetune

    from helpers import ROOT

    two = tmp_path / "bags"
    shutil.copytree(bags, two)
    index = read_bags(two)
    s = dict(index["slides"][0])
    feats = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(two / s["file"]))
    from safetensors.torch import save_file
    save_file({"features": -feats["features"], "coords": feats["coords"]}, str(two / "neg.safetensors"))
    index["slides"].append({**s, "slide": "negated", "label": 1, "file": "neg.safetensors"})
    (two / "bags.json").write_text(json.dumps(index))
    overrides = [f"data.shards=[{two}]", "eval.split=train", "head.hidden_dim=16", "head.attention_dim=8",
                 "head.dropout=0", "data.batch_size=2", "optim.lr=1e-2", "optim.warmup_steps=0",
                 f"trainer.output_dir={tmp_path / 'run'}", "trainer.max_steps=30", "trainer.progress=false",
                 "trainer.loggers=[]"]
    summary = run_finetune(load_recipe(ROOT / "adapt" / "uni_abmil.yaml", overrides))
    assert summary["eval"]["accuracy"] == 1.0 and summary["eval"]["auroc"] == 1.0
    again = evaluate_run(tmp_path / "run")
    assert again["metrics"] == summary["eval"]
    assert len(list((tmp_path / "run" / "heatmaps").glob("*.png"))) == 2
    assert medfound.load(tmp_path / "run").model.in_dim == \
        index["backbone"]["feature_dim"]
    from medfound.publish.check import check_card
    from medfound.workflows import publish_run
    publish_run(tmp_path / "run", tmp_path / "pub")
    assert check_card(tmp_path / "pub") == []
    reloaded = medfound.load(tmp_path / "pub")
    assert reloaded.model.in_dim == index["backbone"]["feature_dim"]
    assert "Ilse et al." in (tmp_path / "pub" / "README.md").read_text()
    assert (tmp_path / "run" / "report" / "roc.png").is_file()
    # an external bag folder and --out work for MIL too (here the same bags, all splits: a drop of exactly 0)
    ext = evaluate_run(tmp_path / "pub", external=[two], out=tmp_path / "ext")
    (entry,) = ext["external"]
    assert entry["num_samples"] == 2 and entry["drop"]["accuracy"] == 0.0 and entry["drop"]["auroc"] == 0.0
    assert (tmp_path / "ext" / "predictions.csv").read_text().count("\n") == 1 + 2 + 2
    assert len(list((tmp_path / "ext" / "heatmaps").glob("*.png"))) == 2
    from helpers import assert_matches_golden

    assert_matches_golden(ext, "mil_external", tmp_path.parent)
    # medfound predict on the raw slide: tiled as the bags were (recorded in mil.json), embedded by the recorded
    # backbone, scored by the head: the probabilities equal the evaluation's for that slide, with its heatmap
    import csv

    from medfound.cli import main

    from helpers import DATA

    slide = DATA / "wsi" / "CMU-1-Small-Region.svs"
    assert main(["predict", str(tmp_path / "pub"), str(slide), "--out", str(tmp_path / "pred")]) == 0
    (row,) = list(csv.DictReader(open(tmp_path / "pred" / "predictions.csv")))
    evaluated = {r["slide"]: r for r in summary_slides(tmp_path / "run")}
    want = evaluated[s["slide"]]["probs"]
    assert row["input"] == str(slide) and int(row["tiles"]) == s["tiles"]
    assert [float(row[f"p_{c}"]) for c in index["label_schema"]["names"]] == pytest.approx(want, abs=2e-5)
    assert (tmp_path / "pred" / row["heatmap"]).is_file()
    assert main(["predict", str(tmp_path / "pub"), str(slide), "--backbone", str(tmp_path / "run"),
                 "--out", str(tmp_path / "other")]) == 1


def test_extract_cli(bags, pretrained, tmp_path, capsys):
    from medfound.cli import main

    out = tmp_path / "bags"
    assert main(["extract", str(bags.parent / "tiles"), "--backbone", str(pretrained / "export"), "--out", str(out)]) == 0
    assert "wrote 1 bags" in capsys.readouterr().out
    assert json.loads((out / "bags.json").read_text())["digest"] == json.loads((bags / "bags.json").read_text())["digest"]
    # a rerun reuses the finished bags (same backbone sha256) and embeds nothing
    assert main(["extract", str(bags.parent / "tiles"), "--backbone", str(pretrained / "export"), "--out", str(out)]) == 0
    assert "0 slides embedded, 1 reused" in capsys.readouterr().out


def summary_slides(run):
    return json.loads((run / "eval.json").read_text())["slides"]
