"""The task kinds, one module each, every one a TaskSpec registered in TASKS under its one name:

    pretrain        self-supervised objective over a timm backbone (MAE, DINOv2)   -> timm folder
    classification  timm classifier on a backbone (head.type=classify)              -> timm folder (+ adapter)
    segmentation    UNETR / TransUNet / U-Net / Attention U-Net / V-Net             -> segmenter.safetensors
    box_prompt      MedSAM-style box prompts (head.type=box_prompt)                -> prompt_segmenter.safetensors
    mil             gated-attention MIL over slide bags (head.type=abmil)          -> mil.safetensors

`medfound.workflows` runs them; see medfound.tasks.base for the lifecycle.
"""

from medfound.tasks import box_prompt, classification, mil, pretrain, segmentation  # noqa: F401  (registers them)
from medfound.tasks.base import TASKS, TaskSpec, TrainData, register_task, task_for

__all__ = ["TASKS", "TaskSpec", "TrainData", "register_task", "task_for"]
