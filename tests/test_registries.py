"""Everything registered is covered here without a hand-kept list: heads, objectives, tunings, ingest kinds and
task kinds; the strict per-task keys; `medfound ls`, `cp` and `validate --print`."""

from __future__ import annotations

import json
import typing

import pytest
import yaml

from medfound.cli import main
from medfound.config import TASK_KEYS, ConfigError, PretrainRecipe, load_recipe
from medfound.config.data import DataConfig
from medfound.config.eval import EvalConfig
import medfound.data.ingest  # noqa: F401  (registers the ingest kinds)
import medfound.evaluate.metrics  # noqa: F401  (registers the metrics)
from medfound.registry import (BENCH_PROTOCOLS, HEADS, IMPORT_FORMATS, INGEST_KINDS, METRICS, OBJECTIVES,
                               TUNINGS, Registry)

from helpers import DATA, ROOT


@pytest.mark.parametrize("entry", list(HEADS), ids=lambda e: e.name)
def test_every_head_is_in_the_schema_has_a_builder_and_a_task(entry):
    from medfound.tasks import TASKS

    assert typing.get_args(entry.config.model_fields["type"].annotation) == (entry.name,)
    assert entry.config.task in TASKS and entry.config.task in TASK_KEYS
    assert callable(entry.load()) and entry.description
    assert set(entry.config.tunings) <= set(TUNINGS.names())
    from medfound.config import HeadConfig

    assert entry.config in typing.get_args(typing.get_args(HeadConfig)[0])  # the head.type union


@pytest.mark.parametrize("entry", list(OBJECTIVES), ids=lambda e: e.name)
def test_every_objective_is_in_the_schema_and_builds_a_pretraining_module(entry, tmp_path):
    import torch

    from medfound.tasks.pretrain import build_objective

    augment = entry.config.augments[0]
    data = {"shards": [str(tmp_path)], "img_size": 32, "batch_size": 2, "augment": augment,
            **({"multicrop": {"local_size": 32, "local_crops": 1}} if augment == "dino" else {})}
    recipe = PretrainRecipe(kind="pretrain", objective={"name": entry.name, **(
        {"out_dim": 16, "hidden_dim": 16, "bottleneck_dim": 8} if entry.name == "dinov2" else
        {"decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2})},
        backbone={"name": "vit_tiny_patch16_224", "model_args": {"img_size": 32, "patch_size": 8, "depth": 1,
                                                                 "embed_dim": 32, "num_heads": 2}},
        data=data, optim={"lr": 1e-3}, trainer={"output_dir": str(tmp_path / "run"), "max_steps": 1})
    module = build_objective(recipe)
    assert isinstance(module, torch.nn.Module) and hasattr(module, "export_backbone")
    assert recipe.objective.describe()


@pytest.mark.parametrize("entry", list(INGEST_KINDS), ids=lambda e: e.name)
def test_every_ingest_kind_has_a_reader_and_a_cli_choice(entry, capsys):
    assert callable(entry.load())
    with pytest.raises(SystemExit):
        main(["shard", "--help"])
    assert entry.name in capsys.readouterr().out


@pytest.mark.parametrize("registry", [HEADS, OBJECTIVES, TUNINGS, INGEST_KINDS, METRICS], ids=lambda r: r.kind)
def test_unknown_names_list_the_known_ones_and_names_are_unique(registry):
    with pytest.raises(ValueError, match=f"unknown {registry.key.replace('.', '[.]')} 'nope': choose one of "
                                         f"{registry.names()[0]}"):
        registry.get("nope")
    with pytest.raises(ValueError, match="already registered"):
        registry.register(registry.names()[0], description="again")


def test_the_card_names_metrics_as_the_hub_does():
    from medfound.evaluate.definitions import DEFINITIONS, hub_metric_type

    assert set(DEFINITIONS) <= set(METRICS.names())
    assert hub_metric_type("auroc") == "roc_auc" and hub_metric_type("not_registered") == "not_registered"


def test_a_registry_imports_its_builder_only_when_asked():
    r = Registry("thing", "thing.name")
    r.register("lazy", description="d", builder="medfound.does_not_exist:build")
    with pytest.raises(ModuleNotFoundError):
        r.build("lazy")
    with pytest.raises(ValueError, match="module:attribute"):
        r.register("bad", description="d", builder="no_colon")


def test_every_task_kind_fills_in_the_lifecycle():
    from medfound.tasks import TASKS, TaskSpec

    assert set(TASKS) == set(TASK_KEYS) == {"pretrain", "classification", "segmentation", "box_prompt", "mil"}
    from medfound.publish.formats import missing_methods

    for spec in TASKS.values():
        assert isinstance(spec, TaskSpec), spec.name
        assert spec.weights_file.endswith(".safetensors") and spec.pipeline_tag
        assert missing_methods(spec, spec.export_format) == []  # what its format calls back
    assert {s.name for s in TASKS.values() if s.export_format == "timm_folder"} == {"pretrain", "classification"}


# ---------------------------------------------------------------------------------------------------------------
# strict keys: one example recipe per task kind; every key the kind does not read, set, is refused by name
# ---------------------------------------------------------------------------------------------------------------
EXAMPLES = {"pretrain": "pretrain/demo_mae_tiny.yaml", "classification": "adapt/demo_classify_lora.yaml",
            "segmentation": "adapt/segment_unet.yaml", "box_prompt": "adapt/medsam.yaml", "mil": "adapt/uni_abmil.yaml"}
NON_DEFAULT = {"train_split": "x", "eval_split": "x", "img_size": 48, "eval_batch_size": 3, "num_workers": 1,
               "shuffle_buffer": 7, "resampled": True, "global_order": True, "samples_per_epoch": 5,
               "max_bad_fraction": 0.5, "verify": "sha256", "balanced_sampling": "site", "stain_normalize": True,
               "augment": "he", "window": "lung", "fundus_crop": True, "spacing_mm": 0.5, "hed_sigma": 0.1,
               "crop_scale": [0.5, 1.0],
               "multicrop": {"local_crops": 2}, "mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2],
               "split": "val", "bootstrap": 10, "seed": 3, "specificity": 0.8, "external_split": "test",
               "report": False, "aggregate": {"by": ["patient"]}}
UNREAD = [(task, section, key) for task, spec in TASK_KEYS.items()
          for section, model, read in (("data", DataConfig, spec.data), ("eval", EvalConfig, spec.eval))
          if task != "pretrain" or section == "data"
          for key in model.model_fields if key not in read and key in NON_DEFAULT]


def test_the_example_recipes_exist_for_every_task():
    assert set(EXAMPLES) == set(TASK_KEYS)
    for task, path in EXAMPLES.items():
        assert load_recipe(ROOT / path).task == task


@pytest.mark.parametrize("task,section,key", UNREAD, ids=lambda v: str(v))
def test_a_key_the_task_does_not_read_is_refused_by_name(task, section, key):
    value = yaml.safe_dump(NON_DEFAULT[key], default_flow_style=True).strip()
    with pytest.raises(ConfigError, match=f"do not use {section}[.]{key}="):
        load_recipe(ROOT / EXAMPLES[task], [f"{section}.{key}={value}"])


@pytest.mark.parametrize("task,augment,key", [
    ("pretrain", "mae", "multicrop"), ("pretrain", "mae", "hed_sigma"), ("classification", "light", "multicrop"),
    ("classification", "light", "hed_sigma"), ("classification", "none", "crop_scale")])
def test_a_key_the_augment_preset_does_not_read_is_refused_by_name(task, augment, key):
    value = yaml.safe_dump(NON_DEFAULT[key], default_flow_style=True).strip()
    with pytest.raises(ConfigError, match=f"data.augment='{augment}' does not use data[.]{key}=.*read with augment"):
        load_recipe(ROOT / EXAMPLES[task], [f"data.augment={augment}", f"data.{key}={value}"])


def test_a_key_the_augment_preset_reads_is_honoured():
    r = load_recipe(ROOT / "pretrain" / "demo_dinov2_tiny.yaml", ["data.multicrop.photometric=0"])
    assert r.data.multicrop.photometric == 0
    r = load_recipe(ROOT / EXAMPLES["classification"], ["data.augment=he", "data.hed_sigma=0.1",
                                                         "data.crop_scale=[0.5,1.0]"])
    assert r.data.hed_sigma == 0.1 and r.data.crop_scale == (0.5, 1.0)


def test_the_issue_examples_are_refused_or_honoured():
    # box prompts now go through the shared image loader: site balancing, stain normalisation, resampling work
    r = load_recipe(ROOT / "adapt" / "medsam.yaml", ["data.balanced_sampling=site", "data.stain_normalize=true",
                                                      "data.resampled=true"])
    assert r.data.balance_sites and r.data.stain_normalize
    with pytest.raises(ConfigError, match="box-prompt runs do not use data.augment='he'"):
        load_recipe(ROOT / "adapt" / "medsam.yaml", ["data.augment=he"])
    with pytest.raises(ConfigError, match="MIL runs do not use data.img_size=224.*data.resampled=True"):
        load_recipe(ROOT / "adapt" / "uni_abmil.yaml", ["data.img_size=224", "data.resampled=true"])
    with pytest.raises(ConfigError, match="segmentation runs do not use data.balanced_sampling=True"):
        load_recipe(ROOT / "adapt" / "segment_unet.yaml", ["data.balanced_sampling=true"])


def test_a_resolved_config_with_every_default_still_loads(tmp_path):
    from medfound.config import dump_recipe

    for path in EXAMPLES.values():
        (tmp_path / "config.yaml").write_text(dump_recipe(load_recipe(ROOT / path)))
        assert load_recipe(tmp_path / "config.yaml").model_dump() == load_recipe(ROOT / path).model_dump()


# ---------------------------------------------------------------------------------------------------------------
# discoverability
# ---------------------------------------------------------------------------------------------------------------
def test_ls_lists_recipes_and_every_registered_component(capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    from medfound.registry import EXPORT_FORMATS

    for reg in (HEADS, OBJECTIVES, TUNINGS, INGEST_KINDS, IMPORT_FORMATS, METRICS, BENCH_PROTOCOLS, EXPORT_FORMATS):
        for e in reg:
            assert f"  {e.name} " in out and e.description in out
    assert {e.name for e in BENCH_PROTOCOLS} >= {"knn", "linear", "fewshot", "lora", "full"}
    assert "demo_mae_tiny" in out and "medsam" in out
    assert main(["ls", "heads"]) == 0 and "mae " not in capsys.readouterr().out


def test_cp_copies_a_shipped_recipe_and_never_replaces_a_file(tmp_path, capsys):
    assert main(["cp", "medsam", str(tmp_path)]) == 0
    copied = tmp_path / "medsam.yaml"
    assert copied.read_text() == (ROOT / "adapt" / "medsam.yaml").read_text()
    assert main(["cp", "medsam", str(copied)]) == 1 and "never replaces" in capsys.readouterr().err
    assert main(["cp", "nope", str(tmp_path / "x.yaml")]) == 2


def test_validate_print_shows_the_resolved_recipe_with_its_task_and_derived_values(capsys):
    assert main(["validate", "demo_classify_lora", "optim.warmup_steps=3", "--print", "--no-paths"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# task: classification")
    resolved = yaml.safe_load(out)
    assert resolved["optim"]["warmup_steps"] == 3 and resolved["derived"]["world_size"] == 1
    assert resolved["data"]["shuffle_buffer"] is not None  # every default spelled out
    assert resolved["derived"]["global_batch_size"] == resolved["data"]["batch_size"]


def test_every_schema_field_has_a_description():
    from pydantic import BaseModel

    from medfound.config import RECIPE_KINDS

    seen, missing = set(), []

    def walk(model: type[BaseModel], prefix: str) -> None:
        if model in seen:
            return
        seen.add(model)
        for name, f in model.model_fields.items():
            if not f.description:
                missing.append(f"{prefix}{name}")
            for arg in [f.annotation, *typing.get_args(f.annotation)] + [a for t in typing.get_args(f.annotation)
                                                                          for a in typing.get_args(t)]:
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    walk(arg, f"{prefix}{name}.")

    for kind in RECIPE_KINDS.values():
        walk(kind, "")
    assert missing == []


PLUGIN = '''
"""A third-party segmentation head in one file: its config (with its rules), its registration, its builder."""
from typing import ClassVar, Literal

from pydantic import Field

from medfound.config.base import Strict
from medfound.config.heads import HeadRules
from medfound.registry import HEADS


class TinyConvHeadConfig(HeadRules, Strict):
    task: ClassVar[str] = "segmentation"
    backbone: ClassVar[str] = "none"
    tunings: ClassVar[tuple] = ("full",)
    tuning_why: ClassVar[str] = "is a CNN: set tuning=full"

    type: Literal["tiny_conv"] = Field("tiny_conv", description="the head")
    width: int = Field(4, description="channels")


def build(recipe):
    import torch.nn as nn

    from medfound.adapt.heads.segment import Segmenter, in_channels

    sd, k = recipe.segment.spatial_dims, recipe.segment.num_classes
    conv = nn.Conv2d if sd == 2 else nn.Conv3d
    net = nn.Sequential(conv(in_channels(sd), recipe.head.width, 3, padding=1), nn.ReLU(), conv(recipe.head.width, k, 1))
    return Segmenter(net, (1,) * sd)


HEADS.register("tiny_conv", config=TinyConvHeadConfig, builder="tinyconv_plugin:build",
               description="a one-layer test head from a plugin")
'''


def test_a_third_party_head_registers_through_the_entry_point_group(tmp_path):
    """One file + an entry point: the head validates, is listed, builds and trains through the segmentation task."""
    import subprocess
    import sys

    (tmp_path / "tinyconv_plugin.py").write_text(PLUGIN)
    dist = tmp_path / "tinyconv_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tinyconv-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[medfound.plugins]\ntiny_conv = tinyconv_plugin\n")
    code = f'''
import sys
sys.path.insert(0, {str(tmp_path)!r})
import torch
from medfound.cli import main
from medfound.config import load_recipe
from medfound.tasks import task_for
r = load_recipe({str(ROOT / "adapt" / "segment_unet.yaml")!r}, ["head={{type: tiny_conv, width: 3}}"])
spec = task_for(r)
module = spec.build(r, None)
out = module({{"image": torch.randn(2, 3, 16, 16), "mask": torch.randint(0, 2, (2, 1, 16, 16))}})
out["loss"].backward()
print("logits", tuple(out["logits"].shape), spec.name)
main(["ls", "heads"])
'''
    env = {**__import__("os").environ, "PYTHONPATH": f"{tmp_path}:{ROOT}"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "logits (2, 2, 16, 16) segmentation" in done.stdout
    assert "tiny_conv" in done.stdout and "a one-layer test head from a plugin" in done.stdout


def test_a_task_kind_is_refused_when_its_export_format_is_unknown_or_calls_what_it_lacks(monkeypatch):
    from medfound.tasks import TASKS, register_task
    from medfound.tasks.classification import ClassificationSpec

    monkeypatch.setitem(TASK_KEYS, "toy", TASK_KEYS["classification"])

    class ToyNetwork(ClassificationSpec):
        name = "toy"
        export_format = "network"
        load_network = None

    with pytest.raises(TypeError, match="exports in the network format, which calls load_network"):
        register_task(ToyNetwork)

    class ToyOnnx(ClassificationSpec):
        name = "toy"
        export_format = "onnx"

    with pytest.raises(ValueError, match="unknown export_format 'onnx': choose one of timm_folder, network"):
        register_task(ToyOnnx)
    assert "toy" not in TASKS


MLP_PLUGIN = '''
"""A third-party classification head timm cannot rebuild (an MLP over the pooled features), in one file: its config
(the classify head's keys, plus its export format), its registration, its builder."""
from typing import ClassVar, Literal, Optional

from pydantic import Field

from medfound.config.heads import ClassifyHeadConfig
from medfound.registry import HEADS


class MLPHeadConfig(ClassifyHeadConfig):
    export_format: ClassVar[Optional[str]] = "network"

    type: Literal["mlp"] = Field("mlp", description="the head")
    hidden: int = Field(16, description="hidden width")


def build(recipe, label_schema, class_counts=None, num_train=None):
    import torch.nn as nn

    from medfound.adapt.heads.classify import attach_classifier
    from medfound.adapt.tasks import ClassificationTask, endpoint
    from medfound.adapt.tuning import apply_tuning
    from medfound.backbones import create_backbone

    schema = endpoint(label_schema, None)
    model = create_backbone(recipe.backbone, num_classes=0)
    name = attach_classifier(model, schema.num_classes, pool=recipe.head.pool)
    model.head = nn.Sequential(nn.Linear(model.num_features, recipe.head.hidden), nn.GELU(),
                               nn.Linear(recipe.head.hidden, schema.num_classes))
    model = apply_tuning(model, recipe.tuning, name, recipe.lora, recipe.last_k)
    return ClassificationTask(model, name, schema, full=recipe.tuning == "full")


HEADS.register("mlp", config=MLPHeadConfig, builder="mlphead_plugin:build",
               description="a two-layer MLP classifier from a plugin")
'''


@pytest.mark.slow
def test_a_classification_head_timm_cannot_rebuild_trains_exports_loads_publishes_and_predicts(shards, pretrained,
                                                                                            tmp_path):
    """Issue 29: an MLP head (one file + its registration, nothing else) goes train -> export -> evaluate -> load ->
    publish -> card check -> predict through the `network` export format; the published folder gives the run's
    outputs exactly."""
    import subprocess
    import sys

    (tmp_path / "mlphead_plugin.py").write_text(MLP_PLUGIN)
    dist = tmp_path / "mlphead_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mlphead-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[medfound.plugins]\nmlp = mlphead_plugin\n")
    run, pub = tmp_path / "run", tmp_path / "pub"
    code = f'''
import json, sys
sys.path.insert(0, {str(tmp_path)!r})
sys.path.insert(0, {str(ROOT / "tests")!r})
import numpy as np
import torch
from PIL import Image
import medfound
from medfound.cli import main
from medfound.config import load_recipe
from medfound.workflows import publish, run_finetune
from helpers import tiny_finetune_overrides

shards = {{k: __import__("pathlib").Path(v) for k, v in {json.dumps({k: str(v) for k, v in shards.items()})}.items()}}
recipe = load_recipe({str(ROOT / "adapt" / "demo_classify_lora.yaml")!r},
                     tiny_finetune_overrides(shards, {str(pretrained / "export")!r}, {str(run)!r}, steps=3)
                     + ["head={{type: mlp, hidden: 8}}"])
summary = run_finetune(recipe)
print("files", sorted(p.name for p in (__import__("pathlib").Path({str(run)!r}) / "export").iterdir()))
model = medfound.load({str(run)!r})
print("head", type(model.head).__name__, len(model.head))
published = publish({str(run)!r}, {str(pub)!r})
assert main(["card", "check", {str(pub)!r}]) == 0
x = torch.randn(2, 3, 32, 32)
with torch.no_grad():
    print("same", float((model(x) - medfound.load({str(pub)!r})(x)).abs().max()))
img = __import__("pathlib").Path({str(tmp_path)!r}) / "case.png"
with np.load({str(DATA / "medmnist" / "retinamnist_demo.npz")!r}) as z:
    Image.fromarray(z["test_images"][0]).save(img)
rows = medfound.load({str(pub)!r}).predict([img])
print("predicted", sorted(k for k in rows[0] if k.startswith("p_")) != [], "eval", sorted(summary["eval"])[:2])
'''
    env = {**__import__("os").environ, "PYTHONPATH": f"{tmp_path}:{ROOT}"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "files ['adapter', 'classifier.json', 'model.safetensors']" in out or \
        "files ['classifier.json', 'model.safetensors']" in out, out
    assert "head Sequential 3" in out and "same 0.0" in out and "predicted True" in out, out
    card = (pub / "README.md").read_text()
    assert "library_name: medfound" in card and "pipeline_tag: image-classification" in card
    assert "`mlp` (classification)" in card and "medfound.load(" in card
    assert json.loads((pub / "export" / "classifier.json").read_text())["head"]["type"] == "mlp"


def test_every_tuning_builds_its_tuning():
    """Issue 29: a TUNINGS entry builds its tuning (no string dispatch): on a tiny ViT classifier each leaves the
    classifier trainable and trains what its description says."""
    import timm

    from medfound.adapt.tuning import apply_tuning
    from medfound.config.run import LoraConfig

    trained = {}
    for e in TUNINGS:
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                                  num_classes=3)
        tuned = apply_tuning(model, e.name, "head", LoraConfig(), 1)
        names = {n for n, p in tuned.named_parameters() if p.requires_grad}
        assert any("head" in n for n in names), e.name
        trained[e.name] = names
    assert any("lora_" in n for n in trained["lora"]) and not any("lora_" in n for n in trained["full"])
    assert any("blocks.0." in n for n in trained["full"]) and not any("blocks." in n for n in trained["linear_probe"])
    assert any("blocks.1." in n for n in trained["last_k"]) and not any("blocks.0." in n for n in trained["last_k"])
