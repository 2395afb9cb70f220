"""prn's settings (`method.prn.*`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from raysegbg.config import check, check_choice, param


@dataclass(frozen=True)
class PrnParams:
    """PatchRefineNet: a refiner trained on optimal patch-wise binarizations of a base model.

    Three stages in one run: the base model (`base_epochs`), pseudo-labels on the held-out
    images, then the refiner for `train.epochs` epochs.
    """

    base_epochs: int = param(10, "epochs of the base model (stage 1)")
    base_checkpoint: str = param("", "a baseline/prn run or checkpoint folder to use as the base")
    holdout: float = param(0.5, "share of the training split kept from the base, for the refiner")
    holdout_group: str = param(
        "", "regex whose first group names an image's group: the holdout takes whole groups "
        "(e.g. blocks of slices, so the base never trained on a held-out slice's neighbours)",
    )  # fmt: skip
    cross_fit: bool = param(
        False, "label every training image with a base that never saw it: two fold bases label "
        "each other's images, the refiner trains on all of them, and the base it refines at "
        "inference trains on the whole split",
    )  # fmt: skip
    refine_augment: bool = param(
        False, "refine on augmented crops (data.*), pseudo-labels searched per batch"
    )
    bias_augment: float = param(
        0.0, "std (logits) of a random offset on each refiner training image's base logit, one "
        "value per largest patch plus one per image, so the refiner learns to undo regional "
        "bias (a constant shift only moves a patch's optimal threshold); 0: off",
    )  # fmt: skip
    patch_sizes: tuple[int, ...] = param((8, 16), "one pseudo-label set and local head per size")
    thresholds: int = param(20, "threshold grid 1/n, 2/n, ..., 1.0")
    pseudo_weight: float = param(0.7, "loss weight on the patch pseudo-labels")
    gt_weight: float = param(0.3, "loss weight on the ground truth")
    dice_weight: float = param(0.5, "soft Dice next to cross entropy in both")
    use_image: bool = param(True, "give the refiner the image next to the base probability")
    residual: bool = param(True, "heads correct the base logit (and start as the base)")
    threshold_heads: bool = param(False, "also predict each patch's threshold (head t<p>)")
    threshold_weight: float = param(1.0, "loss on the threshold heads' expected patch IoU")
    inference: str = param("mean", "mean of the heads | best: the head (or mean) best on val")
    refiner_encoder: str = param("resnet18", "smp encoder of the refiner")
    refiner_depth: int = param(3, "encoder depth of the refiner")

    def __post_init__(self) -> None:
        check_choice("method.prn.inference", self.inference, ("best", "mean"))
        for ok, message in _checks(self):
            check(ok, message)


def _checks(p: PrnParams) -> list[tuple[bool, str]]:
    return [
        (bool(p.patch_sizes), "method.prn.patch_sizes needs at least one size, e.g. [8,16]"),
        (all(s >= 2 for s in p.patch_sizes), "method.prn.patch_sizes must all be >= 2"),
        (0 <= p.holdout < 1, "method.prn.holdout must be in [0, 1), e.g. 0.5"),
        (p.threshold_weight >= 0, "method.prn.threshold_weight must be >= 0"),
        (p.bias_augment >= 0, "method.prn.bias_augment must be >= 0 (a std in logits, e.g. 1)"),
        (
            not (p.cross_fit and p.base_checkpoint),
            "method.prn.cross_fit trains its own bases: drop method.prn.base_checkpoint or set "
            "method.prn.cross_fit=false",
        ),
        (
            not p.cross_fit or p.holdout > 0,
            "method.prn.cross_fit needs method.prn.holdout > 0 (e.g. 0.5): its two folds are the "
            "held-out share and the rest",
        ),
        (
            _regex_with_group(p.holdout_group),
            f"method.prn.holdout_group {p.holdout_group!r} is not a regular expression with a "
            "group: write one like '(.*_z\\d\\d)\\d$' (the group names the image's group)",
        ),
        (p.thresholds >= 2, "method.prn.thresholds must be >= 2 (20 gives 0.05 ... 1.0)"),
        (p.base_epochs >= 1, "method.prn.base_epochs must be >= 1"),
        (
            p.pseudo_weight >= 0 and p.gt_weight >= 0 and p.pseudo_weight + p.gt_weight > 0,
            "method.prn.pseudo_weight and gt_weight must be >= 0 and not both 0",
        ),
    ]


def _regex_with_group(text: str) -> bool:
    """Empty, or a regular expression with at least one group."""
    try:
        return not text or re.compile(text).groups >= 1
    except re.error:
        return False
