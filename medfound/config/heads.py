"""`head.*` and `segment.*`: the heads, each registered with its builder and the rules it sets on a recipe.

A head config carries its rules as class metadata, read by the generic validator in config/recipes.py:
`task` (the task kind it belongs to), `backbone` ("vit": needs a backbone section; "none": a CNN that ignores it;
"bags": reads a bag folder's features, no backbone section), `tunings` (the allowed `tuning` values, with `why`
naming the reason when one is refused) and `spatial_dims` (segmentation: 2-D, 3-D or both). A new segmentation
head is one file: its config class registered here (or by a plugin) with the "module:function" that builds the
network from a recipe, and that builder. `SEGMENT_HEADS`, `CNN_HEADS` and the `head` union come from the registry.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Optional, Union

from pydantic import Field, PositiveFloat, model_validator

from medfound.config.base import Strict
from medfound.registry import HEADS, load_plugins

ALL_TUNINGS = ("lora", "full", "linear_probe", "last_k")


class HeadRules:
    """The class metadata every head config sets (see the module docstring)."""

    task: ClassVar[str]
    backbone: ClassVar[Literal["vit", "none", "bags"]] = "vit"
    tunings: ClassVar[tuple[str, ...]] = ALL_TUNINGS
    tuning_why: ClassVar[str] = ""
    spatial_dims: ClassVar[tuple[int, ...]] = (2, 3)
    spatial_why: ClassVar[str] = ""
    # what trainer.visualize_every draws for this head (the task module's `visualize`), or None: it draws nothing
    visualizes: ClassVar[Optional[str]] = None
    # the recipe sections and keys the head requires: `segment:` (segmentation heads), data.img_size (the heads that
    # see a fixed input edge); the recipe validator reads these instead of the task's name
    needs_segment: ClassVar[bool] = False
    needs_img_size: ClassVar[bool] = False
    # the export format (medfound.publish.formats) where it is not the task kind's: a classification head timm
    # cannot rebuild (an MLP) says "network" and exports, loads, publishes and predicts with no other change
    export_format: ClassVar[Optional[str]] = None

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "needs_segment" not in cls.__dict__ and isinstance(cls.__dict__.get("task"), str):
            cls.needs_segment = cls.task == "segmentation"  # a head (a plugin's too) that segments reads segment:


class CNNHeadRules(HeadRules):
    """The segmentation CNNs (MONAI): trained from scratch, no backbone."""

    task: ClassVar[str] = "segmentation"
    needs_segment: ClassVar[bool] = True
    visualizes: ClassVar[Optional[str]] = "image | ground truth | prediction, per training image"
    backbone: ClassVar[str] = "none"
    tunings: ClassVar[tuple[str, ...]] = ("full",)
    tuning_why: ClassVar[str] = ("is a CNN trained from scratch: set tuning=full (lora, linear_probe and last_k adapt a "
                                 "pretrained ViT backbone: use head.type=unetr or transunet)")


class ClassifyHeadConfig(HeadRules, Strict):
    """timm's own classifier on the backbone's pooled features, so the export loads as a classifier."""

    task: ClassVar[str] = "classification"
    needs_img_size: ClassVar[bool] = True

    type: Literal["classify"] = Field("classify", description="the head (`medfound ls heads`)")
    pool: Literal["token", "avg"] = Field("token", description="token: the class token (ViT fine-tuning); avg: "
                                                              "mean of the patch tokens (MAE linear probing)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout before the classifier")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="single-label cross-entropy only (RETFound: 0.1)")
    class_weights: Optional[Union[Literal["balanced"], list[float]]] = Field(
        None, description="loss weight per class for imbalance: 'balanced' = n / (K * n_class) from the training "
                          "split's counts (multi-label: pos_weight = negatives / positives per finding), or a list")
    binary_threshold: Optional[int] = Field(
        None, ge=1, description="graded labels: train and evaluate the binary endpoint grade >= this index instead "
                                "(referable diabetic retinopathy = moderate or worse = 2 on the ICDR 0-4 scale)")
    positive_class: Optional[str] = Field(
        None, description="binary tasks: the class name that counts as positive for sensitivity, specificity, "
                          "AUROC/AUPRC, sens_at_spec and calibration (default: the second class name; BreastMNIST: "
                          "malignant is the first)")


class UNETRHeadConfig(HeadRules, Strict):
    """UNETR-style decoder (Hatamizadeh et al. 2022) over intermediate ViT blocks (heads/unetr.py)."""

    task: ClassVar[str] = "segmentation"
    needs_segment: ClassVar[bool] = True
    visualizes: ClassVar[Optional[str]] = "image | ground truth | prediction, per training image"

    type: Literal["unetr"] = Field("unetr", description="the head (`medfound ls heads`)")
    feature_size: int = Field(16, gt=0, description="decoder width at full resolution; doubles per level")
    indices: Optional[list[int]] = Field(None, description="backbone blocks to tap, shallow to deep; default: "
                                                           "log2(patch) blocks evenly spaced, ending at the last")


class TransUNetHeadConfig(HeadRules, Strict):
    """TransUNet (Chen et al. 2021): CNN stem for skips + ViT encoder + cascaded upsampler (heads/transunet.py)."""

    task: ClassVar[str] = "segmentation"
    needs_segment: ClassVar[bool] = True
    visualizes: ClassVar[Optional[str]] = "image | ground truth | prediction, per training image"
    spatial_dims: ClassVar[tuple[int, ...]] = (2,)
    spatial_why: ClassVar[str] = "head.type=transunet is 2-D here: use unet, vnet or unetr for volumes"

    type: Literal["transunet"] = Field("transunet", description="the head (`medfound ls heads`)")
    cnn: str = Field("resnet18", description="timm CNN whose first stages give the 1/2, 1/4, 1/8 skips")
    decoder_channels: list[int] = Field(default_factory=lambda: [256, 128, 64, 16],
                                        description="cascaded upsampler widths, coarse to fine (one per 2x)")


class UNetHeadConfig(CNNHeadRules, Strict):
    """MONAI's residual U-Net (2-D, or 3-D U-Net with segment.spatial_dims=3)."""

    type: Literal["unet"] = Field("unet", description="the head (`medfound ls heads`)")
    channels: list[int] = Field(default_factory=lambda: [32, 64, 128, 256, 512], min_length=2,
                                description="width per level; each level below the first halves the resolution")
    strides: Optional[list[Union[int, list[int]]]] = Field(
        None, description="per level below the first: 2, or one stride per axis ([2, 2, 1]: pool in-plane only, "
                          "for anisotropic volumes; `medfound plan` writes these); default 2 everywhere")
    num_res_units: int = Field(2, ge=0, description="residual units per level (0: plain convolutions)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout in every block")

    @model_validator(mode="after")
    def _strides(self) -> "UNetHeadConfig":
        if self.strides is not None and len(self.strides) != len(self.channels) - 1:
            raise ValueError(f"head.strides has {len(self.strides)} entries; head.channels has {len(self.channels)} "
                             f"levels, so give {len(self.channels) - 1}")
        return self


class AttentionUNetHeadConfig(CNNHeadRules, Strict):
    """MONAI's Attention U-Net (Oktay et al. 2018): attention gates on the skips."""

    spatial_dims: ClassVar[tuple[int, ...]] = (2,)
    spatial_why: ClassVar[str] = "head.type=attention_unet is 2-D here: use unet, vnet or unetr for volumes"

    type: Literal["attention_unet"] = Field("attention_unet", description="the head (`medfound ls heads`)")
    channels: list[int] = Field(default_factory=lambda: [32, 64, 128, 256, 512], min_length=2,
                                description="width per level; each level below the first halves the resolution")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout in every block")


class VNetHeadConfig(CNNHeadRules, Strict):
    """MONAI's V-Net (Milletari et al. 2016), volumes only; input edges divisible by 16."""

    spatial_dims: ClassVar[tuple[int, ...]] = (3,)
    spatial_why: ClassVar[str] = "head.type=vnet segments volumes: set segment.spatial_dims=3"

    type: Literal["vnet"] = Field("vnet", description="the head (`medfound ls heads`)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout of the down and up paths")


class ABMILHeadConfig(HeadRules, Strict):
    """Gated-attention MIL (Ilse et al. 2018) over tile features from `medfound extract` (heads/mil.py).
    data.shards names the bag folder; the backbone that made the features stays frozen (tuning: linear_probe)."""

    task: ClassVar[str] = "mil"
    backbone: ClassVar[str] = "bags"
    tunings: ClassVar[tuple[str, ...]] = ("linear_probe",)
    tuning_why: ClassVar[str] = ("trains on features a frozen backbone already extracted (`medfound extract`): set "
                                 "tuning=linear_probe")

    type: Literal["abmil"] = Field("abmil", description="the head (`medfound ls heads`)")
    hidden_dim: int = Field(256, gt=0, description="tile embedding width before attention (Ilse et al.: 500)")
    attention_dim: int = Field(128, gt=0, description="attention network width (Ilse et al.: 128)")
    dropout: float = Field(0.25, ge=0, lt=1, description="dropout on the tile embeddings")
    max_tiles: Optional[int] = Field(4096, gt=0, description="training: a random subset of at most this many tiles "
                                                             "per bag (regularises and bounds memory); eval uses all")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="single-label cross-entropy only")
    class_weights: Optional[Union[Literal["balanced"], list[float]]] = Field(
        None, description="as head.class_weights of classify, from the training slides' counts")
    positive_class: Optional[str] = Field(None, description="binary tasks: the class name that counts as positive "
                                                            "(default: the second class name), as for classify")
    heatmaps: bool = Field(True, description="evaluation writes RUN_DIR/heatmaps/<slide>.png")


class BoxPromptHeadConfig(HeadRules, Strict):
    """MedSAM-style box-prompt segmentation (heads/prompt.py): a SAM prompt encoder and two-way mask decoder over the
    ViT backbone; one binary mask per box. data.img_size is the model's input edge."""

    task: ClassVar[str] = "box_prompt"
    needs_img_size: ClassVar[bool] = True
    visualizes: ClassVar[Optional[str]] = "image | ground truth | prediction with the prompt box, per training image"
    spatial_dims: ClassVar[tuple[int, ...]] = (2,)

    type: Literal["box_prompt"] = Field("box_prompt", description="the head (`medfound ls heads`)")
    dim: int = Field(256, gt=0, description="prompt and decoder width (SAM: 256)")
    depth: int = Field(2, gt=0, description="two-way attention blocks (SAM: 2)")
    heads: int = Field(8, gt=0, description="attention heads of the decoder (SAM: 8)")
    mlp_dim: int = Field(2048, gt=0, description="MLP width of the two-way blocks (SAM: 2048)")
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
    dice_weight: float = Field(1.0, ge=0, description="weight of the Dice loss")
    bce_weight: float = Field(1.0, ge=0, description="weight of the binary cross-entropy")




class SegmentConfig(Strict):
    """Segmentation settings (`segment.*`): masks, classes, patches, intensity and evaluation."""

    mask: str = Field("mask", description="mask member in the shards (images reader: mask/mask_<name>; volumes: label)")
    roi: Optional[str] = Field(None, description="mask member outside which nothing is scored (DRIVE: fov)")
    num_classes: int = Field(2, ge=2, description="classes including background; 2 = binary (mask > 0 is foreground)")
    class_names: Optional[list[str]] = Field(None, description="names in class order, background first")
    spatial_dims: Literal[2, 3] = Field(2, description="2: images; 3: volumes")
    patch_size: list[int] = Field(min_length=2, max_length=3, description="training crop and sliding-window size")
    intensity: Literal["imagenet", "zscore", "ct"] = Field(
        "imagenet", description="imagenet: data.mean/std on [0, 1] images; zscore: per image and channel; "
                                "ct: clip to segment.clip then (x - stats[0]) / stats[1] (nnU-Net)")
    clip: Optional[tuple[float, float]] = Field(None, description="ct: intensity range (0.5-99.5 percentiles)")
    stats: Optional[tuple[float, float]] = Field(None, description="ct: mean and std of the clipped foreground")
    spacing: Optional[list[float]] = Field(None, description="resample volumes to this voxel spacing (mm, per axis)")
    fov_diameter: Optional[int] = Field(None, gt=0, description="2-D fundus: resample every image, mask and FOV mask "
                                                                "so the field of view is this many pixels wide "
                                                                "(DRIVE: about 540), in training, evaluation and "
                                                                "external sets; predictions are scored back at each "
                                                                "image's native size. Needs a fov mask member")
    scale: Optional[Union[PositiveFloat, Literal["auto"]]] = Field(
        None, description="2-D: resize every image (and its masks) by this factor before training and evaluation; "
                          "predictions are scored at the native size. `auto` (evaluate / predict only, no labels "
                          "used): per image, the factor (0.25-4x) that brings the calibre of the image's structures, "
                          "read from the image at the centre of the model's own prediction, to the training images' "
                          "(recorded in the export), recorded per image; for external sets whose resolution is "
                          "unknown")
    auto_pool: Literal["set", "site", "image"] = Field(
        "set", description="segment.scale=auto: `set` segments every image of a set at the median of its images' own "
                           "readings (one camera or scanner, one scale; robust to the images whose own reading "
                           "fails); `site`: the same per site (a set whose site column names its cameras or "
                           "scanners); `image`: each image at its own reading (a set that mixes cameras without "
                           "such a column)")
    random_scale: Optional[tuple[PositiveFloat, PositiveFloat]] = Field(
        None, description="2-D training: resize each decoded image, its mask and FOV/ROI together by a random factor "
                          "drawn log-uniformly in [lo, hi] (nnU-Net: about [0.7, 1.4]), on top of any "
                          "fov_diameter / mpp / scale: a model that must meet other cameras or scanners")
    low_res: Optional[tuple[PositiveFloat, PositiveFloat]] = Field(
        None, description="2-D training: simulate a lower resolution (nnU-Net's SimulateLowResolution): with "
                          "probability low_res_p a training crop's image (not its masks) is shrunk by a factor drawn "
                          "uniformly in [lo, hi] (antialiased) and enlarged back to its grid, so the model also learns "
                          "the blurred structures of images taken at a lower resolution and upsampled (nnU-Net: "
                          "[0.5, 1])")
    low_res_p: float = Field(0.25, ge=0, le=1, description="share of training crops segment.low_res applies to "
                                                           "(nnU-Net: 0.25)")
    mpp: Optional[float] = Field(None, gt=0, description="2-D microscopy: resample every image and mask to this many "
                                                         "micrometres per pixel, from each sample's recorded um/px "
                                                         "(`shard images --mpp`, slide tiles), in training, evaluation "
                                                         "and external sets; predictions are scored at each image's "
                                                         "native size")
    foreground_fraction: float = Field(0.33, ge=0, le=1, description="share of training crops centred on foreground")
    crops_per_image: int = Field(1, ge=1, description="training crops cut from each decoded image (large images: "
                                                      "decode once, train on several patches)")
    flips: bool = Field(True, description="random flips along every spatial axis in training")
    rot90: bool = Field(True, description="random 90-degree rotations in the image plane")
    intensity_jitter: float = Field(0.1, ge=0, description="random brightness/contrast factor range (+-)")
    dice_weight: float = Field(1.0, ge=0, description="weight of the Dice loss")
    ce_weight: float = Field(1.0, ge=0, description="weight of the cross-entropy")
    overlap: float = Field(0.5, ge=0, lt=1, description="sliding-window overlap at evaluation")
    hd95: bool = Field(True, description="compute HD95 (slow on large 3-D masks)")

    @model_validator(mode="after")
    def _shapes(self) -> "SegmentConfig":
        if len(self.patch_size) != self.spatial_dims:
            raise ValueError(f"segment.patch_size {self.patch_size} needs {self.spatial_dims} entries "
                             f"(segment.spatial_dims={self.spatial_dims})")
        if self.spacing is not None and len(self.spacing) != self.spatial_dims:
            raise ValueError(f"segment.spacing {self.spacing} needs {self.spatial_dims} entries")
        if self.random_scale is not None and not self.random_scale[0] <= self.random_scale[1]:
            raise ValueError(f"segment.random_scale {list(self.random_scale)}: give [lo, hi] with lo <= hi, e.g. "
                             "[0.7, 1.4]")
        if self.random_scale is not None and self.spatial_dims != 2:
            raise ValueError("segment.random_scale rescales 2-D images; volumes are resampled by segment.spacing")
        if self.low_res is not None and not 0 < self.low_res[0] <= self.low_res[1] <= 1:
            raise ValueError(f"segment.low_res {list(self.low_res)}: give [lo, hi] with 0 < lo <= hi <= 1 (the "
                             "share of the resolution kept), e.g. [0.5, 1]")
        if self.low_res is not None and self.spatial_dims != 2:
            raise ValueError("segment.low_res simulates a lower resolution of 2-D images; volumes are not supported")
        scaling = [k for k in ("fov_diameter", "scale", "mpp") if getattr(self, k) is not None]
        if scaling and self.spatial_dims != 2:
            raise ValueError(f"segment.{scaling[0]} rescales 2-D images; volumes are resampled by segment.spacing")
        if len(scaling) > 1:
            raise ValueError(f"set one of segment.fov_diameter (a factor per image, from its field of view), "
                             f"segment.mpp (a factor per image, from its um/px) or segment.scale (one factor for all), "
                             f"not {' and '.join('segment.' + k for k in scaling)}")
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


HEADS.register("classify", config=ClassifyHeadConfig, builder="medfound.adapt.tasks:build_classification_task",
               description="timm classifier on the pooled backbone features (CheXNet, Gulshan, RETFound fine-tuning)")
HEADS.register("unetr", config=UNETRHeadConfig, builder="medfound.adapt.heads.unetr:build_unetr",
               description="UNETR decoder over intermediate ViT blocks, 2-D or 3-D (Hatamizadeh et al. 2022)")
HEADS.register("transunet", config=TransUNetHeadConfig, builder="medfound.adapt.heads.transunet:build_transunet",
               description="TransUNet: CNN skips + ViT encoder + cascaded upsampler (Chen et al. 2021)")
HEADS.register("unet", config=UNetHeadConfig, builder="medfound.adapt.heads.segment:build_unet",
               description="MONAI residual U-Net, 2-D or 3-D, from scratch (Ronneberger et al. 2015; nnU-Net plans)")
HEADS.register("attention_unet", config=AttentionUNetHeadConfig, builder="medfound.adapt.heads.segment:build_unet",
               description="MONAI Attention U-Net, 2-D, from scratch (Oktay et al. 2018)")
HEADS.register("vnet", config=VNetHeadConfig, builder="medfound.adapt.heads.segment:build_vnet",
               description="MONAI V-Net for volumes, from scratch (Milletari et al. 2016)")
HEADS.register("abmil", config=ABMILHeadConfig, builder="medfound.adapt.heads.mil:build_abmil",
               description="gated-attention MIL over tile features of whole slides (Ilse et al. 2018)")
HEADS.register("box_prompt", config=BoxPromptHeadConfig, builder="medfound.adapt.heads.prompt:build_prompt_segmenter",
               description="MedSAM-style box-prompt segmentation: SAM prompt encoder + two-way mask decoder")
load_plugins()  # third-party heads and objectives register before the unions are built

SEGMENT_HEADS = tuple(e.name for e in HEADS if e.config.needs_segment)
CNN_HEADS = tuple(e.name for e in HEADS if e.config.backbone == "none")
HeadConfig = Annotated[Union[HEADS.configs()], Field(discriminator="type")]
