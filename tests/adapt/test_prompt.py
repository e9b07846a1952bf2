"""MedSAM-style box prompts: boxes from masks, the prompt encoder and two-way decoder, tuning, prediction, CLI."""

from __future__ import annotations

import csv

import json
import random

import numpy as np
import pytest
import torch

import medfound
from medfound.adapt.prompt import box_from_mask

from helpers import DATA, ROOT, assert_gradients_only_where_trainable


def _recipe(tuning: str, extra: list[str] | None = None):
    from medfound.config import load_recipe

    return load_recipe(ROOT / "adapt" / "medsam.yaml", [
        "backbone.weights=null", "backbone.name=vit_tiny_patch16_224",
        "backbone.model_args={img_size: 32, patch_size: 8, depth: 2, embed_dim: 64, num_heads: 2}",
        "data.img_size=32", "head.dim=32", "head.heads=2", "head.mlp_dim=64", f"tuning={tuning}", *(extra or [])])


def test_box_from_mask_is_the_tight_box_and_jitter_only_enlarges_it():
    m = np.zeros((50, 60), np.uint8)
    m[10:21, 30:41] = 255
    assert box_from_mask(m) == [30.0, 10.0, 40.0, 20.0]
    rng = random.Random(0)
    for _ in range(200):
        x0, y0, x1, y1 = box_from_mask(m, jitter=20, rng=rng)
        assert 10 <= x0 <= 30 and 0 <= y0 <= 10 and 40 <= x1 <= 59 and 20 <= y1 <= 40
    with pytest.raises(ValueError, match="empty"):
        box_from_mask(np.zeros((4, 4)))


def test_training_transform_scales_the_box_with_the_image():
    from medfound.adapt.prompt import build_prompt_transform

    img = np.zeros((100, 200, 3), np.uint8)
    mask = np.zeros((100, 200), np.uint8)
    mask[20:40, 100:150] = 1
    plain = build_prompt_transform(50, "mask", 0, train=True, augment=False)
    out = plain({"image": img, "masks": {"mask": mask}, "key": "k"})
    assert out["image"].shape == (3, 50, 50) and out["mask"].shape == (1, 50, 50)
    torch.testing.assert_close(out["box"], torch.tensor([100 * 50 / 200, 20 * 50 / 100, 149 * 50 / 200, 39 * 50 / 100]))
    with pytest.raises(ValueError, match="empty"):
        build_prompt_transform(50, "mask", 20, train=True)({"image": img, "masks": {"mask": mask * 0}, "key": "k"})


def test_augmented_samples_keep_the_whole_structure_inside_the_jittered_box():
    from medfound.adapt.prompt import build_prompt_transform

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (120, 90, 3), dtype=np.uint8)
    mask = np.zeros((120, 90), np.uint8)
    mask[70:100, 5:30] = 255
    transform = build_prompt_transform(48, "mask", 20, train=True)
    sizes = set()
    for _ in range(50):
        out = transform({"image": img, "masks": {"mask": mask}, "key": "k"})
        ys, xs = np.nonzero(out["mask"][0].numpy())
        x0, y0, x1, y1 = out["box"].tolist()
        assert x0 <= xs.min() + 1 and y0 <= ys.min() + 1 and x1 >= xs.max() - 1 and y1 >= ys.max() - 1
        assert 0 <= x0 and x1 <= 48 and 0 <= y0 and y1 <= 48 and 0 <= out["image"].min() <= out["image"].max() <= 1
        sizes.add(int(out["mask"].sum()))
    assert len(sizes) > 10  # the structure appears at many scales


@pytest.mark.parametrize("tuning", ["lora", "full", "linear_probe", "last_k"])
def test_every_tuning_strategy_shapes_and_gradients(tuning):
    from medfound.adapt.prompt import build_prompt_task

    torch.manual_seed(0)
    task = build_prompt_task(_recipe(tuning))
    for n, p in task.named_parameters():  # peft starts B at zero, which leaves A without gradient
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    seg = task.model
    x = torch.randn(2, 3, 32, 32)
    boxes = torch.tensor([[2.0, 3.0, 20.0, 25.0], [0.0, 0.0, 31.0, 31.0]])
    points = torch.tensor([[[5.0, 5.0], [0.0, 0.0]], [[10.0, 12.0], [20.0, 20.0]]])
    labels = torch.tensor([[1, -1], [1, 0]])
    logits = seg(x, boxes, points, labels)  # boxes and points together reach every prompt parameter
    assert logits.shape == (2, 1, 32, 32)
    mask = (torch.rand(2, 1, 32, 32) > 0.5).long()
    out = task({"image": x, "box": boxes, "mask": mask})
    (out["loss"] + logits.sum()).backward()
    assert_gradients_only_where_trainable(task, f"box_prompt/{tuning}")


def test_training_pictures_outline_the_box_over_image_truth_and_prediction():
    from medfound.adapt.prompt import build_prompt_task

    torch.manual_seed(0)
    task = build_prompt_task(_recipe("lora")).eval()
    x = torch.randn(2, 3, 32, 32)
    b = {"image": x, "box": torch.tensor([[2.0, 3.0, 20.0, 25.0], [4.0, 4.0, 28.0, 28.0]]),
         "mask": (torch.rand(2, 1, 32, 32) > 0.5).long()}
    with torch.no_grad():
        picture = task.visualize(b, task(b))
    assert picture.size == (96 * 5, 64 * 5 + 18)  # enlarged 5x (>= 160 px a panel) under a titled header
    assert tuple(np.asarray(picture)[18 + 3 * 5, (40 + 2) * 5]) == (255, 255, 0)  # the box's top edge on the truth


def test_several_boxes_over_one_image_match_one_box_at_a_time():
    from medfound.adapt.prompt import build_prompt_task

    torch.manual_seed(0)
    seg = build_prompt_task(_recipe("full")).model.eval()
    x = torch.randn(1, 3, 32, 32)
    boxes = torch.tensor([[2.0, 3.0, 20.0, 25.0], [10.0, 1.0, 30.0, 12.0], [0.0, 0.0, 31.0, 31.0]])
    with torch.no_grad():
        together = seg.decode(seg.embed(x), (32, 32), boxes)
        alone = torch.cat([seg(x, b[None]) for b in boxes])
    assert together.shape == (3, 1, 32, 32)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(together[0], together[1])  # the box matters


def test_lora_merged_equals_unmerged():
    from medfound.adapt.prompt import build_prompt_task
    from medfound.adapt.tuning import merged_segmenter

    torch.manual_seed(0)
    seg = build_prompt_task(_recipe("lora")).model.eval()
    with torch.no_grad():  # move the adapters off zero so merging has something to do
        for n, p in seg.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
        x, b = torch.randn(2, 3, 32, 32), torch.tensor([[2.0, 3.0, 20.0, 25.0], [0.0, 0.0, 31.0, 31.0]])
        torch.testing.assert_close(merged_segmenter(seg).eval()(x, b), seg(x, b), rtol=1e-5, atol=1e-5)
        assert "lora" not in " ".join(merged_segmenter(seg).state_dict())


def test_prompt_encoder_refuses_bad_prompts():
    from medfound.adapt.heads.prompt import PromptEncoder

    enc = PromptEncoder(16)
    with pytest.raises(ValueError, match="give a box or points"):
        enc((32, 32))
    with pytest.raises(ValueError, match=r"\[B, 4\]"):
        enc((32, 32), boxes=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="labels"):
        enc((32, 32), points=torch.zeros(1, 2, 2))


def test_a_trained_run_segments_the_medsam_tutorial_box_from_python_and_the_cli(organ_shards, pretrained, tmp_path,
                                                                                capsys):
    """Train briefly on the bundled CT structures, then segment MedSAM's tutorial box and a second box at once."""
    from PIL import Image

    from medfound.cli import main
    from medfound.config import load_recipe
    from medfound.workflows import publish_run, run_finetune

    overrides = [f"backbone.weights={pretrained / 'export'}", "backbone.model_args={img_size: 64}",
                 f"data.shards=[{organ_shards}]", "data.img_size=64", "data.batch_size=2", "head.dim=32",
                 "head.heads=2", "head.mlp_dim=64", f"trainer.output_dir={tmp_path / 'run'}", "trainer.max_steps=3",
                 "trainer.progress=false", "trainer.loggers=[]", "tuning=lora"]
    run_finetune(load_recipe(ROOT / "adapt" / "medsam.yaml", overrides))
    image = Image.open(DATA / "ct_organs" / "medsam_img_demo.png")
    predictor = medfound.load(tmp_path / "run")
    masks = predictor.predict(image, [[95, 255, 190, 350], [300, 100, 400, 200]])
    assert masks.shape == (2, image.height, image.width) and masks.dtype == bool
    probs = predictor.predict(image, [[95, 255, 190, 350]], return_probs=True)
    assert probs.shape == (1, image.height, image.width) and 0 <= probs.min() <= probs.max() <= 1
    with pytest.raises(ValueError, match="inside the"):
        predictor.predict(image, [[10, 10, 5, 20]])
    out = tmp_path / "cli"
    rc = main(["prompt", str(tmp_path / "run"), str(DATA / "ct_organs" / "medsam_img_demo.png"),
               "--box", "95,255,190,350", "--box", "300,100,400,200", "--out", str(out)])
    assert rc == 0 and {p.name for p in out.iterdir()} == {"mask_0.png", "mask_1.png", "overlay.png"}
    cli_mask = np.asarray(Image.open(out / "mask_0.png")) > 0
    assert (cli_mask == masks[0]).all()
    # COCO boxes with --box-format xywh give the same masks; without it, the error says so
    rc = main(["prompt", str(tmp_path / "run"), str(DATA / "ct_organs" / "medsam_img_demo.png"),
               "--box", "95,255,95,95", "--box-format", "xywh", "--out", str(tmp_path / "coco")])
    assert rc == 0 and ((np.asarray(Image.open(tmp_path / "coco" / "mask_0.png")) > 0) == masks[0]).all()
    # medfound predict --box: the same masks, per input, with predictions.csv; --boxes gives each image its own
    demo, other = DATA / "ct_organs" / "medsam_img_demo.png", tmp_path / "copy.png"
    other.write_bytes(demo.read_bytes())
    assert main(["predict", str(tmp_path / "run"), str(demo), str(other), "--box", "95,255,190,350",
                 "--box", "300,100,400,200", "--out", str(tmp_path / "pred")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "pred" / "predictions.csv")))
    assert [(r["input"], r["box"]) for r in rows] == [(str(demo), "0"), (str(demo), "1"), (str(other), "0"),
                                                      (str(other), "1")]
    for i in (0, 1, 2, 3):
        got = np.asarray(Image.open(tmp_path / "pred" / rows[i]["mask"])) > 0
        assert (got == masks[i % 2]).all() and int(rows[i]["pixels"]) == int(masks[i % 2].sum())
    (tmp_path / "boxes.csv").write_text("input,x0,y0,x1,y1\nmedsam_img_demo.png,95,255,190,350\n")
    assert main(["predict", str(tmp_path / "run"), str(demo), str(other), "--boxes", str(tmp_path / "boxes.csv"),
                 "--out", str(tmp_path / "table")]) == 0
    (row,) = list(csv.DictReader(open(tmp_path / "table" / "predictions.csv")))
    assert row["box_xyxy"] == "95,255,190,350" and row["input"] == str(demo)
    assert "input #1: no box in" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "run"), str(demo), "--out", str(tmp_path / "nobox")]) == 1
    assert "needs the boxes to segment: --box x0,y0,x1,y1" in capsys.readouterr().err
    assert main(["prompt", str(tmp_path / "run"), str(DATA / "ct_organs" / "medsam_img_demo.png"),
                 "--box", "300,100,50,60", "--out", str(tmp_path / "bad")]) == 1
    assert "COCO boxes are x, y, w, h: pass --box-format xywh" in capsys.readouterr().err
    # a decompression bomb (a PNG header claiming 30000 x 30000 pixels, built here) and a file that is no image are
    # one named line each, not a traceback
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    (tmp_path / "notes.png").write_text("not an image")
    for bad, why in ((bomb, "decompression bomb"), (tmp_path / "notes.png", "is not an image PIL can read")):
        assert main(["prompt", str(tmp_path / "run"), str(bad), "--box", "1,1,20,20", "--out",
                     str(tmp_path / "never")]) == 1
        err = capsys.readouterr().err
        assert why in err and str(bad) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "never").exists()
    # an empty mask, a colour image and a stated modality the run never saw are each named
    colour = tmp_path / "fundus.png"
    rgb = np.zeros((256, 256, 3), np.uint8)
    rgb[..., 0], rgb[..., 1] = 200, 60
    Image.fromarray(rgb).save(colour)
    assert main(["prompt", str(tmp_path / "run"), str(colour), "--box", "20,20,80,80", "--threshold", "1.0",
                 "--modality", "fundus", "--out", str(tmp_path / "warn")]) == 0
    err = capsys.readouterr().err
    assert "box 0 [20.0, 20.0, 80.0, 80.0]: the mask is empty at --threshold 1.0 (highest probability" in err
    assert "the image is fundus, but the run was trained on ct" in err
    assert "the image is in colour, but the run was trained on greyscale ct images" in err
    import timm
    timm.create_model(f"local-dir:{tmp_path / 'run' / 'export' / 'backbone'}", pretrained=True)  # reusable ViT
    assert (tmp_path / "run" / "export" / "backbone" / "adapter").is_dir()
    publish_run(tmp_path / "run", tmp_path / "pub")  # the network with its card, loadable from the folder
    from medfound.publish.check import check_card
    assert check_card(tmp_path / "pub") == []
    published = medfound.load(tmp_path / "pub").predict(image, [[95, 255, 190, 350]])
    assert (published[0] == masks[0]).all()
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    lo, hi = report["intervals"]["dice"]
    assert lo <= report["metrics"]["dice"] <= hi
    # external sets and --out work for box prompts too: the published folder scored on the organ set (all splits)
    from medfound.workflows import evaluate

    before = (tmp_path / "run" / "eval.json").read_bytes()
    with pytest.warns(UserWarning, match="is the very shard set the model was trained on"):  # and it is named so
        ext = evaluate(tmp_path / "pub", external=[organ_shards], out=tmp_path / "ext")
    assert ext["task"] == "box_prompt" and (tmp_path / "ext" / "eval.json").is_file()
    (entry,) = ext["external"]
    assert entry["num_samples"] > report["dataset"]["num_samples"] and 0 <= entry["metrics"]["dice"] <= 1
    assert entry["drop"]["dice"] == pytest.approx(entry["metrics"]["dice"] - ext["metrics"]["dice"])
    lo, hi = entry["drop_intervals"]["dice"]
    assert lo <= entry["drop"]["dice"] <= hi
    assert ext["metrics"] == report["metrics"]  # the internal split scored again from the published folder
    assert (tmp_path / "run" / "eval.json").read_bytes() == before
    from helpers import assert_matches_golden

    assert_matches_golden(ext, "box_prompt_external", tmp_path.parent)
    assert "External" in (tmp_path / "ext" / "report" / "report.md").read_text()


def test_box_windows_are_square_centred_and_padded_outside_the_image():
    from medfound.adapt.prompt import box_window, crop_padded

    assert box_window([100, 20, 149, 39], 0.25) == (-8, 87, 75)  # 50 px box side * 1.5, centred on (124.5, 29.5)
    x = torch.arange(12.0).reshape(1, 3, 4)
    out = crop_padded(x, -1, 2, 3)
    assert out.tolist() == [[[0.0, 0.0, 0.0], [2.0, 3.0, 0.0], [6.0, 7.0, 0.0]]]


def test_crop_to_box_prediction_pastes_each_window_back_into_the_image():
    from medfound.adapt.prompt import BoxPredictor, build_prompt_task

    torch.manual_seed(0)
    seg = build_prompt_task(_recipe("full", ["head.crop_to_box=0.25"])).model
    predictor = BoxPredictor(seg, 32, (0.5,) * 3, (0.25,) * 3, crop_to_box=0.25)
    image = np.random.default_rng(0).integers(0, 255, (60, 90), dtype=np.uint8)
    probs = predictor.predict(image, [[0, 0, 20, 10], [50, 30, 89, 59]], return_probs=True)
    assert probs.shape == (2, 60, 90)
    # the first box's window is 32 px square from (-11, -6): only its part inside the image is pasted
    assert (probs[0][:, 27:] == 0).all() and (probs[0][27:, :] == 0).all() and probs[0][:20, :20].max() > 0
    assert (probs[1][:, :40] == 0).all() and probs[1][30:, 50:].max() > 0
