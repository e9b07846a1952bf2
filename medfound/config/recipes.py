"""The two recipe kinds and the generic cross-field validator.

The rules of a head (which task it belongs to, whether it needs a backbone or a segment section, the tunings and
spatial dimensions it allows) are metadata on its config class (config/heads.py); those of an objective (the
augmentation presets it trains on) on its config (config/objectives.py); the keys a task reads are in config/tasks.py.
The validators below only read that metadata, so a new head or objective needs no edit here.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import Field, TypeAdapter, model_validator

from medfound.config.base import Strict
from medfound.config.data import DataConfig
from medfound.config.eval import EvalConfig
from medfound.config.heads import SEGMENT_HEADS, ClassifyHeadConfig, HeadConfig, SegmentConfig
from medfound.config.objectives import MAEConfig
from medfound.config.run import (BackboneConfig, CardConfig, Derived, LoraConfig, MonitorConfig, OptimConfig,
                                 TrainerConfig)
from medfound.config.tasks import unused_key_errors
from medfound.registry import OBJECTIVES, TUNINGS

for _name, _text in (
        ("lora", "LoRA adapters through peft on qkv/proj/fc1/fc2; merged at export (Hu et al. 2021)"),
        ("full", "every weight trains (layer-wise lr decay with optim.layer_decay)"),
        ("linear_probe", "frozen backbone, only the head trains"),
        ("last_k", "the backbone's last `last_k` blocks and final norm train, with the head")):
    TUNINGS.register(_name, description=_text, builder=f"medfound.adapt.tuning:tune_{_name}")

ObjectiveConfig = Annotated[Union[OBJECTIVES.configs()], Field(discriminator="name")]
TuningName = Literal[tuple(TUNINGS.names())]


def _check_unused(task: str, data: DataConfig, eval: Optional[EvalConfig] = None) -> None:
    errors = unused_key_errors(task, data, eval)
    if errors:
        raise ValueError("; ".join(errors))


def _check_pictures(trainer: TrainerConfig, draws: Optional[str], who: str) -> None:
    """trainer.visualize_every only where the objective or head draws something (its config's `visualizes`)."""
    if trainer.visualize_every is not None and draws is None:
        raise ValueError(f"trainer.visualize_every={trainer.visualize_every}: {who} draws no training pictures (MAE "
                         "pretraining, segmentation and box-prompt heads do); remove it from the recipe")


class PretrainRecipe(Strict):
    """`medfound pretrain`: a self-supervised objective over a timm backbone."""

    kind: Literal["pretrain"] = Field(description="which verb runs the recipe")
    backbone: BackboneConfig = Field(description="the timm backbone that is pretrained")
    objective: ObjectiveConfig = Field(default_factory=MAEConfig, description="the self-supervised objective")
    data: DataConfig = Field(description="the shard sets and their preprocessing")
    optim: OptimConfig = Field(description="AdamW and its schedule")
    trainer: TrainerConfig = Field(description="steps, checkpoints, precision, strategy")
    card: CardConfig = Field(default_factory=CardConfig, description="what the model card adds")
    monitor: Optional[MonitorConfig] = Field(None, description="k-NN and collapse signals on a labelled set every "
                                                               "N steps, logged beside the loss")
    derived: Optional[Derived] = Field(None, description="written at run start; never set by hand")

    @property
    def task(self) -> str:
        return "pretrain"

    @model_validator(mode="after")
    def _views(self) -> "PretrainRecipe":
        if self.data.img_size is None:
            raise ValueError("pretraining needs data.img_size")
        o = self.objective
        if self.data.augment not in o.augments:
            if o.augments == ("dino",):
                raise ValueError(f"objective {o.name} trains on multi-crop views: set data.augment=dino "
                                 f"(got {self.data.augment!r})")
            raise ValueError(f"objective {o.name} takes one view per image: set data.augment to one of "
                             f"{', '.join(o.augments)} (e.g. {o.augments[0]}; got {self.data.augment!r})")
        _check_unused("pretrain", self.data)
        _check_pictures(self.trainer, o.visualizes, f"objective.name={o.name}")
        return self


class FinetuneRecipe(Strict):
    """`medfound finetune`: backbone + head + loss, tuned by LoRA, full fine-tuning or a linear probe."""

    kind: Literal["finetune"] = Field(description="which verb runs the recipe")
    backbone: Optional[BackboneConfig] = Field(None, description="the timm backbone; not used by the CNN "
                                                                 "segmentation heads (unet, attention_unet, vnet)")
    tuning: TuningName = Field("lora", description="how the backbone adapts: " + "; ".join(
        f"{e.name}: {e.description}" for e in TUNINGS))
    last_k: int = Field(2, ge=1, description="tuning=last_k: the backbone's last k blocks (and final norm) train")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="tuning=lora: rank, alpha, targets")
    head_warmup_steps: int = Field(0, ge=0, description="linear probing, then fine-tuning (LP-FT, Kumar et al. 2022): "
                                   "for the first N optimizer steps only the head learns (the backbone's weights, LoRA "
                                   "adapters or last blocks get no update), so a new head does not send random "
                                   "gradients into pretrained features; then the tuning trains as usual")
    head: HeadConfig = Field(default_factory=ClassifyHeadConfig, description="the head and its loss (head.type)")
    segment: Optional[SegmentConfig] = Field(None, description="segmentation heads: masks, classes, patches")
    data: DataConfig = Field(description="the labelled shard set (MIL: the bag folder) and its preprocessing")
    optim: OptimConfig = Field(description="AdamW and its schedule")
    trainer: TrainerConfig = Field(description="steps, checkpoints, precision, strategy")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="how the export is scored")
    card: CardConfig = Field(default_factory=CardConfig, description="what the model card adds")
    derived: Optional[Derived] = Field(None, description="written at run start; never set by hand")

    @property
    def task(self) -> str:
        """The task kind (medfound.tasks.TASKS): the head's."""
        return type(self.head).task

    @model_validator(mode="after")
    def _rules(self) -> "FinetuneRecipe":
        """Generic: every check reads the head config's class metadata (config/heads.py)."""
        if len(self.data.shards) != 1:
            raise ValueError("a finetune recipe reads one labelled shard set: data.shards must have one entry, "
                             f"got {len(self.data.shards)}")
        h = type(self.head)
        t = self.head.type
        if self.tuning not in h.tunings:
            raise ValueError(f"head.type={t} {h.tuning_why} (got {self.tuning})")
        if h.needs_segment:
            if self.segment is None:
                raise ValueError(f"head.type={t} segments: add a segment section (segment.patch_size at least)")
            if self.segment.spatial_dims not in h.spatial_dims:
                raise ValueError(h.spatial_why or f"head.type={t} takes spatial_dims {h.spatial_dims}")
        elif self.segment is not None:
            raise ValueError(f"a segment section needs a segmentation head (head.type: {' | '.join(SEGMENT_HEADS)})"
                             f"; head.type={t} takes its settings from the head section: remove the segment section")
        if h.backbone == "vit" and self.backbone is None:
            raise ValueError(f"head.type={t} needs a backbone section (backbone.weights or backbone.name)")
        if h.backbone == "bags" and self.backbone is not None:
            raise ValueError(f"head.type={t} reads tile features from the bag folder in data.shards, which records "
                             "its backbone: remove the backbone section")
        if self.head_warmup_steps:
            if h.backbone != "vit":
                raise ValueError("head_warmup_steps holds a pretrained backbone while the head warms up; "
                                 f"head.type={t} has none (it trains whole): remove head_warmup_steps")
            if self.tuning == "linear_probe":
                raise ValueError("head_warmup_steps with tuning=linear_probe: the backbone never trains there; "
                                 "remove head_warmup_steps, or pick lora / full / last_k to fine-tune after it")
            if self.head_warmup_steps >= self.trainer.max_steps:
                raise ValueError(f"head_warmup_steps={self.head_warmup_steps} leaves no step of fine-tuning in "
                                 f"trainer.max_steps={self.trainer.max_steps}: give fewer (LP-FT: the head first, "
                                 "then most of the steps for the whole model)")
        if h.needs_img_size and self.data.img_size is None:
            raise ValueError(f"head.type={t} needs data.img_size (the input edge)")
        _check_unused(h.task, self.data, self.eval)
        _check_pictures(self.trainer, h.visualizes, f"head.type={t}")
        return self


def derive(recipe: PretrainRecipe | FinetuneRecipe, world_size: int, version: str) -> Derived:
    """The values fixed at run start: global batch = data.batch_size x grad_accum_steps x world_size, and
    lr = optim.lr, or optim.blr x global batch / 256 (MAE's rule)."""
    global_batch = recipe.data.batch_size * recipe.trainer.grad_accum_steps * world_size
    lr = recipe.optim.lr if recipe.optim.lr is not None else recipe.optim.blr * global_batch / 256
    return Derived(world_size=world_size, global_batch_size=global_batch, lr=lr, medfound_version=version)


Recipe = Annotated[Union[PretrainRecipe, FinetuneRecipe], Field(discriminator="kind")]
RECIPE_ADAPTER = TypeAdapter(Recipe)
RECIPE_KINDS = {"pretrain": PretrainRecipe, "finetune": FinetuneRecipe}
