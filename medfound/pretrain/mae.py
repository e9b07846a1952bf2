"""Masked autoencoder pretraining (He et al., "Masked Autoencoders Are Scalable Vision Learners",
CVPR 2022), the objective RETFound pretrains with.

Implemented from the paper over an unmodified timm VisionTransformer (the encoder is exported
as-is): the image is cut into N patches, a random (1 - mask_ratio) subset is embedded and run
through the encoder (visible tokens only, which is what makes MAE cheap), a light Transformer
decoder receives the encoded tokens plus a shared learned mask token at each masked position (with
fixed 2-D sin-cos position embeddings), and predicts the pixels of every patch. The loss is the
mean squared error on masked patches only, optionally against per-patch normalised pixels
(`norm_pix_loss`, the paper's better-performing target).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block

from medfound.backbones import vit_geometry, vit_tokens
from medfound.pretrain.masking import random_masking
from medfound.adapt.pictures import titled


def patchify(images: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    """`[B, C, H, W]` -> `[B, N, ph * pw * C]`, patches in row-major order, pixels (row, col, channel)."""
    b, c, h, w = images.shape
    ph, pw = patch
    if h % ph or w % pw:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {ph}x{pw}")
    x = images.reshape(b, c, h // ph, ph, w // pw, pw)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // ph) * (w // pw), ph * pw * c)


def unpatchify(patches: torch.Tensor, patch: tuple[int, int], grid: tuple[int, int], channels: int) -> torch.Tensor:
    """Inverse of `patchify`: `[B, N, ph * pw * C]` -> `[B, C, H, W]`."""
    b = patches.shape[0]
    ph, pw = patch
    gh, gw = grid
    x = patches.reshape(b, gh, gw, ph, pw, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, gh * ph, gw * pw)


class MAE(nn.Module):
    """MAE objective around a timm ViT encoder.

    Args:
        encoder: a timm VisionTransformer built with num_classes=0; its geometry (embed dim, patch
            size, grid, prefix tokens) is read from the model.
        decoder_dim, decoder_depth, decoder_heads: the light decoder (paper default 512 x 8, 16 heads).
        mask_ratio: fraction of patches hidden from the encoder (0.75 in the paper and RETFound).
        norm_pix_loss: reconstruct per-patch normalised pixels.
        head_warmup_steps: optimizer steps during which the encoder gets no update (its gradients are dropped
            before the step) while the decoder trains: continuing from an encoder released without its decoder.
    """

    def __init__(self, encoder: nn.Module, decoder_dim: int = 512, decoder_depth: int = 8, decoder_heads: int = 16,
                 mask_ratio: float = 0.75, norm_pix_loss: bool = True, head_warmup_steps: int = 0):
        super().__init__()
        self.head_warmup_steps = head_warmup_steps
        self.geometry = geo = vit_geometry(encoder)
        if decoder_dim % decoder_heads:
            raise ValueError(f"decoder_dim {decoder_dim} must be divisible by decoder_heads {decoder_heads}")
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.decoder_embed = nn.Linear(geo.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        pos = build_sincos2d_pos_embed(list(geo.grid_size), dim=decoder_dim)  # [N, Dd], fixed
        self.register_buffer("decoder_pos", pos.reshape(1, geo.num_patches, decoder_dim), persistent=False)
        self.decoder_blocks = nn.Sequential(*[
            Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=nn.LayerNorm)
            for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, geo.patch_size[0] * geo.patch_size[1] * geo.in_chans)
        self._init_decoder()

    def _init_decoder(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        for name, m in self.named_modules():
            if name.startswith("encoder"):
                continue  # the encoder keeps timm's initialisation
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def encode_visible(self, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Encoder on the kept patches only: `[B, C, H, W]`, `[B, K]` -> `[B, P + K, D]` (P prefix tokens); a
        rotary-position encoder (DINOv3) applies each kept token's own position (`backbones.vit_tokens`)."""
        return vit_tokens(self.encoder, images, keep=keep)

    def decode(self, latent: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """`[B, P + K, D]` encoded tokens -> `[B, N, ph * pw * C]` pixel predictions for every patch."""
        p = self.geometry.num_prefix_tokens
        x = self.decoder_embed(latent)
        prefix, visible = x[:, :p], x[:, p:]
        b, k, d = visible.shape
        n = restore.shape[1]
        tokens = torch.cat([visible, self.mask_token.expand(b, n - k, d)], dim=1)
        tokens = torch.gather(tokens, 1, restore.unsqueeze(-1).expand(-1, -1, d)) + self.decoder_pos
        x = self.decoder_norm(self.decoder_blocks(torch.cat([prefix, tokens], dim=1)))
        return self.decoder_pred(x[:, p:])

    def loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over masked patches (mask `[B, N]`, 1 = masked)."""
        target = patchify(images, self.geometry.patch_size)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, batch: dict) -> dict:
        """batch["image"]: `[B, C, H, W]` -> {"loss": scalar, "pred": `[B, N, ph*pw*C]`, "mask": `[B, N]`}."""
        images = batch["image"]
        keep, mask, restore = random_masking(images.shape[0], self.geometry.num_patches, self.mask_ratio,
                                             device=images.device)
        pred = self.decode(self.encode_visible(images, keep), restore)
        return {"loss": self.loss(images, pred, mask), "pred": pred, "mask": mask}

    # ------------------------------------------------------------------ export, decoder I/O, pictures
    DECODER_PREFIXES = ("decoder_embed.", "mask_token", "decoder_blocks.", "decoder_norm.", "decoder_pred.")

    def export_backbone(self) -> nn.Module:
        return self.encoder

    def decoder_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if k.startswith(self.DECODER_PREFIXES)}

    def decoder_bytes(self) -> bytes:
        """The decoder's weights as safetensors bytes, saved beside an export so pretraining can continue from it."""
        from safetensors.torch import save

        return save({k: v.contiguous() for k, v in self.decoder_state().items()})

    def export_files(self) -> dict[str, bytes]:
        """Files an export keeps beside the backbone (the pretraining task writes them): the decoder."""
        return {"mae_decoder.safetensors": self.decoder_bytes()}

    @property
    def touches_gradients(self) -> bool:
        """True when `before_optimizer_step` drops gradients (the strategies that cannot do that refuse)."""
        return self.head_warmup_steps > 0

    def before_optimizer_step(self, step: int, max_steps: int) -> None:
        if step < self.head_warmup_steps:  # the encoder frozen while a new decoder warms up
            for p in self.encoder.parameters():
                p.grad = None

    def load_decoder(self, path) -> None:
        """Load decoder weights written by an export (`decoder_bytes`) or `medfound import`; any key or shape
        difference is an error."""
        from safetensors.torch import load_file

        loaded, own = load_file(str(path)), self.decoder_state()
        missing, extra = sorted(set(own) - set(loaded)), sorted(set(loaded) - set(own))
        shapes = [k for k in set(own) & set(loaded) if own[k].shape != loaded[k].shape]
        if missing or extra or shapes:
            raise ValueError(f"{path} does not fit this MAE decoder (objective.decoder_dim/depth/heads?): missing "
                             f"{missing[:5]}, unexpected {extra[:5]}, shape mismatch {shapes[:5]}")
        with torch.no_grad():  # the key sets and shapes match exactly (checked above): copy in place
            for k, v in own.items():
                v.copy_(loaded[k])

    @torch.no_grad()
    def visualize(self, batch: dict, out: dict, n: int = 8):
        """A PNG-ready grid, one row per image: original | what the encoder saw | reconstruction (predicted patches
        pasted into the visible ones, de-normalised per patch when norm_pix_loss), enlarged to at least 160 px a
        panel and labelled (`adapt.pictures.titled`)."""
        from PIL import Image

        images = batch["image"][:n].detach().float().cpu()
        pred, mask = out["pred"][:n].detach().float().cpu(), out["mask"][:n].cpu().unsqueeze(-1)
        target = patchify(images, self.geometry.patch_size)
        if self.norm_pix_loss:
            pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6).sqrt() + target.mean(dim=-1, keepdim=True)
        grid, chans = self.geometry.grid_size, images.shape[1]
        views = [images, unpatchify(target * (1 - mask), self.geometry.patch_size, grid, chans),
                 unpatchify(target * (1 - mask) + pred * mask, self.geometry.patch_size, grid, chans)]
        stats = getattr(self, "display_stats", None)  # the data's (mean, std), set by the workflow
        if stats is not None:
            mean, std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in stats)
            views = [(v * std + mean).clamp(0, 1) for v in views]
        else:
            lo, hi = images.amin(dim=(1, 2, 3), keepdim=True), images.amax(dim=(1, 2, 3), keepdim=True)
            views = [((v - lo) / (hi - lo + 1e-6)).clamp(0, 1) for v in views]
        rows = [torch.cat([v[i] for v in views], dim=2) for i in range(images.shape[0])]
        pixels = (torch.cat(rows, dim=1).permute(1, 2, 0).numpy() * 255).astype("uint8")

        grid = Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels)
        return titled(grid, ["original", f"visible ({1 - self.mask_ratio:.0%})", "reconstruction"])


def build_mae(recipe, encoder: nn.Module, decoder_from: Optional[Path] = None) -> MAE:
    """objective.name=mae (medfound.registry.OBJECTIVES): MAE around `encoder`; `decoder_from`: an export folder
    whose `mae_decoder.safetensors` (when present) continues pretraining with its decoder."""
    o = recipe.objective
    mae = MAE(encoder, decoder_dim=o.decoder_dim, decoder_depth=o.decoder_depth, decoder_heads=o.decoder_heads,
              mask_ratio=o.mask_ratio, norm_pix_loss=o.norm_pix_loss, head_warmup_steps=o.head_warmup_steps)
    mae.display_stats = (tuple(recipe.data.mean), tuple(recipe.data.std))
    if decoder_from is not None and (Path(decoder_from) / "mae_decoder.safetensors").is_file():
        mae.load_decoder(Path(decoder_from) / "mae_decoder.safetensors")
        mae.head_warmup_steps = 0  # the warm-up is for a new decoder: this one already reads the encoder
    return mae
