"""`eval.*`: how a fine-tuned run is scored."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, PositiveFloat

from medfound.config.base import ShardLocation, Strict


# the overrides `medfound evaluate` takes beside eval.* and trainer.progress: how the scored images are read (never
# what the model was trained on), and the scale a segmentation model's external sets are resampled to (the internal
# split is always scored as trained)
EVALUATE_DATA_KEYS = ("eval_batch_size", "num_workers", "verify", "max_bad_fraction")
EVALUATE_SCALE_KEYS = ("fov_diameter", "scale", "mpp", "auto_pool")

class AggregateConfig(Strict):
    """Score units made of several images, e.g. a breast seen in CC and MLO views (McKinney et al. 2020)."""

    by: list[str] = Field(min_length=1, description="sample fields (the shard's JSON meta: patient, laterality, view, "
                                                    "...) whose values together name a unit; [patient, laterality] = "
                                                    "one breast")
    reduce: Literal["mean", "max"] = Field("mean", description="how the unit's image probabilities combine")


class EvalConfig(Strict):
    """How `medfound evaluate` (and the end of `medfound finetune`) scores the run's export."""

    split: str = Field("test", description="split of the run's shard set (or bag folder) that is scored")
    bootstrap: int = Field(1000, ge=0, description="resamples for 95% bootstrap intervals of every metric "
                                                   "(classification and MIL: stratified by class; segmentation: "
                                                   "over images) and of per-site results (0: none)")
    seed: int = Field(0, description="seed of the bootstrap resampling")
    interval: Literal["bca", "percentile"] = Field(
        "bca", description="classification and MIL intervals: bca (bias-corrected and accelerated, Efron 1987; "
                           "better coverage at small n) or percentile")
    min_per_class: int = Field(10, ge=0, description="classification and MIL: below this many samples in the "
                                                     "smallest class (of the split, or of a site) no interval is "
                                                     "formed; eval.json, report.md and the card say 'too few "
                                                     "samples for an interval'")
    specificity: float = Field(0.9, gt=0, lt=1, description="binary tasks: the specificity at which "
                                                            "sens_at_spec is read off the ROC curve")
    external: list[ShardLocation] = Field(default_factory=list, description="external-site shard sets (folders or "
                                                                            "URLs; MIL: bag folders) scored beside "
                                                                            "the internal test split, with the drop "
                                                                            "and its interval")
    external_split: Optional[str] = Field(None, description="split of the external sets to score (default: all "
                                                            "their samples)")
    report: bool = Field(True, description="also write RUN_DIR/report/report.md with PNG plots")
    every: Optional[int] = Field(None, gt=0, description="fine-tuning (every kind): score "
                                                         "eval.select_split every N optimizer steps (and at the last) "
                                                         "and export the checkpoint that scored best on eval.select; "
                                                         "the test split is scored once, on that export (RETFound and "
                                                         "MedMNIST select on val; nnU-Net tracks a validation Dice)")
    select: Optional[str] = Field(None, description="with eval.every: the validation metric that picks the export "
                                                    "(default: auroc for classification and MIL, dice for "
                                                    "segmentation and box prompts; "
                                                    "ece and hd95 are minimised, the others maximised)")
    select_split: str = Field("val", description="with eval.every: the split scored during training")
    tta_scales: Optional[list[PositiveFloat]] = Field(
        None, min_length=1, description="segmentation (2-D): multi-scale test-time inference - each image also "
                                        "segmented resized by these factors (e.g. [0.75, 1, 1.33]), the "
                                        "probabilities mapped back to its grid and averaged; for sites whose "
                                        "scale is uncertain (pairs with segment.random_scale training)")
    strict_scale: bool = Field(False, description="an external set whose scale differs from the training data's "
                                                  "beyond the tolerance stops the evaluation (before any scoring) "
                                                  "instead of a warning (`medfound evaluate --strict-scale`)")
    aggregate: Optional[AggregateConfig] = Field(None, description="also report metrics per unit of images "
                                                                   "(classification)")


