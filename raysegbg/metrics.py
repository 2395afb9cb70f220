"""Segmentation metrics from one confusion matrix, summed over ranks before anything is derived.

Foreground means "any class but 0 (background)": foreground Dice, precision, recall and the
false-positive rate (background pixels called foreground, i.e. over-segmentation) are computed
on that binary split, so they mean the same for binary and multi-class tasks.
"""

from __future__ import annotations

import numpy as np
import torch


def confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int):
    """(num_classes, num_classes) counts, rows = truth, columns = prediction."""
    valid = target != ignore_index
    idx = target[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else float("nan")


def summarize(cm: np.ndarray, class_names: list[str] | None = None) -> dict[str, float]:
    """Every validation metric, keyed by its TensorBoard tag suffix."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    out = {"miou": float(np.nanmean(iou)), "pixel_acc": _ratio(tp.sum(), cm.sum())}
    names = class_names or [str(i) for i in range(len(cm))]
    for name, value in zip(names, iou, strict=True):
        out[f"iou/{name}"] = float(value)
    fg_tp = cm[1:, 1:].sum()
    fg_fp = cm[0, 1:].sum()
    fg_fn = cm[1:, 0].sum()
    bg_tn = cm[0, 0]
    out["fg_dice"] = _ratio(2 * fg_tp, 2 * fg_tp + fg_fp + fg_fn)
    out["precision"] = _ratio(fg_tp, fg_tp + fg_fp)
    out["recall"] = _ratio(fg_tp, fg_tp + fg_fn)
    out["fpr"] = _ratio(fg_fp, fg_fp + bg_tn)
    return out
