"""Self-supervised objectives over timm backbones. Each is an nn.Module: forward(batch) -> {"loss", ...}."""

from medfound.pretrain.mae import MAE

__all__ = ["MAE"]
