"""`objective.*`: the self-supervised objectives, each registered with its builder (medfound.registry.OBJECTIVES).

A new objective is two files: its config class here (or in a plugin), registered with the "module:function" that
builds the nn.Module, and that module (`forward(batch) -> {"loss", ...}`, `export_backbone()`). The config states the
augmentation presets it trains on (`augments`) and describes itself for the model card (`describe`).
"""

from __future__ import annotations

from typing import ClassVar, Literal, Optional

from pydantic import Field

from medfound.config.base import Strict
from medfound.registry import OBJECTIVES


class MAEConfig(Strict):
    """Masked autoencoder (He et al. 2022), the objective RETFound pretrains with."""

    augments: ClassVar[tuple[str, ...]] = ("mae", "light", "none", "he")  # one view per image
    # what trainer.visualize_every draws (the objective's `visualize`), or None: it draws nothing
    visualizes: ClassVar[Optional[str]] = "original | masked input | reconstruction, per training image"

    name: Literal["mae"] = Field("mae", description="the objective (`medfound ls objectives`)")
    mask_ratio: float = Field(0.75, gt=0, lt=1, description="share of patches hidden from the encoder")
    decoder_dim: int = Field(512, gt=0, description="width of the lightweight decoder")
    decoder_depth: int = Field(8, gt=0, description="transformer blocks of the decoder")
    decoder_heads: int = Field(16, gt=0, description="attention heads of the decoder")
    norm_pix_loss: bool = Field(True, description="reconstruct per-patch normalised pixels (MAE's better target)")
    head_warmup_steps: int = Field(0, ge=0, description="steps during which a new decoder trains alone, the encoder "
                                                        "frozen (continuing from an encoder without its decoder; 0 "
                                                        "when the weights' decoder is loaded)")

    def describe(self) -> str:
        warm = f"; a new decoder warmed up {self.head_warmup_steps} steps on the frozen encoder" \
            if self.head_warmup_steps else ""
        return f"MAE (mask ratio {self.mask_ratio}, decoder {self.decoder_dim}-d x {self.decoder_depth}{warm})"


class DINOConfig(Strict):
    """DINOv2 + iBOT + KoLeo (Oquab et al. 2023), the objective UNI pretrains with (medfound/pretrain/dino.py)."""

    augments: ClassVar[tuple[str, ...]] = ("dino",)  # multi-crop views
    visualizes: ClassVar[Optional[str]] = None

    name: Literal["dinov2"] = Field("dinov2", description="the objective (`medfound ls objectives`)")
    out_dim: int = Field(65536, gt=0, description="prototypes")
    hidden_dim: int = Field(2048, gt=0, description="width of the projection head's MLP")
    bottleneck_dim: int = Field(256, gt=0, description="width before the prototype layer")
    head_layers: int = Field(3, ge=2, description="layers of the projection head")
    ibot_separate_head: bool = Field(False, description="iBOT patch loss through its own head")
    mask_ratio: tuple[float, float] = Field((0.1, 0.5), description="range of the share of masked patches (iBOT)")
    mask_probability: float = Field(0.5, ge=0, le=1, description="share of global views that get an iBOT mask")
    student_temp: float = Field(0.1, gt=0, description="softmax temperature of the student")
    teacher_temp: tuple[float, float] = Field((0.04, 0.07), description="teacher temperature, warmed up start -> end")
    teacher_temp_warmup_steps: int = Field(0, ge=0, description="steps of the teacher temperature warmup")
    momentum: tuple[float, float] = Field((0.992, 1.0), description="EMA momentum of the teacher, cosine start -> end")
    centering: Literal["sinkhorn_knopp", "centering"] = Field(
        "sinkhorn_knopp", description="teacher output normalisation: Sinkhorn-Knopp (DINOv2) or centering (DINO)")
    center_momentum: float = Field(0.9, ge=0, lt=1, description="EMA of the centre (centering only)")
    dino_weight: float = Field(1.0, ge=0, description="weight of the image-level DINO loss")
    ibot_weight: float = Field(1.0, ge=0, description="weight of the masked-patch iBOT loss")
    koleo_weight: float = Field(0.1, ge=0, description="weight of the KoLeo spreading regulariser")
    freeze_last_layer_steps: int = Field(0, ge=0, description="steps the prototype layer stays frozen")
    head_warmup_steps: int = Field(0, ge=0, description="steps during which new heads train alone, the backbone frozen "
                                                        "(continuing from weights without heads; 0 when they carry "
                                                        "heads that are loaded)")
    fresh_heads: bool = Field(False, description="start new heads even when backbone.weights holds DINO heads "
                                                 "(dino_heads.safetensors)")
    gram_weight: float = Field(0.0, ge=0, description="Gram anchoring (DINOv3, Simeoni et al. 2025): weight of the "
                                                      "loss holding the patch-to-patch cosine similarities of the "
                                                      "student's global views at a frozen Gram teacher's (DINOv3: 2); "
                                                      "0: off")
    gram_refresh_steps: Optional[int] = Field(None, gt=0, description="copy the EMA teacher into the Gram teacher "
                                                                      "every N steps (DINOv3 from scratch: 10,000); "
                                                                      "null: it stays the starting weights (a "
                                                                      "continuation anchored to what it continues)")

    def describe(self) -> str:
        warm = f"; new heads warmed up {self.head_warmup_steps} steps on the frozen backbone" \
            if self.head_warmup_steps else ""
        gram = "" if not self.gram_weight else (
            f"; Gram anchoring x{self.gram_weight} to " + (f"the teacher refreshed every {self.gram_refresh_steps} "
                                                            "steps" if self.gram_refresh_steps else
                                                            "the starting weights"))
        return (f"DINOv2 + iBOT + KoLeo ({self.out_dim} prototypes, {self.centering.replace('_', '-')}, "
                f"teacher momentum {self.momentum[0]}->{self.momentum[1]}{warm}{gram}; teacher exported)")


OBJECTIVES.register("mae", config=MAEConfig, builder="medfound.pretrain.mae:build_mae",
                    description="masked autoencoder (He et al. 2022; RETFound)")
OBJECTIVES.register("dinov2", config=DINOConfig, builder="medfound.pretrain.dino:build_dinov2",
                    description="DINOv2 + iBOT + KoLeo self-distillation (Oquab et al. 2023; UNI)")
