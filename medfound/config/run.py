"""Recipe sections shared by every run: `trainer.*`, `optim.*`, `backbone.*`, `lora.*`, `card.*`, `derived`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, field_validator, model_validator

from medfound.config.base import ShardLocation, Strict


class TrainerConfig(Strict):
    """Keys every recipe shares (`trainer.*`)."""

    output_dir: Path = Field(description="run directory: config.yaml, logs/, checkpoints/, export/")

    @field_validator("output_dir", mode="before")
    @classmethod
    def _not_empty(cls, v: Any) -> Any:
        if v is None or not str(v).strip():
            raise ValueError("trainer.output_dir is empty (it would write into the current directory); give the run "
                             "its own folder, e.g. trainer.output_dir=runs/my_run")
        return v
    max_steps: int = Field(gt=0, description="optimizer steps to run (after gradient accumulation)")
    checkpoint_every: int = Field(500, gt=0, description="steps between checkpoints; one is always written at the end")
    resume: Optional[str] = Field(None, description="'auto' (continue from checkpoints/last if present) or a checkpoint dir")
    resume_changes: Literal["refuse", "allow"] = Field(
        "refuse", description="resuming with a recipe that differs from the checkpoint's: every change is printed; "
                              "changes that alter what is computed (max_steps, lr, batch, data, model...) are refused "
                              "unless 'allow' (the run then no longer equals an uninterrupted one)")
    seed: int = Field(0, description="seed of weights, data order, masks and augmentation (each process adds its rank)")
    log_every: int = Field(10, gt=0, description="steps between logged metrics")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16: autocast mixed precision (GPUs)")
    grad_accum_steps: int = Field(1, gt=0, description="micro-batches per optimizer step")
    clip_grad_norm: Optional[float] = Field(1.0, gt=0, description="clip the global gradient norm to this (None: off)")
    keep_checkpoints: int = Field(2, gt=0, description="newest checkpoints kept on disk")
    loggers: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="metrics always go to logs/metrics.jsonl; these are added")
    wandb_mode: Literal["offline", "online"] = Field("offline", description="wandb logs locally unless set to online "
                                                                           "(then it needs `wandb login`)")
    wandb_project: str = Field("medfound", description="wandb project name")
    progress: bool = Field(True, description="show a progress bar (tqdm)")
    max_bad_steps: int = Field(5, gt=0, description="stop after this many non-finite steps in a row (each is skipped)")
    stop_on_collapse: bool = Field(False, description="stop (after a checkpoint) when the features collapse, as the "
                                                      "objective's own signals or the representation monitor see it; "
                                                      "otherwise warn once and go on")
    visualize_every: Optional[int] = Field(None, gt=0, description="save a training picture to logs/images every N "
                                                                   "steps: MAE reconstructions; image | truth | "
                                                                   "prediction for segmentation and box prompts (other "
                                                                   "objectives and heads refuse it)")
    compile: bool = Field(False, description="torch.compile the module (PyTorch 2)")
    strategy: Literal["ddp", "fsdp", "zero1", "zero2", "zero3"] = Field(
        "ddp", description="how weights are spread over processes: ddp (replicated), fsdp (FSDP2: parameters, "
                           "gradients and optimizer state sharded per block, DCP checkpoints), zero1/zero2/zero3 "
                           "(DeepSpeed ZeRO stages; needs the [deepspeed] extra). docs/scaling.md")
    deepspeed_config: Optional[Path] = Field(None, description="zero*: a DeepSpeed JSON adding ZeRO tuning "
                                                               "(launch/deepspeed/zero3.json); batch, accumulation, "
                                                               "clipping and precision always come from the recipe")
    activation_checkpointing: bool = Field(False, description="recompute each transformer block's activations in "
                                                              "backward (timm set_grad_checkpointing): less memory, "
                                                              "~30% more compute")


class OptimConfig(Strict):
    """AdamW with linear warmup then cosine decay, a pure function of the step (train/optim.py)."""

    lr: Optional[float] = Field(None, gt=0, description="absolute learning rate; give lr or blr, not both")
    blr: Optional[float] = Field(None, gt=0, description="base lr per 256 images: lr = blr * global_batch / 256 (MAE)")
    weight_decay: float = Field(0.05, ge=0, description="AdamW decoupled weight decay (not on norms, biases, tokens)")
    weight_decay_end: Optional[float] = Field(None, ge=0, description="cosine weight-decay schedule to this value")
    layer_decay: Optional[float] = Field(None, gt=0, le=1, description="layer-wise lr decay (BEiT), e.g. 0.65-0.9")
    patch_embed_lr_mult: float = Field(1.0, gt=0, description="lr multiplier of the patch embedding (DINOv2: 0.2)")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas (MAE: 0.9, 0.95)")
    warmup_steps: int = Field(0, ge=0, description="linear warmup from 0 to the lr over these steps")
    min_lr: float = Field(0.0, ge=0, description="the cosine schedule ends here")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="lr after warmup: cosine decay or constant")

    @model_validator(mode="after")
    def _one_lr(self) -> "OptimConfig":
        if (self.lr is None) == (self.blr is None):
            raise ValueError("give exactly one of optim.lr (absolute) or optim.blr (per 256 images); "
                             f"got lr={self.lr}, blr={self.blr}")
        return self


class BackboneConfig(Strict):
    """A timm model, built from scratch (`name` + `model_args`) or from an export dir (`weights`)."""

    name: Optional[str] = Field(None, description="timm model name, e.g. vit_tiny_patch16_224")
    weights: Optional[Path] = Field(None, description="a medfound/timm export dir (config.json + model.safetensors)")
    model_args: dict[str, Any] = Field(default_factory=dict,
                                       description="keyword arguments for timm.create_model (img_size, patch_size, depth, ...)")
    grad_checkpointing: bool = Field(False, description="timm set_grad_checkpointing: less memory, more compute")

    @model_validator(mode="after")
    def _name_or_weights(self) -> "BackboneConfig":
        if self.name is None and self.weights is None:
            raise ValueError("set backbone.name (a timm model) or backbone.weights (an export dir)")
        return self



class CardConfig(Strict):
    """What the model card says beyond the run's own record."""

    license: Optional[str] = Field(None, description="licence of the published weights (card metadata); default: the "
                                                     "most restrictive licence of the training data and imported "
                                                     "weights (apache-2.0 when all are permissive); a less "
                                                     "restrictive one is refused at publish (medfound.publish."
                                                     "licences)")
    demo: bool = Field(False, description="mark the card as a demonstration model, not for any clinical use")
    summary: Optional[str] = Field(None, description="the card's first paragraph (default: architecture and stages)")
    tags: list[str] = Field(default_factory=list, description="extra Hub tags")
    base_model: Optional[str] = Field(None, description="the Hub id of the backbone this model was trained from "
                                                        "(card metadata `base_model`, the LoRA adapter's base); "
                                                        "`medfound publish --base-model` sets it too")
    repo_id: Optional[str] = Field(None, description="the Hub id this model will be published as (the card's "
                                                     "`hf-hub:` loading snippet); `medfound publish --push` sets it")
    gated_prompt: Optional[str] = Field(None, description="gated access on the Hub: the text users must accept "
                                                          "(adds extra_gated_prompt / extra_gated_fields)")
    gated_fields: list[str] = Field(default_factory=lambda: ["Name", "Affiliation", "Country"],
                                    description="gated access: what users must fill in")


class MonitorConfig(Strict):
    """What pretraining learns, watched while it runs (medfound/run/monitor.py): every `every` steps the backbone
    embeds a labelled shard set (frozen, evaluation transform), and k-NN from `bank_split` to `split` scores its
    features; their per-dimension spread and effective rank flag a collapse (all images mapped to one point).
    `export: best` exports the best look instead of the last one."""

    shards: ShardLocation = Field(description="a labelled shard set (any single-label one: the data's own labels, "
                                              "or a small labelled sample of the archive)")
    bank_split: str = Field("train", description="the labelled samples the neighbours come from")
    split: str = Field("val", description="the samples that are scored")
    every: int = Field(gt=0, description="optimizer steps between two looks (and the last step)")
    k: int = Field(20, gt=0, description="neighbours (DINO: 20)")
    temperature: float = Field(0.07, gt=0, description="vote temperature (DINO: 0.07)")
    max_bank: int = Field(4000, gt=0, description="at most this many bank samples (the first ones, in shard order)")
    max_queries: int = Field(2000, gt=0, description="at most this many scored samples")
    export: Literal["last", "best"] = Field(
        "last", description="which look the export holds: last (the last step), or best (the look with the highest "
                            "`select`, the starting weights' look included; its whole state is kept in "
                            "RUN_DIR/monitor/best.safetensors): a continuation that peaks early and drifts")
    select: Literal["knn_auroc", "knn_accuracy"] = Field("knn_auroc", description="the value `export: best` ranks "
                                                                                   "looks by (a tie keeps the earlier)")


class Derived(Strict):
    """Values computed at run start and written into the resolved config (never set them by hand)."""

    world_size: int = Field(description="processes")
    global_batch_size: int = Field(description="data.batch_size x grad_accum_steps x world_size")
    lr: float = Field(description="optim.lr, or optim.blr x global_batch_size / 256")
    medfound_version: str = Field(description="the medfound that resolved the recipe")



class LoraConfig(Strict):
    """LoRA through peft on the plain timm module (Hu et al. 2021)."""

    r: int = Field(8, gt=0, description="rank of the low-rank update")
    alpha: float = Field(16, gt=0, description="scaling: the update is alpha / r x B A")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA branch input")
    target_modules: list[str] = Field(default_factory=lambda: ["auto"], min_length=1,
                                      description="[auto]: every attention and MLP nn.Linear of the transformer blocks, "
                                                  "read from the model (ViT: qkv, proj, fc1, fc2; SwiGLU: fc1_g, "
                                                  "fc1_x); or the last name components of the layers to adapt")

    @field_validator("target_modules")
    @classmethod
    def _auto_alone(cls, v: list[str]) -> list[str]:
        if "auto" in v and len(v) > 1:
            raise ValueError(f"target_modules={v}: `auto` stands alone (it already adapts every block layer)")
        return v


