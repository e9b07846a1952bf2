"""`data.*`: which shard sets a run reads and how samples become tensors (the builders live in medfound.data.loaders)."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field, model_validator

from medfound.config.base import ShardLocation, Strict


AUGMENT_DESCRIPTIONS = {
    "light": "random resized crop (80-100% of the area) and flips: fine-tuning",
    "mae": "random resized crop (20-100%) and flips: MAE pretraining",
    "none": "resize only",
    "he": "H&E: crop, flips, 90-degree rotations and HED stain jitter (data.hed_sigma)",
    "dino": "DINOv2 multi-crop views (data.multicrop): DINOv2 pretraining",
}
AUGMENT_PRESETS = tuple(AUGMENT_DESCRIPTIONS)
# The `data.*` keys each preset reads (medfound.data.transforms.build_transform); a recipe that sets one of
# AUGMENT_KEYS under a preset that does not read it is refused (config/tasks.py) instead of silently ignored.
AUGMENT_READS: dict[str, frozenset[str]] = {
    "light": frozenset({"crop_scale"}), "mae": frozenset({"crop_scale"}), "none": frozenset(),
    "he": frozenset({"crop_scale", "hed_sigma"}), "dino": frozenset({"multicrop"})}
AUGMENT_KEYS = frozenset().union(*AUGMENT_READS.values())
assert set(AUGMENT_READS) == set(AUGMENT_DESCRIPTIONS), "every augment preset says which keys it reads"


class MultiCropConfig(Strict):
    """DINOv2 multi-crop views (used with data.augment=dino)."""

    global_crops: int = Field(2, ge=1, description="global views per image (DINOv2: 2), at data.img_size")
    local_crops: int = Field(8, ge=0, description="local views per image (DINOv2: 8), at multicrop.local_size")
    local_size: int = Field(96, gt=0, description="edge of the local views in pixels (DINOv2: 98 at patch 14)")
    photometric: float = Field(1.0, ge=0, le=2.5, description=(
        "strength of the views' photometric changes: DINO's colour jitter (brightness and contrast 0.4, saturation "
        "0.2, hue 0.1) and its grayscale and solarisation probabilities, times this; 1: DINO's; 0: none, for images "
        "whose intensity or colour is the signal (chest X-ray opacity, fundus colour); docs/pretraining.md"))


class DataConfig(Strict):
    """Which shard sets to read and how to turn samples into tensors."""

    shards: list[ShardLocation] = Field(min_length=1, description="shard sets, each a folder or an s3:// gs:// "
                                                                  "https:// prefix holding a manifest.json")
    train_split: str = Field("train", description="split of the shard set the run trains on")
    train_fraction: Optional[float] = Field(None, gt=0, le=1, description=(
        "fine-tuning: train on this fraction of the labelled training split, stratified by class, by patient where "
        "the samples carry patient tokens, nested across fractions (1% inside 10%) for one data.fraction_seed; "
        "recorded in the lineage, eval.json and the card (medfound/data/fractions.py)"))
    train_shots: Optional[int] = Field(None, ge=1, description="fine-tuning: train on this many samples (patients) "
                                                               "per class instead of a fraction")
    fraction_seed: int = Field(0, ge=0, description="the seed of the data.train_fraction / train_shots draw")
    eval_split: str = Field("test", description="not read by any run (eval.split names the scored split); "
                                                   "kept so that older recipes still load")
    img_size: Optional[int] = Field(None, gt=0, description="model input edge in pixels (segmentation uses "
                                                           "segment.patch_size instead)")
    batch_size: int = Field(gt=0, description="per-process micro-batch")
    eval_batch_size: int = Field(256, gt=0, description="images (or bags) per forward pass in evaluation")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes decoding samples per process")
    shuffle_buffer: int = Field(1000, ge=0, description="samples held for the streaming shuffle (0: file order)")
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
    augment: Literal[AUGMENT_PRESETS] = Field("light", description="training augmentation preset: " + "; ".join(
        f"{k}: {v}" for k, v in AUGMENT_DESCRIPTIONS.items()))
    window: Optional[Literal["lung", "mediastinum", "bone", "brain", "abdomen", "file"]] = Field(
        None, description="CT/DICOM intensity window preset; default: the file's own window")
    fundus_crop: bool = Field(False, description="crop colour fundus images to their field of view")
    spacing_mm: Optional[float] = Field(None, gt=0, lt=100, description=(
        "2-D radiology (CXR, mammography): resample every image to this pixel spacing in mm from its own (DICOM "
        "PixelSpacing / ImagerPixelSpacing, `shard images --spacing-mm`), then pad or crop it to data.img_size "
        "without rescaling, so the model sees a field img_size x spacing_mm mm wide at one scale for every "
        "scanner; in training (random crop), evaluation and external sets (centre). E.g. 224 px at 1.9 mm: a 43 cm "
        "chest field"))
    hed_sigma: float = Field(0.05, ge=0, description="HED stain jitter strength (augment=he)")
    crop_scale: Optional[tuple[float, float]] = Field(
        None, description="RandomResizedCrop area range, replacing the preset's (mae 0.2-1, light 0.8-1, he 0.6-1); "
                          "small values keep large images (fundus photographs, H&E tiles) near native resolution")
    multicrop: MultiCropConfig = Field(default_factory=MultiCropConfig, description="DINOv2 views (augment=dino)")
    mean: tuple[float, float, float] = Field((0.485, 0.456, 0.406), description="per-channel mean subtracted on the "
                                                                              "device (ImageNet by default)")
    std: tuple[float, float, float] = Field((0.229, 0.224, 0.225), description="per-channel std divided by on the device")

    @model_validator(mode="after")
    def _mixing(self) -> "DataConfig":
        if self.train_fraction is not None and self.train_shots is not None:
            raise ValueError("data.train_fraction and data.train_shots both choose a training subset: keep one")
        if self.spacing_mm is not None and self.fundus_crop:
            raise ValueError("data.spacing_mm resamples by the pixel spacing (radiology) and data.fundus_crop crops "
                             "fundus photographs, measured by their field of view: keep one of them")
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

    @property
    def balance_classes(self) -> bool:
        return self.balanced_sampling in (True, "class", "class+site")

    @property
    def balance_sites(self) -> bool:
        return self.balanced_sampling in ("site", "class+site")
