"""The MAE reconstruction picture is readable: original | visible | reconstruction, enlarged to at least 160 px a
panel and labelled; `trainer.visualize_every` writes it to logs/images/ and TensorBoard's Images tab."""

from __future__ import annotations

import numpy as np

from medfound.config import load_recipe

from helpers import ROOT, tiny_pretrain_overrides


def test_mae_reconstructions_are_labelled_enlarged_and_reach_tensorboard(shards, tmp_path):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from medfound.workflows import run_pretrain

    run = tmp_path / "run"
    run_pretrain(load_recipe(ROOT / "pretrain" / "demo_mae_tiny.yaml", tiny_pretrain_overrides(shards, run, steps=2)
                             + ["trainer.visualize_every=2", "trainer.loggers=[tensorboard]"]))
    picture = Image.open(run / "logs" / "images" / "step_00000002.png")
    # 8 images of 32 px: each panel enlarged 5x to 160 px, three columns, under an 18-px white header with titles
    assert picture.size == (3 * 160, 8 * 160 + 18)
    header = np.asarray(picture.convert("L"))[:18]
    assert (header == 255).mean() > 0.8 and (header < 128).any()
    # the visible panel shows the original on 25% of the patches (the rest is blanked before the encoder)
    rows = np.asarray(picture.convert("RGB")).astype(int)[18:]
    same = (rows[:, :160] == rows[:, 160:320]).all(axis=-1).mean()
    assert 0.15 < same < 0.5
    events = EventAccumulator(str(run / "logs" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Images("images/train")] == [2]
