"""DINOv2 self-distillation with iBOT and KoLeo (Oquab et al., "DINOv2: Learning Robust Visual Features
without Supervision", 2023), the objective UNI pretrains with. Written from the paper over an unmodified
timm ViT (the teacher backbone is what gets exported).

Per step, for a batch of multi-crop views (`batch["crops"]`: global views first, then local ones):
1. The EMA teacher sees the global views; its class-token and patch-token outputs go through the DINO
   and iBOT heads to prototype scores, turned into targets by Sinkhorn-Knopp or centring at a teacher
   temperature warmed up from 0.04 to 0.07.
2. The student sees every view; in a share of the global views (`mask_probability`) a block-wise mask
   (ratio uniform in `mask_ratio`) replaces patch embeddings by a learned mask token.
3. Loss = DINO cross-entropy (class tokens, every student view against every other teacher global view)
   + iBOT cross-entropy (masked patch tokens) + `koleo_weight` x KoLeo (student class tokens)
   [+ `gram_weight` x Gram anchoring (DINOv3): the student's patch-to-patch similarities on the global views held
   at those of a frozen Gram teacher: the starting weights of a continuation, or the EMA teacher copied in every
   `gram_refresh_steps`; written from the paper, without its high-resolution Gram-teacher inputs].
4. After the optimizer step the teacher moves towards the student (momentum cosine 0.992 -> 1); during
   the first `freeze_last_layer_steps` the heads' last layers are not updated.
Monitors returned with the loss: teacher target entropy (normalised by log K; ~0 means collapse to one
prototype), the per-dimension standard deviation of normalised student and teacher features (~0 means
all images map to one point), and each loss term.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, fields
import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from medfound.backbones import vit_geometry, vit_tokens
from medfound.pretrain.dino_losses import (centered_softmax, dino_loss, gram_loss, ibot_loss, koleo_loss,
                                           sinkhorn_knopp, update_center)
from medfound.pretrain.masking import block_mask
from medfound.train.optim import vit_param_groups

COLLAPSE_STD = 1e-3  # per-dimension std of normalised features below which they are one point
HEADS_FILE = "dino_heads.safetensors"  # beside an export's backbone: the DINO/iBOT heads, to continue pretraining


class DINOHead(nn.Module):
    """MLP (GELU) to a bottleneck, L2-normalise, then cosine scores against `out_dim` unit prototypes
    (the last layer's rows are normalised: weight normalisation with the gain fixed to 1)."""

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 layers: int = 3):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (layers - 1) + [bottleneck_dim]
        mlp: list[nn.Module] = []
        for i in range(len(dims) - 1):
            mlp.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                mlp.append(nn.GELU())
        self.mlp = nn.Sequential(*mlp)
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[N, in_dim]` -> `[N, out_dim]` scores in [-1, 1]."""
        x = F.normalize(self.mlp(x), dim=-1, eps=1e-6)
        return F.linear(x, F.normalize(self.last_layer.weight, dim=-1, eps=1e-6))


def _cosine(start: float, end: float, step: int, steps: int) -> float:
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / max(1, steps))))


@dataclass
class DINOv2Settings:
    """What the DINOv2 objective is set to (the recipe's `objective:` and `data.multicrop.global_crops`, see
    `build_dinov2`; defaults are the paper's where it gives one).

    out_dim, hidden_dim, bottleneck_dim, head_layers: the DINO head (paper: 65536, 2048, 256, 3).
    ibot_separate_head: a second head for patch tokens (else shared with the DINO head).
    mask_ratio, mask_probability: iBOT block masking of that share of the global views.
    student_temp, teacher_temp, teacher_temp_warmup_steps: temperatures (0.1; 0.04 -> 0.07).
    momentum: teacher EMA momentum, cosine from the first to the second value over the run.
    centering: "sinkhorn_knopp" (DINOv2) or "centering" (DINO, with `center_momentum`).
    dino_weight, ibot_weight, koleo_weight: loss weights (paper: 1, 1, 0.1).
    freeze_last_layer_steps: steps during which the heads' last layers get no update.
    global_crops: how many of `batch["crops"]` are global views.
    head_warmup_steps: optimizer steps during which the student's backbone gets no update (its gradients are
        dropped before the step) while the heads and the mask token train: continuing from released weights whose
        heads are new, the heads learn the backbone's features before their gradients reach it.
    gram_weight, gram_refresh_steps: Gram anchoring (DINOv3) and how often the EMA teacher is copied into the
        Gram teacher (0: never, it stays the backbone the objective was built around).
    """

    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    head_layers: int = 3
    ibot_separate_head: bool = False
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    mask_probability: float = 0.5
    student_temp: float = 0.1
    teacher_temp: tuple[float, float] = (0.04, 0.07)
    teacher_temp_warmup_steps: int = 0
    momentum: tuple[float, float] = (0.992, 1.0)
    centering: str = "sinkhorn_knopp"
    center_momentum: float = 0.9
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    freeze_last_layer_steps: int = 0
    global_crops: int = 2
    head_warmup_steps: int = 0
    gram_weight: float = 0.0
    gram_refresh_steps: int = 0


HEAD_SHAPE = ("out_dim", "hidden_dim", "bottleneck_dim", "head_layers", "ibot_separate_head")  # built, not run-time


class DINOv2(nn.Module):
    """DINOv2 objective around a timm ViT student.

    Args:
        backbone: the student, a timm VisionTransformer with num_classes=0 (dynamic_img_size=True when
            local crops are smaller than global ones); the teacher is a copy without drop-path.
        settings: the objective's settings (DINOv2Settings; default: the paper's).
    """

    def __init__(self, backbone: nn.Module, settings: Optional[DINOv2Settings] = None):
        super().__init__()
        st = settings or DINOv2Settings()
        self.geometry = geo = vit_geometry(backbone)
        if st.centering not in ("sinkhorn_knopp", "centering"):
            raise ValueError(f"centering={st.centering!r}: choose sinkhorn_knopp or centering")
        heads = {"dino": DINOHead(geo.embed_dim, st.out_dim, st.hidden_dim, st.bottleneck_dim, st.head_layers)}
        if st.ibot_separate_head:
            heads["ibot"] = DINOHead(geo.embed_dim, st.out_dim, st.hidden_dim, st.bottleneck_dim, st.head_layers)
        self.student = nn.ModuleDict({"backbone": backbone, **heads})
        self.teacher = copy.deepcopy(self.student)
        for m in self.teacher.modules():  # the teacher is never dropped out
            if hasattr(m, "drop_prob"):
                m.drop_prob = 0.0
        self.teacher.requires_grad_(False)
        self.gram_teacher: Optional[nn.Module] = None
        if st.gram_weight > 0:  # the anchor: a frozen copy of the backbone as built (a continuation's start)
            self.gram_teacher = copy.deepcopy(self.teacher["backbone"])
        self.mask_token = nn.Parameter(torch.zeros(1, geo.embed_dim))
        trunc_normal_(self.mask_token, std=0.02)
        self.register_buffer("center", torch.zeros(1, st.out_dim))
        self.register_buffer("patch_center", torch.zeros(1, st.out_dim))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("max_steps", torch.ones((), dtype=torch.long))
        self.cfg = {k: v for k, v in asdict(st).items() if k not in HEAD_SHAPE}
        self.out_dim = st.out_dim

    # ----------------------------------------------------------------------------------- helpers
    def train(self, mode: bool = True) -> "DINOv2":
        super().train(mode)
        self.teacher.eval()
        if self.gram_teacher is not None:
            self.gram_teacher.eval()
        return self

    def export_backbone(self) -> nn.Module:
        """The teacher's backbone: the EMA model DINOv2 (and UNI) release."""
        return self.teacher["backbone"]

    def fsdp_units(self) -> list[nn.Module]:
        """Beyond the transformer blocks, FSDP shards each projection head (student and teacher alike, so the
        EMA update stays a local operation on matching shards)."""
        return [h for net in (self.student, self.teacher) for k, h in net.items() if k != "backbone"]

    def teacher_temp(self, step: int) -> float:
        lo, hi = self.cfg["teacher_temp"]
        warm = self.cfg["teacher_temp_warmup_steps"]
        return hi if step >= warm else lo + (hi - lo) * step / max(1, warm)

    def tokens(self, backbone: nn.Module, images: torch.Tensor, mask: Optional[torch.Tensor] = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """timm ViT forward with optional patch masking: (class token `[B, D]`, patch tokens `[B, N, D]`).

        Masked patch embeddings (mask `[B, N]`, True = masked) are replaced by the mask token before the
        position embeddings are added, as iBOT does. Without a class token the patch mean stands in.
        """
        x = vit_tokens(backbone, images, mask=mask, mask_token=self.mask_token)
        p = self.geometry.num_prefix_tokens
        patches = x[:, p:]
        cls = x[:, 0] if getattr(backbone, "cls_token", None) is not None else patches.mean(dim=1)
        return cls, patches

    def sample_masks(self, n: int, num_patches: int, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
        """`[n, N]` block masks for the first `mask_probability` share of the n global views; the rest none."""
        lo, hi = self.cfg["mask_ratio"]
        n_masked = int(n * self.cfg["mask_probability"])
        masks = torch.zeros(n, num_patches, dtype=torch.bool)
        order = torch.randperm(n)[:n_masked]
        for i in order.tolist():
            ratio = lo + (hi - lo) * float(torch.rand(()))
            masks[i] = block_mask(grid, int(round(ratio * num_patches)))
        return masks.to(device)

    def targets(self, scores: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
        if self.cfg["centering"] == "sinkhorn_knopp":
            return sinkhorn_knopp(scores, temp)
        probs = centered_softmax(scores, center, temp)
        update_center(center, scores, self.cfg["center_momentum"])
        return probs

    # ----------------------------------------------------------------------------------- training
    def forward(self, batch: dict) -> dict:
        crops = batch.get("crops")
        g = self.cfg["global_crops"]
        if not crops or len(crops) <= g:
            raise ValueError("DINOv2 needs multi-crop batches: set data.augment=dino "
                             f"(with data.multicrop.global_crops={g} and local crops)")
        globals_ = torch.cat(crops[:g])                       # [g*B, 3, H, W]
        locals_ = torch.cat(crops[g:])                        # [l*B, 3, h, w]
        step = int(self.step)
        temp = self.teacher_temp(step)
        grid = (globals_.shape[-2] // self.geometry.patch_size[0], globals_.shape[-1] // self.geometry.patch_size[1])
        n_patches = grid[0] * grid[1]
        masks = self.sample_masks(globals_.shape[0], n_patches, grid, globals_.device)
        ibot_t = self.teacher["ibot"] if "ibot" in self.teacher else self.teacher["dino"]
        ibot_s = self.student["ibot"] if "ibot" in self.student else self.student["dino"]

        with torch.no_grad():
            t_cls, t_patch = self.tokens(self.teacher["backbone"], globals_)
            t_targets = self.targets(self.teacher["dino"](t_cls), self.center, temp).chunk(g)
            t_patch_targets = self.targets(ibot_t(t_patch[masks]), self.patch_center, temp)

        s_cls_g, s_patch_g = self.tokens(self.student["backbone"], globals_, masks)
        s_cls_l, _ = self.tokens(self.student["backbone"], locals_)
        s_scores = list(self.student["dino"](s_cls_g).chunk(g)) + list(self.student["dino"](s_cls_l).chunk(len(crops) - g))
        st = self.cfg["student_temp"]
        l_dino = dino_loss(s_scores, list(t_targets), st)
        image_index = torch.nonzero(masks)[:, 0]
        l_ibot = ibot_loss(ibot_s(s_patch_g[masks]), t_patch_targets, image_index, masks.shape[0], st)
        l_koleo = sum(koleo_loss(c) for c in s_cls_g.chunk(g)) / g
        loss = self.cfg["dino_weight"] * l_dino + self.cfg["ibot_weight"] * l_ibot + self.cfg["koleo_weight"] * l_koleo
        extra = {}
        if self.gram_teacher is not None:
            with torch.no_grad():
                _, g_patch = self.tokens(self.gram_teacher, globals_)
            l_gram = gram_loss(s_patch_g, g_patch)
            loss = loss + self.cfg["gram_weight"] * l_gram
            extra["gram_loss"] = l_gram.detach()

        with torch.no_grad():
            t_all = torch.cat(t_targets)
            entropy = -(t_all * torch.log(t_all.clamp_min(1e-12))).sum(-1).mean() / math.log(self.out_dim)
            s_std = F.normalize(s_cls_g.float(), dim=-1).std(dim=0).mean()
            t_std = F.normalize(t_cls.float(), dim=-1).std(dim=0).mean()
        return {"loss": loss, "dino_loss": l_dino.detach(), "ibot_loss": l_ibot.detach(),
                "koleo_loss": l_koleo.detach(), "teacher_entropy": entropy, "student_feature_std": s_std,
                "teacher_feature_std": t_std, "teacher_temp": torch.tensor(temp),
                "masked_views": masks.any(1).float().sum(), **extra}

    def collapse(self, values: dict) -> Optional[str]:
        """The loop's collapse guard (train/loop.py): a description when the logged window shows the features
        collapsed to one point (the per-dimension std of the L2-normalised student or teacher class tokens below
        COLLAPSE_STD; about 1/sqrt(D) when healthy), else None."""
        for who in ("student", "teacher"):
            std = values.get(f"{who}_feature_std")
            if std is not None and std < COLLAPSE_STD:
                return (f"the {who}'s features collapsed to one point (per-dimension std {std:.1e} of its normalised "
                        f"class tokens; healthy is about {1 / math.sqrt(self.geometry.embed_dim):.2f})")
        return None

    def momentum(self, step: int, max_steps: int) -> float:
        start, end = self.cfg["momentum"]
        return _cosine(start, end, step, max_steps)

    @property
    def touches_gradients(self) -> bool:
        """True when `before_optimizer_step` cancels gradients (the strategies that cannot do that refuse)."""
        return self.cfg["freeze_last_layer_steps"] > 0 or self.cfg["head_warmup_steps"] > 0

    def before_optimizer_step(self, step: int, max_steps: int) -> None:
        if step < self.cfg["freeze_last_layer_steps"]:
            for name, p in self.student.named_parameters():
                if "last_layer" in name:
                    p.grad = None
        if step < self.cfg["head_warmup_steps"]:  # the backbone frozen while new heads warm up
            for p in self.student["backbone"].parameters():
                p.grad = None

    def export_files(self) -> dict[str, bytes]:
        """Files an export keeps beside the backbone (the pretraining task writes them): the teacher's heads."""
        from safetensors.torch import save

        return {HEADS_FILE: save(self.heads_state())}

    def heads_state(self) -> dict[str, torch.Tensor]:
        """The teacher's DINO (and iBOT) heads: what an export keeps beside the backbone (`dino_heads.safetensors`),
        so that pretraining can continue with them."""
        return {k: v.detach().clone().contiguous() for k, v in self.teacher.state_dict().items()
                if not k.startswith("backbone.")}

    def load_heads(self, path) -> None:
        """Student and teacher heads from `path` (`heads_state`, or a DINOv2 training checkpoint's teacher heads
        as `medfound import` keeps them); any key or shape difference is an error naming the head settings."""
        from safetensors.torch import load_file

        loaded, own = load_file(str(path)), self.heads_state()
        missing, extra = sorted(set(own) - set(loaded)), sorted(set(loaded) - set(own))
        shapes = [f"{k} {tuple(loaded[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(set(own) & set(loaded))
                  if own[k].shape != loaded[k].shape]
        if missing or extra or shapes:
            raise ValueError(f"{path} does not fit these DINO heads (objective.out_dim / hidden_dim / bottleneck_dim / "
                             f"head_layers / ibot_separate_head): missing {missing[:4]}, unexpected {extra[:4]}, "
                             f"shapes {shapes[:3]}; match the settings to the weights' heads, or set "
                             "objective.fresh_heads=true to start new heads (warm them up: objective.head_warmup_steps)")
        with torch.no_grad():
            for tree in (self.student, self.teacher):
                for k, v in tree.state_dict().items():
                    if k in loaded:
                        v.copy_(loaded[k])

    @torch.no_grad()
    def after_optimizer_step(self, step: int, max_steps: int) -> None:
        m = self.momentum(step, max_steps)
        student = dict(self.student.named_parameters())
        for name, t in self.teacher.named_parameters():
            t.mul_(m).add_(student[name].detach(), alpha=1 - m)
        self.step.fill_(step + 1)
        self.max_steps.fill_(max_steps)
        refresh = self.cfg["gram_refresh_steps"]
        if self.gram_teacher is not None and refresh and (step + 1) % refresh == 0:
            gram = dict(self.gram_teacher.named_parameters())
            for name, t in self.teacher["backbone"].named_parameters():
                gram[name].copy_(t)

    def param_groups(self, cfg) -> list[dict]:
        """Student backbone with layer-wise lr decay and the patch-embedding multiplier; heads and the mask
        token at full lr (mask token and 1-d parameters without weight decay). The teacher is not trained."""
        from timm.optim import param_groups_weight_decay

        groups = vit_param_groups(self.student["backbone"], cfg)
        heads = nn.ModuleDict({k: v for k, v in self.student.items() if k != "backbone"})
        groups += [{**g, "lr_scale": 1.0} for g in param_groups_weight_decay(heads, cfg.weight_decay)]
        groups.append({"params": [self.mask_token], "weight_decay": 0.0, "lr_scale": 1.0})
        return groups


def build_dinov2(recipe, encoder: nn.Module, decoder_from=None) -> DINOv2:
    """objective.name=dinov2 (medfound.registry.OBJECTIVES): DINOv2 + iBOT + KoLeo around `encoder`; `decoder_from`:
    the export folder the backbone came from, whose `dino_heads.safetensors` (a medfound DINOv2 export, or a DINOv2
    training checkpoint imported) continues pretraining with its heads unless objective.fresh_heads."""
    o, mc = recipe.objective, recipe.data.multicrop
    pe = encoder.patch_embed
    if mc.local_size != recipe.data.img_size and getattr(pe, "strict_img_size", True) and \
            not getattr(pe, "dynamic_img_size", False):
        raise ValueError(f"local crops of {mc.local_size} px need a backbone that takes several image sizes: set "
                         "backbone.model_args.dynamic_img_size=true")
    if o.gram_weight and not o.gram_refresh_steps and recipe.backbone.weights is None:
        raise ValueError("objective.gram_weight anchors the student to the weights it starts from, and this run starts "
                         "from random weights: set backbone.weights (a continuation), or objective.gram_refresh_steps "
                         "to anchor to the teacher every N steps (DINOv3: 10000)")
    dino = DINOv2(encoder, DINOv2Settings(**{f.name: getattr(o, f.name) for f in fields(DINOv2Settings)
                                              if f.name not in ("global_crops", "gram_refresh_steps")},
                                          global_crops=mc.global_crops, gram_refresh_steps=o.gram_refresh_steps or 0))
    heads = Path(decoder_from) / HEADS_FILE if decoder_from is not None else None
    if heads is not None and heads.is_file() and not o.fresh_heads:
        dino.load_heads(heads)
        dino.cfg["head_warmup_steps"] = 0  # the warm-up is for new heads: these already read the backbone
    return dino
