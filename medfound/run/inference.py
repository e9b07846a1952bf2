"""How a trained model runs on new inputs (`medfound predict`): the device, the precision, the loader workers, the
batch size, the progress bar and where warnings go, decided once by the verb and handed to the task kind's
`predict`, so every kind runs the same way."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class Runtime:
    device: Optional[str] = None        # "cpu", "cuda", "cuda:1"; None: the first GPU when there is one, else the CPU
    precision: str = "auto"             # "auto" (bf16 autocast on a GPU, fp32 on the CPU), "bf16" or "fp32"
    num_workers: Optional[int] = None   # DataLoader workers (None: the recipe's data.num_workers)
    batch_size: Optional[int] = None    # images per forward pass (None: the recipe's)
    progress: bool = True
    warnings: list[str] = field(default_factory=list)  # said to the user and listed in summary.json

    def __post_init__(self) -> None:
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"--precision {self.precision!r}: choose auto, bf16 or fp32")

    def torch_device(self) -> Any:
        import torch

        if self.device is None:  # under torchrun each process takes its own GPU (LOCAL_RANK)
            import os

            local = int(os.environ.get("LOCAL_RANK", "0"))
            return torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device}: no GPU is visible to torch here; use --device cpu")
        return device

    def autocast(self, device: Any) -> Any:
        """bf16 autocast on a GPU (unless fp32 was asked for); nothing on the CPU, where bf16 is slower. Outputs are
        cast to float32 by the callers before softmax."""
        import torch

        if device.type == "cuda" and self.precision in ("auto", "bf16"):
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def workers(self, recipe_value: int) -> int:
        return recipe_value if self.num_workers is None else self.num_workers
