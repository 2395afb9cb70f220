"""Losses written so that W workers on a split batch equal one worker on the whole batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raysegbg.dist import global_mean


def upcast(x: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision (AMP) tensors; float64 stays float64 (gradient checks)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean CE over the valid pixels of the global batch."""
    per_pixel = F.cross_entropy(
        upcast(logits), target, weight=weight, ignore_index=ignore_index, reduction="none"
    )
    valid = target != ignore_index
    if weight is not None:
        denom = weight[target.clamp(0, len(weight) - 1)] * valid
    else:
        denom = valid.float()
    return global_mean(per_pixel.sum(), denom.sum())


def soft_dice(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int, eps: float = 1.0
) -> torch.Tensor:
    """1 - soft Dice per image and foreground class, averaged over images (rank-linear)."""
    num_classes = logits.shape[1]
    probs = upcast(logits).softmax(1)
    valid = (target != ignore_index).unsqueeze(1).to(probs.dtype)
    onehot = F.one_hot(target.clamp(0, num_classes - 1), num_classes).permute(0, 3, 1, 2)
    onehot = onehot.to(probs.dtype)
    probs, onehot = probs * valid, onehot * valid
    inter = (probs * onehot).sum((2, 3))[:, 1:]
    denom = (probs + onehot).sum((2, 3))[:, 1:]
    dice = (2 * inter + eps) / (denom + eps)
    per_image = 1.0 - dice.mean(1)
    count = torch.tensor(float(per_image.numel()), device=per_image.device)
    return global_mean(per_image.sum(), count)
