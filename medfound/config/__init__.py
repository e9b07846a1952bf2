"""Recipe schema: YAML + `key=value` overrides, validated strictly, resolved into an artifact. Torch-free.

A recipe is one YAML file whose top-level `kind` says which verb runs it (`pretrain` or `finetune`). Every section
is a pydantic model with `extra="forbid"`: a typo such as `optim.lrr=1` fails before any work starts, naming the key
path and the nearest valid key; a key the run's task would ignore fails too (config/tasks.py). Values derived at run
time (the learning rate from the base learning rate and the global batch) go into `derived`, and the whole resolved
recipe is written to `RUN_DIR/config.yaml`.

The package is split along its seams: `base` (Strict, ConfigError), `run` (trainer, optim, backbone, LoRA, card),
`data`, `objectives`, `heads` (+ segment), `eval`, `tasks` (keys each task reads), `recipes` (the two kinds and the
generic validator), `loading` (YAML, overrides, messages).
"""

from medfound.config.base import ConfigError, ShardLocation, Strict
from medfound.config.data import AUGMENT_PRESETS, DataConfig, MultiCropConfig
from medfound.config.eval import AggregateConfig, EvalConfig
from medfound.config.heads import (CNN_HEADS, SEGMENT_HEADS, ABMILHeadConfig, AttentionUNetHeadConfig,
                                   BoxPromptHeadConfig, ClassifyHeadConfig, HeadConfig, SegmentConfig,
                                   TransUNetHeadConfig, UNETRHeadConfig, UNetHeadConfig, VNetHeadConfig)
from medfound.config.loading import (apply_overrides, dump_recipe, find_recipe, list_recipes, load_recipe,
                                     parse_overrides, recipe_dirs)
from medfound.config.objectives import DINOConfig, MAEConfig
from medfound.config.recipes import RECIPE_KINDS, FinetuneRecipe, PretrainRecipe, Recipe, derive
from medfound.config.run import BackboneConfig, CardConfig, Derived, LoraConfig, OptimConfig, TrainerConfig
from medfound.config.tasks import TASK_KEYS

__all__ = ["ConfigError", "ShardLocation", "Strict", "AUGMENT_PRESETS", "DataConfig", "MultiCropConfig",
           "AggregateConfig", "EvalConfig", "CNN_HEADS", "SEGMENT_HEADS", "ABMILHeadConfig", "AttentionUNetHeadConfig",
           "BoxPromptHeadConfig", "ClassifyHeadConfig", "HeadConfig", "SegmentConfig", "TransUNetHeadConfig",
           "UNETRHeadConfig", "UNetHeadConfig", "VNetHeadConfig", "apply_overrides", "dump_recipe", "find_recipe",
           "list_recipes", "load_recipe", "parse_overrides", "recipe_dirs", "DINOConfig", "MAEConfig", "RECIPE_KINDS",
           "FinetuneRecipe", "PretrainRecipe", "Recipe", "derive", "BackboneConfig", "CardConfig", "Derived", "LoraConfig",
           "OptimConfig", "TrainerConfig", "TASK_KEYS"]
