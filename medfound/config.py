"""Recipe schema: YAML + `key=value` overrides, validated strictly, resolved into an artifact.

A recipe is one YAML file whose top-level `kind` says which verb runs it (`pretrain` or `finetune`).
Every section is a pydantic model with `extra="forbid"`: a typo such as `optim.lrr=1` fails before
any work starts, naming the key path and the nearest valid key. Values derived at run time (the
learning rate from the base learning rate and the global batch) go into `derived`, and the whole
resolved recipe is written to `RUN_DIR/config.yaml`.
"""

from __future__ import annotations

import difflib
import importlib.resources
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError,
                      field_validator, model_validator)

from medfound.data.location import check_location


class ConfigError(ValueError):
    """A recipe or override is invalid; the message names the key and the fix."""


ShardLocation = Annotated[str, BeforeValidator(lambda v: os.fspath(v) if isinstance(v, os.PathLike) else v),
                          AfterValidator(check_location)]
"""A shard-set folder or a remote prefix (`s3://`, `gs://`, `https://`; see `medfound.data.location`)."""


class Strict(BaseModel):
    # allow_inf_nan=False: `optim.blr=inf` or `weight_decay=nan` is a typo-class error caught before any work,
    # not a run whose first update turns every weight NaN
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# --------------------------------------------------------------------------------------------------
# Sections shared by every recipe
# --------------------------------------------------------------------------------------------------
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
    seed: int = 0
    log_every: int = Field(10, gt=0)
    precision: Literal["fp32", "bf16"] = "fp32"
    grad_accum_steps: int = Field(1, gt=0)
    clip_grad_norm: Optional[float] = Field(1.0, gt=0)
    keep_checkpoints: int = Field(2, gt=0, description="newest checkpoints kept on disk")
    loggers: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="metrics always go to logs/metrics.jsonl; these are added")
    wandb_mode: Literal["offline", "online"] = Field("offline", description="wandb logs locally unless set to online "
                                                                           "(then it needs `wandb login`)")
    wandb_project: str = "medfound"
    progress: bool = True
    max_bad_steps: int = Field(5, gt=0, description="stop after this many non-finite steps in a row (each is skipped)")
    visualize_every: Optional[int] = Field(None, gt=0, description="save the objective's picture (MAE reconstructions) "
                                                                   "to logs/images every N steps")
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
    weight_decay: float = Field(0.05, ge=0)
    weight_decay_end: Optional[float] = Field(None, ge=0, description="cosine weight-decay schedule to this value")
    layer_decay: Optional[float] = Field(None, gt=0, le=1, description="layer-wise lr decay (BEiT), e.g. 0.65-0.9")
    patch_embed_lr_mult: float = Field(1.0, gt=0, description="lr multiplier of the patch embedding (DINOv2: 0.2)")
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(0, ge=0)
    min_lr: float = Field(0.0, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"

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
    grad_checkpointing: bool = False

    @model_validator(mode="after")
    def _name_or_weights(self) -> "BackboneConfig":
        if self.name is None and self.weights is None:
            raise ValueError("set backbone.name (a timm model) or backbone.weights (an export dir)")
        return self


class MultiCropConfig(Strict):
    """DINOv2 multi-crop views (used with data.augment=dino)."""

    global_crops: int = Field(2, ge=1)
    local_crops: int = Field(8, ge=0)
    local_size: int = Field(96, gt=0)


class DataConfig(Strict):
    """Which shard sets to read and how to turn samples into tensors."""

    shards: list[ShardLocation] = Field(min_length=1, description="shard sets, each a folder or an s3:// gs:// "
                                                                  "https:// prefix holding a manifest.json")
    train_split: str = "train"
    eval_split: str = "test"
    img_size: Optional[int] = Field(None, gt=0, description="model input edge in pixels (segmentation uses "
                                                           "segment.patch_size instead)")
    batch_size: int = Field(gt=0, description="per-process micro-batch")
    eval_batch_size: int = Field(256, gt=0)
    num_workers: int = Field(0, ge=0)
    shuffle_buffer: int = Field(1000, ge=0)
    resampled: bool = Field(False, description="draw shards with replacement and mix the sets (pretraining)")
    global_order: bool = Field(False, description="finite training streams: one sample order per (seed, epoch) on "
                                                  "any number of processes, so a run resumed on another number of "
                                                  "processes neither repeats nor skips a sample; every process reads "
                                                  "every shard's bytes (it decodes only its own samples)")
    weights: Optional[list[float]] = Field(None, description="mixing weight per shard set (resampled only); "
                                                             "default: proportional to the sets' sizes")
    samples_per_epoch: Optional[int] = Field(None, gt=0, description="virtual epoch of a resampled stream, all "
                                                                     "processes together (default: the sets' sizes)")
    max_bad_fraction: float = Field(0.01, ge=0, le=1, description="stop when more samples than this fail to decode")
    verify: Literal["size", "sha256"] = Field(
        "size", description="checks of every shard read in training against its manifest: size = byte size before "
                            "and sample count after reading (free); sha256 = also the checksum (one more pass over "
                            "each shard). Evaluation always checks sha256")
    balanced_sampling: Union[bool, Literal["class", "site", "class+site"]] = Field(
        False, description="rejection sampling of the training stream: class (= true; single-label) keeps a sample "
                           "with probability n_rarest / n_its_class so classes arrive equally often; site does the "
                           "same over the samples' sites (multi-site training); class+site both")
    stain_normalize: bool = Field(False, description="H&E: Macenko stain normalisation of every RGB image to a "
                                                     "reference stain matrix (MONAI NormalizeHEStains), in training "
                                                     "and evaluation; a per-image domain-adaptation step")
    augment: Literal["mae", "light", "none", "he", "dino"] = "light"
    window: Optional[Literal["lung", "mediastinum", "bone", "brain", "abdomen", "file"]] = Field(
        None, description="CT/DICOM intensity window preset; default: the file's own window")
    fundus_crop: bool = Field(False, description="crop colour fundus images to their field of view")
    hed_sigma: float = Field(0.05, ge=0, description="HED stain jitter strength (augment=he)")
    crop_scale: Optional[tuple[float, float]] = Field(
        None, description="RandomResizedCrop area range, replacing the preset's (mae 0.2-1, light 0.8-1, he 0.6-1); "
                          "small values keep large images (fundus photographs, H&E tiles) near native resolution")
    multicrop: MultiCropConfig = Field(default_factory=MultiCropConfig)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @model_validator(mode="after")
    def _mixing(self) -> "DataConfig":
        if self.global_order and self.resampled:
            raise ValueError("data.global_order orders a finite epoch; a resampled stream (data.resampled=true) has "
                             "no epoch order to keep: set one of them to false")
        if self.weights is not None:
            if not self.resampled:
                raise ValueError("data.weights mixes shard sets in a resampled stream: set data.resampled=true")
            if len(self.weights) != len(self.shards):
                raise ValueError(f"data.weights has {len(self.weights)} entries for {len(self.shards)} shard sets")
            if min(self.weights) < 0 or sum(self.weights) <= 0:
                raise ValueError(f"data.weights must be non-negative with a positive sum, got {self.weights}")
        return self

    def transform(self, train: bool):
        """The sample -> tensors transform these settings describe, unnormalised (medfound.data.transforms)."""
        from medfound.data.transforms import build_transform

        return build_transform(self.augment, self.img_size, self.mean, self.std, train=train, window=self.window,
                               fundus_crop=self.fundus_crop, hed_sigma=self.hed_sigma, crop_scale=self.crop_scale,
                               global_crops=self.multicrop.global_crops, local_crops=self.multicrop.local_crops,
                               local_size=self.multicrop.local_size, normalize=False)

    def prepare(self, transform):
        """`transform` preceded by the per-image steps these settings ask for (stain normalisation)."""
        if not self.stain_normalize:
            return transform
        from medfound.data.stain import StainNormalized

        return StainNormalized(transform)

    @property
    def balance_classes(self) -> bool:
        return self.balanced_sampling in (True, "class", "class+site")

    @property
    def balance_sites(self) -> bool:
        return self.balanced_sampling in ("site", "class+site")

    def normalizer(self):
        """Finishes a batch on the device: uint8 or [0, 1] images -> (x - mean) / std."""
        from medfound.data.transforms import Normalize

        return Normalize(self.mean, self.std)


class CardConfig(Strict):
    """What the model card says beyond the run's own record."""

    license: str = "apache-2.0"
    demo: bool = Field(False, description="mark the card as a demonstration model, not for any clinical use")
    summary: Optional[str] = None
    tags: list[str] = Field(default_factory=list)
    gated_prompt: Optional[str] = Field(None, description="gated access on the Hub: the text users must accept "
                                                          "(adds extra_gated_prompt / extra_gated_fields)")
    gated_fields: list[str] = Field(default_factory=lambda: ["Name", "Affiliation", "Country"],
                                    description="gated access: what users must fill in")


class Derived(Strict):
    """Values computed at run start and written into the resolved config (never set them by hand)."""

    world_size: int
    global_batch_size: int
    lr: float
    medfound_version: str


# --------------------------------------------------------------------------------------------------
# Objectives and tasks
# --------------------------------------------------------------------------------------------------
class MAEConfig(Strict):
    """Masked autoencoder (He et al. 2022), the objective RETFound pretrains with."""

    name: Literal["mae"] = "mae"
    mask_ratio: float = Field(0.75, gt=0, lt=1)
    decoder_dim: int = Field(512, gt=0)
    decoder_depth: int = Field(8, gt=0)
    decoder_heads: int = Field(16, gt=0)
    norm_pix_loss: bool = True


class DINOConfig(Strict):
    """DINOv2 + iBOT + KoLeo (Oquab et al. 2023), the objective UNI pretrains with (medfound/pretrain/dino.py)."""

    name: Literal["dinov2"] = "dinov2"
    out_dim: int = Field(65536, gt=0, description="prototypes")
    hidden_dim: int = Field(2048, gt=0)
    bottleneck_dim: int = Field(256, gt=0)
    head_layers: int = Field(3, ge=2)
    ibot_separate_head: bool = False
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    mask_probability: float = Field(0.5, ge=0, le=1, description="share of global views that get an iBOT mask")
    student_temp: float = Field(0.1, gt=0)
    teacher_temp: tuple[float, float] = (0.04, 0.07)
    teacher_temp_warmup_steps: int = Field(0, ge=0)
    momentum: tuple[float, float] = (0.992, 1.0)
    centering: Literal["sinkhorn_knopp", "centering"] = "sinkhorn_knopp"
    center_momentum: float = Field(0.9, ge=0, lt=1)
    dino_weight: float = Field(1.0, ge=0)
    ibot_weight: float = Field(1.0, ge=0)
    koleo_weight: float = Field(0.1, ge=0)
    freeze_last_layer_steps: int = Field(0, ge=0)


class LoraConfig(Strict):
    """LoRA through peft on the plain timm module (Hu et al. 2021)."""

    r: int = Field(8, gt=0)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["qkv", "proj", "fc1", "fc2"],
                                      description="last name component of the nn.Linear layers to adapt")


class ClassifyHeadConfig(Strict):
    """timm's own classifier on the backbone's pooled features, so the export loads as a classifier."""

    type: Literal["classify"] = "classify"
    pool: Literal["token", "avg"] = Field("token", description="token: the class token (ViT fine-tuning); avg: "
                                                              "mean of the patch tokens (MAE linear probing)")
    dropout: float = Field(0.0, ge=0, lt=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="single-label cross-entropy only (RETFound: 0.1)")
    class_weights: Optional[Union[Literal["balanced"], list[float]]] = Field(
        None, description="loss weight per class for imbalance: 'balanced' = n / (K * n_class) from the training "
                          "split's counts (multi-label: pos_weight = negatives / positives per finding), or a list")
    binary_threshold: Optional[int] = Field(
        None, ge=1, description="graded labels: train and evaluate the binary endpoint grade >= this index instead "
                                "(referable diabetic retinopathy = moderate or worse = 2 on the ICDR 0-4 scale)")


class UNETRHeadConfig(Strict):
    """UNETR-style decoder (Hatamizadeh et al. 2022) over intermediate ViT blocks (heads/unetr.py)."""

    type: Literal["unetr"] = "unetr"
    feature_size: int = Field(16, gt=0, description="decoder width at full resolution; doubles per level")
    indices: Optional[list[int]] = Field(None, description="backbone blocks to tap, shallow to deep; default: "
                                                           "log2(patch) blocks evenly spaced, ending at the last")


class TransUNetHeadConfig(Strict):
    """TransUNet (Chen et al. 2021): CNN stem for skips + ViT encoder + cascaded upsampler (heads/transunet.py)."""

    type: Literal["transunet"] = "transunet"
    cnn: str = Field("resnet18", description="timm CNN whose first stages give the 1/2, 1/4, 1/8 skips")
    decoder_channels: list[int] = Field(default_factory=lambda: [256, 128, 64, 16],
                                        description="cascaded upsampler widths, coarse to fine (one per 2x)")


class UNetHeadConfig(Strict):
    """MONAI's residual U-Net (2-D, or 3-D U-Net with segment.spatial_dims=3)."""

    type: Literal["unet"] = "unet"
    channels: list[int] = Field(default_factory=lambda: [32, 64, 128, 256, 512], min_length=2,
                                description="width per level; each level below the first halves the resolution")
    strides: Optional[list[Union[int, list[int]]]] = Field(
        None, description="per level below the first: 2, or one stride per axis ([2, 2, 1]: pool in-plane only, "
                          "for anisotropic volumes; `medfound plan` writes these); default 2 everywhere")
    num_res_units: int = Field(2, ge=0)
    dropout: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _strides(self) -> "UNetHeadConfig":
        if self.strides is not None and len(self.strides) != len(self.channels) - 1:
            raise ValueError(f"head.strides has {len(self.strides)} entries; head.channels has {len(self.channels)} "
                             f"levels, so give {len(self.channels) - 1}")
        return self


class AttentionUNetHeadConfig(Strict):
    """MONAI's Attention U-Net (Oktay et al. 2018): attention gates on the skips."""

    type: Literal["attention_unet"] = "attention_unet"
    channels: list[int] = Field(default_factory=lambda: [32, 64, 128, 256, 512], min_length=2)
    dropout: float = Field(0.0, ge=0, lt=1)


class VNetHeadConfig(Strict):
    """MONAI's V-Net (Milletari et al. 2016), volumes only; input edges divisible by 16."""

    type: Literal["vnet"] = "vnet"
    dropout: float = Field(0.0, ge=0, lt=1)


class ABMILHeadConfig(Strict):
    """Gated-attention MIL (Ilse et al. 2018) over tile features from `medfound extract` (heads/mil.py).
    data.shards names the bag folder; the backbone that made the features stays frozen (tuning: linear_probe)."""

    type: Literal["abmil"] = "abmil"
    hidden_dim: int = Field(256, gt=0, description="tile embedding width before attention (Ilse et al.: 500)")
    attention_dim: int = Field(128, gt=0, description="attention network width (Ilse et al.: 128)")
    dropout: float = Field(0.25, ge=0, lt=1)
    max_tiles: Optional[int] = Field(4096, gt=0, description="training: a random subset of at most this many tiles "
                                                             "per bag (regularises and bounds memory); eval uses all")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    class_weights: Optional[Union[Literal["balanced"], list[float]]] = Field(
        None, description="as head.class_weights of classify, from the training slides' counts")
    heatmaps: bool = Field(True, description="evaluation writes RUN_DIR/heatmaps/<slide>.png")


class BoxPromptHeadConfig(Strict):
    """MedSAM-style box-prompt segmentation (heads/prompt.py): a SAM prompt encoder and two-way mask decoder over the
    ViT backbone; one binary mask per box. data.img_size is the model's input edge."""

    type: Literal["box_prompt"] = "box_prompt"
    dim: int = Field(256, gt=0, description="prompt and decoder width (SAM: 256)")
    depth: int = Field(2, gt=0, description="two-way attention blocks (SAM: 2)")
    heads: int = Field(8, gt=0)
    mlp_dim: int = Field(2048, gt=0)
    mask: str = Field("mask", description="the mask member of the shards (one structure per sample)")
    box_jitter: int = Field(20, ge=0, description="training boxes from masks, each side moved outwards by a random "
                                                  "0..box_jitter px of the (cropped) image (MedSAM: 20)")
    crop_to_box: Optional[float] = Field(
        None, ge=0, description="None: the model sees the whole image (MedSAM; one encoding serves every box). A "
                                "number: it sees a square window around each box with this margin (a fraction of "
                                "the box side on each side), resized to data.img_size (DEXTR-style; far better with "
                                "little training data or small structures, one encoding per box)")
    augment: bool = Field(True, description="training: random windows containing the structure (40-100% of the "
                                            "image side), flips, brightness/contrast jitter; MedSAM uses none, "
                                            "having 1.5 M masks")
    dice_weight: float = Field(1.0, ge=0)
    bce_weight: float = Field(1.0, ge=0)


SEGMENT_HEADS = ("unetr", "transunet", "unet", "attention_unet", "vnet")
CNN_HEADS = ("unet", "attention_unet", "vnet")


class SegmentConfig(Strict):
    """Segmentation settings (`segment.*`): masks, classes, patches, intensity and evaluation."""

    mask: str = Field("mask", description="mask member in the shards (images reader: mask/mask_<name>; volumes: label)")
    roi: Optional[str] = Field(None, description="mask member outside which nothing is scored (DRIVE: fov)")
    num_classes: int = Field(2, ge=2, description="classes including background; 2 = binary (mask > 0 is foreground)")
    class_names: Optional[list[str]] = None
    spatial_dims: Literal[2, 3] = 2
    patch_size: list[int] = Field(min_length=2, max_length=3, description="training crop and sliding-window size")
    intensity: Literal["imagenet", "zscore", "ct"] = Field(
        "imagenet", description="imagenet: data.mean/std on [0, 1] images; zscore: per image and channel; "
                                "ct: clip to segment.clip then (x - stats[0]) / stats[1] (nnU-Net)")
    clip: Optional[tuple[float, float]] = Field(None, description="ct: intensity range (0.5-99.5 percentiles)")
    stats: Optional[tuple[float, float]] = Field(None, description="ct: mean and std of the clipped foreground")
    spacing: Optional[list[float]] = Field(None, description="resample volumes to this voxel spacing (mm, per axis)")
    foreground_fraction: float = Field(0.33, ge=0, le=1, description="share of training crops centred on foreground")
    crops_per_image: int = Field(1, ge=1, description="training crops cut from each decoded image (large images: "
                                                      "decode once, train on several patches)")
    flips: bool = True
    rot90: bool = Field(True, description="random 90-degree rotations in the image plane")
    intensity_jitter: float = Field(0.1, ge=0, description="random brightness/contrast factor range (+-)")
    dice_weight: float = Field(1.0, ge=0)
    ce_weight: float = Field(1.0, ge=0)
    overlap: float = Field(0.5, ge=0, lt=1, description="sliding-window overlap at evaluation")
    hd95: bool = Field(True, description="compute HD95 (slow on large 3-D masks)")

    @model_validator(mode="after")
    def _shapes(self) -> "SegmentConfig":
        if len(self.patch_size) != self.spatial_dims:
            raise ValueError(f"segment.patch_size {self.patch_size} needs {self.spatial_dims} entries "
                             f"(segment.spatial_dims={self.spatial_dims})")
        if self.spacing is not None and len(self.spacing) != self.spatial_dims:
            raise ValueError(f"segment.spacing {self.spacing} needs {self.spatial_dims} entries")
        if self.intensity == "ct" and (self.clip is None or self.stats is None):
            raise ValueError("segment.intensity=ct needs segment.clip and segment.stats (`medfound plan` writes them)")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"segment.class_names has {len(self.class_names)} names for {self.num_classes} classes")
        return self

    @property
    def names(self) -> list[str]:
        if self.class_names:
            return list(self.class_names)
        return ["background", "foreground"] if self.num_classes == 2 else \
            ["background", *(f"class_{i}" for i in range(1, self.num_classes))]


HeadConfig = Annotated[Union[ClassifyHeadConfig, ABMILHeadConfig, BoxPromptHeadConfig, UNETRHeadConfig, TransUNetHeadConfig, UNetHeadConfig,
                             AttentionUNetHeadConfig, VNetHeadConfig], Field(discriminator="type")]


class AggregateConfig(Strict):
    """Score units made of several images, e.g. a breast seen in CC and MLO views (McKinney et al. 2020)."""

    by: list[str] = Field(min_length=1, description="sample fields (the shard's JSON meta: patient, laterality, view, "
                                                    "...) whose values together name a unit; [patient, laterality] = "
                                                    "one breast")
    reduce: Literal["mean", "max"] = Field("mean", description="how the unit's image probabilities combine")


class EvalConfig(Strict):
    split: str = "test"
    bootstrap: int = Field(1000, ge=0, description="resamples for 95% bootstrap intervals of every metric "
                                                   "(classification and MIL: stratified by class; segmentation: "
                                                   "over images) and of per-site results (0: none)")
    seed: int = Field(0, description="seed of the bootstrap resampling")
    specificity: float = Field(0.9, gt=0, lt=1, description="binary tasks: the specificity at which "
                                                            "sens_at_spec is read off the ROC curve")
    external: list[ShardLocation] = Field(default_factory=list, description="external-site shard sets (folders or "
                                                                            "URLs) scored beside the "
                                                                   "internal test split, with the drop and its "
                                                                   "interval (classification and segmentation)")
    external_split: Optional[str] = Field(None, description="split of the external sets to score (default: all "
                                                            "their samples)")
    report: bool = Field(True, description="also write RUN_DIR/report/report.md with PNG plots")
    aggregate: Optional[AggregateConfig] = Field(None, description="also report metrics per unit of images "
                                                                   "(classification)")


class PretrainRecipe(Strict):
    """`medfound pretrain`: a self-supervised objective over a timm backbone."""

    kind: Literal["pretrain"]
    backbone: BackboneConfig
    objective: Annotated[Union[MAEConfig, DINOConfig], Field(discriminator="name")] = Field(default_factory=MAEConfig)
    data: DataConfig
    optim: OptimConfig
    trainer: TrainerConfig
    card: CardConfig = Field(default_factory=CardConfig)
    derived: Optional[Derived] = None

    @model_validator(mode="after")
    def _views(self) -> "PretrainRecipe":
        if self.data.img_size is None:
            raise ValueError("pretraining needs data.img_size")
        if self.objective.name == "dinov2" and self.data.augment != "dino":
            raise ValueError(f"objective dinov2 trains on multi-crop views: set data.augment=dino "
                             f"(got {self.data.augment!r})")
        if self.objective.name == "mae" and self.data.augment == "dino":
            raise ValueError("objective mae takes one view per image: set data.augment=mae")
        return self


class FinetuneRecipe(Strict):
    """`medfound finetune`: backbone + head + loss, tuned by LoRA, full fine-tuning or a linear probe."""

    kind: Literal["finetune"]
    backbone: Optional[BackboneConfig] = Field(None, description="the timm backbone; not used by the CNN "
                                                                 "segmentation heads (unet, attention_unet, vnet)")
    tuning: Literal["lora", "full", "linear_probe", "last_k"] = "lora"
    last_k: int = Field(2, ge=1, description="tuning=last_k: the backbone's last k blocks (and final norm) train")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    head: HeadConfig = Field(default_factory=ClassifyHeadConfig)
    segment: Optional[SegmentConfig] = None
    data: DataConfig
    optim: OptimConfig
    trainer: TrainerConfig
    eval: EvalConfig = Field(default_factory=EvalConfig)
    card: CardConfig = Field(default_factory=CardConfig)
    derived: Optional[Derived] = None

    @model_validator(mode="after")
    def _one_labelled_set(self) -> "FinetuneRecipe":
        if len(self.data.shards) != 1:
            raise ValueError("a finetune recipe reads one labelled shard set: data.shards must have one entry, "
                             f"got {len(self.data.shards)}")
        t = self.head.type
        if t == "abmil":
            if self.segment is not None:
                raise ValueError("head.type=abmil classifies slides: remove the segment section")
            if self.tuning != "linear_probe":
                raise ValueError("head.type=abmil trains on features a frozen backbone already extracted (`medfound "
                                 f"extract`): set tuning=linear_probe (got {self.tuning})")
            if self.backbone is not None:
                raise ValueError("head.type=abmil reads tile features from the bag folder in data.shards, which "
                                 "records its backbone: remove the backbone section")
            return self
        if t == "box_prompt":
            if self.segment is not None:
                raise ValueError("head.type=box_prompt takes its settings from the head section: remove the segment "
                                 "section")
            if self.backbone is None or self.data.img_size is None:
                raise ValueError("head.type=box_prompt needs a backbone section and data.img_size (the input edge)")
            return self
        if t == "classify":
            if self.segment is not None:
                raise ValueError("a segment section needs a segmentation head (head.type: "
                                 f"{' | '.join(SEGMENT_HEADS)}); head.type is classify")
            if self.data.img_size is None:
                raise ValueError("classification needs data.img_size")
        elif self.segment is None:
            raise ValueError(f"head.type={t} segments: add a segment section (segment.patch_size at least)")
        if t in CNN_HEADS:
            if self.tuning != "full":
                raise ValueError(f"head.type={t} is a CNN trained from scratch: set tuning=full (lora, linear_probe "
                                 "and last_k adapt a pretrained ViT backbone: use head.type=unetr or transunet)")
        elif self.backbone is None:
            raise ValueError(f"head.type={t} needs a backbone section (backbone.weights or backbone.name)")
        if self.segment is not None:
            if t == "vnet" and self.segment.spatial_dims != 3:
                raise ValueError("head.type=vnet segments volumes: set segment.spatial_dims=3")
            if t in ("transunet", "attention_unet") and self.segment.spatial_dims != 2:
                raise ValueError(f"head.type={t} is 2-D here: use unet, vnet or unetr for volumes")
        return self

    @property
    def task(self) -> str:
        return {"classify": "classification", "abmil": "mil", "box_prompt": "prompt"}.get(self.head.type,
                                                                                             "segmentation")


Recipe = Annotated[Union[PretrainRecipe, FinetuneRecipe], Field(discriminator="kind")]
_RECIPE = TypeAdapter(Recipe)
RECIPE_KINDS = {"pretrain": PretrainRecipe, "finetune": FinetuneRecipe}


# --------------------------------------------------------------------------------------------------
# Loading, overrides, friendly errors
# --------------------------------------------------------------------------------------------------
def find_recipe(name_or_path: str | os.PathLike, folder: str) -> Path:
    """Resolve a recipe given as a path, or by name from the root `pretrain/` / `adapt/` folders.

    Search order: the path as given; `./{folder}/{name}.yaml`; the recipes shipped in the wheel
    (`medfound/recipes/{folder}`); the source checkout next to the package.
    """
    p = Path(name_or_path)
    if p.is_file():
        return p
    stem = p.name if p.suffix in (".yaml", ".yml") else p.name + ".yaml"
    candidates = [Path(folder) / stem]
    try:
        candidates.append(Path(str(importlib.resources.files("medfound") / "recipes" / folder / stem)))
    except (ModuleNotFoundError, TypeError):  # pragma: no cover - namespace edge cases
        pass
    candidates.append(Path(__file__).resolve().parent.parent / folder / stem)
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(f"recipe {str(name_or_path)!r} not found: looked at {', '.join(str(c) for c in [p, *candidates])}. "
                      f"Pass a path to a YAML file or the name of a recipe in {folder}/.")


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    """`a.b.c=value` -> (['a','b','c'], value parsed as YAML, so 1e-4 is a float and [1,2] a list)."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form key.path=value (e.g. optim.lr=1e-4)")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from e
        parsed.append((key.split("."), value))
    return parsed


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for path, value in parse_overrides(overrides):
        node = data
        for i, part in enumerate(path[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {'.'.join(path)}: {'.'.join(path[: i + 1])} is a value, not a section")
            node = nxt
        node[path[-1]] = value
    return data


def _model_at(model: type[BaseModel] | None, loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class found by walking field names `loc` from `model` (None if not a model)."""
    for part in loc:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        model = _as_model(model.model_fields[part].annotation)
    return model


def _as_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _as_model(arg)
        if found is not None:
            return found
    return None


def _friendly(err: ValidationError, source: str, kind: str | None) -> ConfigError:
    """Rewrite pydantic's errors as one message per bad key, with the nearest valid key for typos."""
    root = RECIPE_KINDS.get(kind or "")
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        if root is not None and loc and loc[0] == kind:  # discriminated-union tag
            loc = loc[1:]
        path = ".".join(str(p) for p in loc) or "<root>"
        if e["type"] == "extra_forbidden":
            parent = _model_at(root, loc[:-1]) if root else None
            valid = sorted(parent.model_fields) if parent else []
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            prefix = ".".join(str(p) for p in loc[:-1])
            hint = f" Did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else ""
            where = f" under '{prefix}'" if prefix else ""
            lines.append(f"unknown key '{path}'.{hint} Valid keys{where}: {', '.join(valid)}")
        elif e["type"] == "missing":
            lines.append(f"missing required key '{path}'")
        elif e["type"] in ("union_tag_invalid", "union_tag_not_found"):
            lines.append(f"'kind' must be one of {', '.join(RECIPE_KINDS)} (got {kind!r})")
        else:
            lines.append(f"'{path}': {e['msg']} (got {e.get('input')!r})")
    text = f"invalid recipe {source}:\n  - " + "\n  - ".join(lines)
    return ConfigError(re.sub(r"(\w+://)[^/@\s'\"]*@", r"\1***@", text))  # a URL's credentials are never echoed


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None,
                expect: str | None = None) -> PretrainRecipe | FinetuneRecipe:
    """Load a YAML recipe, apply `key=value` overrides and validate it.

    Args:
        path: the YAML file.
        overrides: `["optim.lr=1e-4", "trainer.max_steps=50"]`.
        expect: the `kind` the calling verb runs; a recipe of another kind is an error.
    Raises:
        ConfigError naming the file, the key and the fix.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read recipe {path}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a YAML mapping, got {type(data).__name__}")
    data = apply_overrides(data, list(overrides or []))
    kind = data.get("kind")
    if expect is not None and kind != expect:
        raise ConfigError(f"recipe {path} has kind {kind!r}, but this command runs kind {expect!r} recipes "
                          f"(use `medfound {kind}` for it)" if kind in RECIPE_KINDS else
                          f"recipe {path} must set kind: {expect}")
    try:
        return _RECIPE.validate_python(data)
    except ValidationError as e:
        source = str(path) + (f" with overrides {' '.join(overrides)}" if overrides else "")
        raise _friendly(e, source, kind) from None


def dump_recipe(recipe: BaseModel, header: str = "") -> str:
    """The resolved recipe as YAML (paths as strings, tuples as lists), with an optional comment header."""
    body = yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
    lines = "".join(f"# {h}\n" for h in header.splitlines()) if header else ""
    return lines + body
