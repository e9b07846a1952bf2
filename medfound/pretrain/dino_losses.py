"""The losses of DINOv2 (Oquab et al. 2023), written from the paper and its cited sources.

- Teacher targets: softmax of the teacher's prototype scores at a low temperature, made balanced either by
  subtracting a running centre (DINO, Caron et al. 2021) or by Sinkhorn-Knopp normalisation (SwAV,
  Caron et al. 2020; the DINOv2 default), so one prototype cannot win every image (collapse).
- DINO loss: cross-entropy between the teacher's target for one global view and the student's
  prediction for every other view of the same image (global and local crops).
- iBOT loss (Zhou et al. 2022): the same cross-entropy per masked patch: the student sees the image with
  patches replaced by a mask token and must predict the teacher's target for those patches.
- KoLeo (Sablayrolles et al. 2019): -mean(log distance to the nearest neighbour) of the L2-normalised
  student features in the batch, which spreads them out. Guarded: fewer than two samples -> 0; exact
  duplicates get a floor distance (eps) instead of log(0).
- Gram anchoring (DINOv3, Simeoni et al. 2025): the squared difference between the Gram matrices (patch-to-patch
  cosine similarities) of the student's patch tokens and a frozen Gram teacher's on the same global views, which
  keeps the local feature structure the dense tasks use from degrading over long or continued training.

All reductions that must span the global batch (centre, Sinkhorn sums) are all-reduced when
torch.distributed is initialised.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def sinkhorn_knopp(scores: torch.Tensor, temperature: float, iterations: int = 3) -> torch.Tensor:
    """Balanced soft assignments `[N, K]` of N teacher outputs to K prototypes (rows sum to 1).

    Alternately normalises prototypes (columns) to equal total mass and samples (rows) to unit mass,
    over the global batch.
    """
    shift = scores.float().max().reshape(1)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(shift, op=dist.ReduceOp.MAX)  # the same shift on every rank keeps the global sums exact
    q = torch.exp((scores.float() - shift) / temperature).t()  # [K, N]
    k, n_local = q.shape
    n = n_local * _world()
    q /= _all_reduce(q.sum()).clamp_min(1e-30)
    for _ in range(iterations):
        q /= _all_reduce(q.sum(dim=1, keepdim=True)).clamp_min(1e-30)
        q /= k
        q /= q.sum(dim=0, keepdim=True).clamp_min(1e-30)
        q /= n
    return (q * n).t()


@torch.no_grad()
def centered_softmax(scores: torch.Tensor, center: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.softmax((scores.float() - center) / temperature, dim=-1)


@torch.no_grad()
def update_center(center: torch.Tensor, scores: torch.Tensor, momentum: float) -> None:
    """center <- momentum * center + (1 - momentum) * mean of `scores` over the global batch (in place)."""
    batch = _all_reduce(scores.float().sum(dim=0, keepdim=True)) / (scores.shape[0] * _world())
    center.mul_(momentum).add_(batch, alpha=1 - momentum)


def dino_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """Mean cross-entropy over every (teacher global view i, student view j != i) pair.

    Args:
        student: per view, prototype scores `[B, K]` (the first len(teacher) views are the global ones).
        teacher: per global view, target probabilities `[B, K]`.
    """
    total, pairs = 0.0, 0
    for i, t in enumerate(teacher):
        for j, s in enumerate(student):
            if i == j:
                continue
            total = total + torch.sum(-t * F.log_softmax(s.float() / temperature, dim=-1), dim=-1).mean()
            pairs += 1
    return total / max(pairs, 1)


def ibot_loss(student: torch.Tensor, teacher: torch.Tensor, image_index: torch.Tensor, num_images: int,
              temperature: float) -> torch.Tensor:
    """Cross-entropy on masked patches, each image weighted equally whatever its number of masked patches.

    Args:
        student, teacher: `[M, K]` scores / target probabilities of the M masked patches of the batch.
        image_index: `[M]` which image each masked patch belongs to.
        num_images: images in the batch (those without masked patches count as zero).
    """
    if student.shape[0] == 0:
        return student.sum() * 0.0
    per_patch = torch.sum(-teacher * F.log_softmax(student.float() / temperature, dim=-1), dim=-1)
    counts = torch.bincount(image_index, minlength=num_images).clamp_min(1).float()
    return (per_patch / counts[image_index]).sum() / num_images


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko-Leonenko entropy estimator on L2-normalised `[B, D]` features (DINOv2's KoLeo regulariser)."""
    if features.shape[0] < 2:
        return features.sum() * 0.0  # no neighbour to measure: a tiny batch contributes nothing, not NaN
    x = F.normalize(features.float(), dim=-1, eps=eps)
    with torch.no_grad():
        sims = x @ x.t()
        sims.fill_diagonal_(-2.0)  # never pick yourself
        nearest = sims.argmax(dim=1)
    distances = F.pairwise_distance(x, x[nearest], eps=eps)
    return -torch.log(distances + eps).mean()


def gram_loss(student_patches: torch.Tensor, anchor_patches: torch.Tensor) -> torch.Tensor:
    """Gram anchoring: mean over images and patch pairs of (cos(s_i, s_j) - cos(g_i, g_j))^2, for `[B, N, D]`
    student and Gram-teacher patch tokens of the same views (the paper's squared Frobenius norm of the Gram
    matrices' difference, divided by N^2; 0 when the student keeps the anchor's similarity structure)."""
    s = F.normalize(student_patches.float(), dim=-1)
    with torch.no_grad():
        a = F.normalize(anchor_patches.float(), dim=-1)
        target = a @ a.transpose(1, 2)
    return (s @ s.transpose(1, 2) - target).pow(2).mean()
