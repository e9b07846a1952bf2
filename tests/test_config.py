"""Recipe schema: strict keys, friendly typo errors, overrides, derived values, recipe lookup."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from medfound.config import ConfigError, FinetuneRecipe, PretrainRecipe, dump_recipe, find_recipe, load_recipe

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = ROOT / "pretrain" / "demo_mae_tiny.yaml"
ADAPT = ROOT / "adapt" / "demo_classify_lora.yaml"


def test_typo_names_the_key_and_the_nearest_valid_one():
    with pytest.raises(ConfigError) as e:
        load_recipe(ADAPT, ["optim.lrr=1"])
    msg = str(e.value)
    assert "unknown key 'optim.lrr'" in msg
    assert "Did you mean 'optim.lr'?" in msg
    assert str(ADAPT) in msg


def test_typo_inside_the_yaml_is_caught_too(tmp_path):
    data = yaml.safe_load(PRETRAIN.read_text())
    data["trainer"]["max_stpes"] = 3
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"unknown key 'trainer.max_stpes'. Did you mean 'trainer.max_steps'\?"):
        load_recipe(bad)


def test_top_level_typo_and_wrong_value_type():
    with pytest.raises(ConfigError, match=r"unknown key 'tunning'. Did you mean 'tuning'\?"):
        load_recipe(ADAPT, ["tunning=full"])
    with pytest.raises(ConfigError, match=r"'trainer.max_steps'"):
        load_recipe(ADAPT, ["trainer.max_steps=many"])
    with pytest.raises(ConfigError, match=r"'tuning'"):
        load_recipe(ADAPT, ["tuning=qlora"])


def test_overrides_are_typed_yaml_values():
    r = load_recipe(PRETRAIN, ["optim.betas=[0.8, 0.9]", "trainer.max_steps=7", "data.img_size=32",
                               "backbone.model_args.depth=3"])
    assert isinstance(r, PretrainRecipe)
    assert r.optim.betas == (0.8, 0.9)
    assert r.trainer.max_steps == 7
    assert r.backbone.model_args["depth"] == 3
    assert r.backbone.model_args["patch_size"] == 4  # siblings survive a nested override


def test_lr_xor_blr():
    with pytest.raises(ConfigError, match="exactly one of optim.lr"):
        load_recipe(PRETRAIN, ["optim.lr=1e-3"])
    r = load_recipe(PRETRAIN, ["optim.blr=null", "optim.lr=1e-3"])
    assert r.optim.lr == 1e-3


def test_kind_mismatch_and_bad_override_syntax():
    with pytest.raises(ConfigError, match="use `medfound finetune`"):
        load_recipe(ADAPT, expect="pretrain")
    with pytest.raises(ConfigError, match="key.path=value"):
        load_recipe(ADAPT, ["optim.lr"])


def test_resolved_config_round_trips():
    r = load_recipe(ADAPT, ["tuning=full"])
    text = dump_recipe(r, header="resolved\ncommand: x")
    assert text.startswith("# resolved\n# command: x\n")
    again = FinetuneRecipe.model_validate(yaml.safe_load(text))
    assert again == r


def test_find_recipe_by_name_and_path():
    assert find_recipe("demo_mae_tiny", "pretrain").resolve() == PRETRAIN
    assert find_recipe(str(ADAPT), "adapt") == ADAPT
    with pytest.raises(ConfigError, match="not found"):
        find_recipe("no_such_recipe", "adapt")


def test_cli_typo_fails_fast_before_any_work():
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "medfound.cli", "finetune", str(ADAPT), "optim.lrr=1"],
                          capture_output=True, text=True, cwd=ROOT)
    elapsed = time.time() - start
    assert proc.returncode == 2
    assert "optim.lrr" in proc.stderr and "optim.lr" in proc.stderr
    assert elapsed < 10, f"typo took {elapsed:.1f}s to report"


def test_recipe_errors_do_not_import_torch():
    code = ("import sys; from medfound.cli import main; rc = main(['validate', %r, 'optim.lrr=1']); "
            "sys.exit(100 if 'torch' in sys.modules else rc)" % str(ADAPT))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr


def test_listing_every_component_does_not_import_torch():
    """`medfound ls` (metrics included) lists names from the torch-free registries: it answers in well under a second
    instead of the ~10 s of importing torch."""
    code = ("import sys, io, contextlib; from medfound.cli import main; buf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf): rc = main(['ls'])\n"
            "assert 'auroc' in buf.getvalue() and 'hd95' in buf.getvalue(), buf.getvalue()[-500:]\n"
            "sys.exit(100 if 'torch' in sys.modules else rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


def test_cli_validate(capsys):
    from medfound.cli import main

    assert main(["validate", str(ADAPT), "--no-paths"]) == 0
    assert "valid finetune recipe" in capsys.readouterr().out
    assert main(["validate", "demo_mae_tiny", "trainer.seed=3", "--no-paths"]) == 0


def test_cli_validate_names_the_paths_that_do_not_exist(capsys, tmp_path, shards):
    """Issue 17, item 3: a recipe naming missing shard sets or weights is not reported as valid."""
    from medfound.cli import main

    rc = main(["validate", str(ADAPT), f"data.shards=[{tmp_path / 'nope'}]", f"backbone.weights={tmp_path / 'w'}",
               f"eval.external=[{tmp_path / 'ext'}]"])
    err = capsys.readouterr().err
    assert rc == 1 and "3 path(s) do not exist" in err
    assert f"data.shards[0]: {tmp_path / 'nope'} holds no manifest.json (`medfound shard KIND INPUT --out" in err
    assert "backbone.weights:" in err and "eval.external[0]:" in err
    assert main(["validate", str(ADAPT), f"data.shards=[{tmp_path / 'nope'}]", "--no-paths"]) == 0
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text("{}")
    assert main(["validate", str(ADAPT), f"data.shards=[{shards['retina']}]", f"backbone.weights={export}"]) == 0
    assert "every path it names exists" in capsys.readouterr().out


def test_missing_or_unknown_kind(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("kind: distill\ntrainer: {output_dir: x, max_steps: 1}\n")
    with pytest.raises(ConfigError, match="'kind' must be one of pretrain, finetune \\(got 'distill'\\)"):
        load_recipe(bad)
    bad.write_text("trainer: {output_dir: x, max_steps: 1}\n")
    with pytest.raises(ConfigError, match="must set kind: pretrain"):
        load_recipe(bad, expect="pretrain")


def test_head_warmup_steps_is_refused_where_nothing_holds_or_nothing_follows():
    from medfound.tasks.classification import TUNING_TEXT
    from medfound.tasks.images import tuning_words

    r = load_recipe(ADAPT, ["head_warmup_steps=50"])
    assert r.head_warmup_steps == 50
    assert tuning_words(r, TUNING_TEXT).endswith("after 50 steps of the head alone (LP-FT)")  # the card's stage
    assert "LP-FT" not in tuning_words(load_recipe(ADAPT), TUNING_TEXT)
    with pytest.raises(ConfigError, match="tuning=linear_probe"):
        load_recipe(ADAPT, ["head_warmup_steps=50", "tuning=linear_probe"])
    with pytest.raises(ConfigError, match="leaves no step of fine-tuning"):
        load_recipe(ADAPT, ["head_warmup_steps=50", "trainer.max_steps=50"])
    with pytest.raises(ConfigError, match="head.type=unet has none"):
        load_recipe(ROOT / "adapt" / "segment_unet.yaml", ["head_warmup_steps=10"])
