"""Segmentation metrics from one confusion matrix, summed over ranks before anything is derived.

Foreground means "any class but 0 (background)": foreground Dice, precision, recall and the
false-positive rate (background pixels called foreground, i.e. over-segmentation) are computed
on that binary split, so they mean the same for binary and multi-class tasks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int):
    """(num_classes, num_classes) counts, rows = truth, columns = prediction."""
    valid = target != ignore_index
    idx = target[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else float("nan")


def f1_scores(tp: float, fp: float, fn: float) -> dict[str, float]:
    """F1 (Dice), precision and recall from true/false positive and false negative counts
    (NaN where undefined)."""
    return {"f1": _ratio(2 * tp, 2 * tp + fp + fn), "precision": _ratio(tp, tp + fp),
            "recall": _ratio(tp, tp + fn)}  # fmt: skip


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
    fg = f1_scores(fg_tp, fg_fp, fg_fn)
    out.update(fg_dice=fg["f1"], precision=fg["precision"], recall=fg["recall"])
    out["fpr"] = _ratio(fg_fp, fg_fp + bg_tn)
    return out


def per_class(cm: np.ndarray, class_names: list[str] | None = None) -> dict[str, dict]:
    """Per class: IoU, Dice, precision, recall (NaN where undefined, e.g. a class absent from
    both truth and prediction) and its true pixel count."""
    cm = np.asarray(cm, dtype=np.float64)
    tp, truth, predicted = np.diag(cm), cm.sum(1), cm.sum(0)
    names = class_names or [str(i) for i in range(len(cm))]
    return {
        name: {
            "iou": _ratio(tp[k], truth[k] + predicted[k] - tp[k]),
            "dice": _ratio(2 * tp[k], truth[k] + predicted[k]),
            "precision": _ratio(tp[k], predicted[k]),
            "recall": _ratio(tp[k], truth[k]),
            "pixels": int(truth[k]),
        }
        for k, name in enumerate(names)
    }


@dataclass
class Evaluation:
    """A split's confusion matrix (rows: truth, columns: prediction, in pixels) and every
    metric derived from it, as `raysegbg eval` prints and writes them."""

    confusion: np.ndarray
    classes: list[str]
    samples: int

    @property
    def metrics(self) -> dict[str, float]:
        return {**summarize(self.confusion, self.classes), "samples": float(self.samples)}

    def to_dict(self) -> dict:
        """JSON-ready: the flat metrics, then `per_class` and `confusion`."""
        matrix = {"rows": "truth", "columns": "prediction", "classes": list(self.classes),
                  "pixels": np.asarray(self.confusion).astype(int).tolist()}  # fmt: skip
        return {**self.metrics, "per_class": per_class(self.confusion, self.classes),
                "confusion": matrix}  # fmt: skip

    def lines(self, title: str) -> list[str]:
        """The summary metrics under `title`, a per-class table and the confusion matrix."""
        summary = {k: v for k, v in self.metrics.items() if not k.startswith("iou/")}
        width = max(len(k) for k in summary)
        out = [f"{'metric':<{width}}  value   ({title})"]
        out += [f"{k:<{width}}  {v:.0f}" if k == "samples" else f"{k:<{width}}  {v:.4f}"
                for k, v in summary.items()]  # fmt: skip
        rows = per_class(self.confusion, self.classes)
        name_w = max(len("class"), *(len(c) for c in self.classes))
        out += ["", f"{'class':<{name_w}}  {'IoU':>6}  {'Dice':>6}  {'prec':>6}  {'recall':>6}"
                f"  {'pixels':>10}"]  # fmt: skip
        for name, m in rows.items():
            cells = "  ".join(f"{m[k]:>6.4f}" for k in ("iou", "dice", "precision", "recall"))
            out.append(f"{name:<{name_w}}  {cells}  {m['pixels']:>10d}")
        cm = np.asarray(self.confusion).astype(int)
        cell = max(8, len(str(cm.max(initial=0))), *(len(c) for c in self.classes))
        out += ["", "confusion matrix (pixels; rows: truth, columns: prediction)",
                f"{'':<{name_w}}  " + "  ".join(f"{c:>{cell}}" for c in self.classes)]  # fmt: skip
        for name, row in zip(self.classes, cm, strict=True):
            out.append(f"{name:<{name_w}}  " + "  ".join(f"{v:>{cell}d}" for v in row))
        return out
