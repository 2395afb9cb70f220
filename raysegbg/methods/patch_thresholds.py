"""Optimal patch-wise binarization (PatchRefineNet's pseudo-labels), vectorized.

For every p×p patch of a probability map, the threshold of a fixed grid (0.05 … 1.0) that
maximises the patch's IoU with the ground truth. One pass over the pixels: each pixel falls in
one (patch, threshold bin) cell of two histograms (all valid pixels, foreground pixels); suffix
sums over the bins give, for every threshold at once, how many pixels the patch predicts and
how many of them are right. Cost O(pixels + patches × thresholds), on any device.
"""

from __future__ import annotations

import torch

WHOLE_IMAGE = 0  # patch size meaning "one patch per image" (image-level optimal threshold)


def threshold_grid(steps: int = 20, device: torch.device | str = "cpu") -> torch.Tensor:
    """(steps,) thresholds 1/steps, 2/steps, …, 1.0 (20 steps: 0.05 … 1.0; 0.5 is on it)."""
    return torch.arange(1, steps + 1, device=device, dtype=torch.float64) / steps


def _grid_shape(height: int, width: int, patch: int) -> tuple[int, int, int, int]:
    ph = height if patch == WHOLE_IMAGE else patch
    pw = width if patch == WHOLE_IMAGE else patch
    return -(-height // ph), -(-width // pw), ph, pw


def patch_counts(
    prob: torch.Tensor, fg: torch.Tensor, valid: torch.Tensor, patch: int, grid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct, union): (B, gh, gw, T) pixel counts of every patch binarized at every
    threshold (`prob >= t`) against the truth.

    prob: (B, H, W) foreground probability; fg, valid: (B, H, W) bool. Invalid (ignored or
    padded) pixels count nowhere. Patches at the right/bottom border are smaller when `patch`
    does not divide the image.
    """
    b, h, w = prob.shape
    gh, gw, ph, pw = _grid_shape(h, w, patch)
    bins = grid.numel() + 1
    # bin k = how many thresholds are <= prob: the pixel is predicted at thresholds 0..k-1
    level = torch.bucketize(prob.to(grid.dtype).contiguous(), grid, right=True)
    rows = torch.arange(h, device=prob.device) // ph
    cols = torch.arange(w, device=prob.device) // pw
    cell = (rows[:, None] * gw + cols[None, :]).expand(b, h, w)
    cell = cell + torch.arange(b, device=prob.device)[:, None, None] * (gh * gw)
    index = cell * bins + level
    size = b * gh * gw * bins
    every = torch.bincount(index[valid], minlength=size).view(b, gh, gw, bins)
    hits = torch.bincount(index[valid & fg], minlength=size).view(b, gh, gw, bins)
    # predicted at threshold j  <=>  level > j: suffix sums from bin j+1
    predicted = every.flip(-1).cumsum(-1).flip(-1)[..., 1:].double()
    correct = hits.flip(-1).cumsum(-1).flip(-1)[..., 1:].double()
    truth = hits.sum(-1, keepdim=True).double()
    return correct, truth + predicted - correct


def patch_iou_table(
    prob: torch.Tensor, fg: torch.Tensor, valid: torch.Tensor, patch: int, grid: torch.Tensor
) -> torch.Tensor:
    """(B, gh, gw, T) IoU of every patch binarized at every threshold (see `patch_counts`)."""
    return iou_of_counts(*patch_counts(prob, fg, valid, patch, grid))


def iou_of_counts(correct: torch.Tensor, union: torch.Tensor) -> torch.Tensor:
    """correct / union; 1 where both prediction and truth are empty (union 0)."""
    return torch.where(union > 0, correct / union.clamp_min(1), torch.ones_like(union))


def patch_map(per_patch: torch.Tensor, height: int, width: int, patch: int) -> torch.Tensor:
    """(B, gh, gw) one value per patch -> (B, height, width), each pixel its patch's value."""
    _, _, ph, pw = _grid_shape(height, width, patch)
    return per_patch.repeat_interleave(ph, 1).repeat_interleave(pw, 2)[:, :height, :width]


def best_thresholds(iou: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """(…, T) IoU table -> (…) best threshold; ties go to the threshold closest to 0.5."""
    best = iou.max(-1, keepdim=True).values
    distance = (grid - 0.5).abs().expand_as(iou)
    pick = torch.where(iou == best, distance, torch.full_like(distance, torch.inf)).argmin(-1)
    return grid[pick]


def patch_pseudo_labels(
    prob: torch.Tensor, fg: torch.Tensor, valid: torch.Tensor, patch: int, grid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels (B, H, W) uint8, thresholds (B, H, W) float32): each pixel binarized at the
    optimal threshold of its patch, and that threshold as a per-pixel map."""
    per_patch = best_thresholds(patch_iou_table(prob, fg, valid, patch, grid), grid)
    full = patch_map(per_patch, *prob.shape[1:], patch)
    labels = (prob.to(grid.dtype) >= full).to(torch.uint8)
    return labels, full.float()


def foreground_iou(pred: torch.Tensor, fg: torch.Tensor, valid: torch.Tensor) -> tuple[int, int]:
    """(intersection, union) pixel counts of a binary prediction over valid pixels."""
    pred, fg = pred.bool() & valid, fg & valid
    return int((pred & fg).sum()), int((pred | fg).sum())
