"""`fbr`'s settings (`method.fbr.*`): no torch here, so a config loads fast."""

from __future__ import annotations

import math
from dataclasses import dataclass

from raysegbg.config import check, param


@dataclass(frozen=True)
class FbrParams:
    """Fine-grained background representation: CAMs from image-level labels, refined by
    contrasting uncertain foreground pixels with background clusters (NROIs) and with other
    classes' pixels; the CAMs' pseudo masks then train a segmentation network."""

    cam_epochs: int = param(8, "epochs of the CAM stage (classification + contrast)")
    pool_top: float = param(
        1.0, "a class's image-level logit is the mean of its score map's highest `pool_top` "
        "share of pixels (1: global average pooling, as in the CAM paper; small objects need "
        "less, or the maps spread over their background to raise the average)",
    )  # fmt: skip
    cam_threshold: float = param(
        0.0, "pseudo masks: a pixel is background unless a present class's normalised CAM "
        "reaches this; the class with the highest CAM wins. 0: chosen on the validation "
        "split's masks (the best mIoU of label-gated CAMs over 0.05, 0.10, ..., 0.95)",
    )  # fmt: skip
    bg_score: float = param(
        0.1, "the fixed background score of the training-time pseudo-labels (low: only pixels "
        "no class activates count as background, where the NROIs are clustered)",
    )  # fmt: skip
    sure: float = param(
        0.6, "a foreground pixel whose normalised CAM is below this is uncertain: an anchor of "
        "the contrastive losses",
    )  # fmt: skip
    nrois: int = param(8, "NROIs per image: k of the k-means over its background features")
    bank_size: int = param(4096, "NROIs kept in the memory bank (a ring buffer)")
    temperature: float = param(0.5, "temperature of both contrastive losses")
    nroi_weight: float = param(
        0.2, "weight of the pixel-to-NROI contrast (0.2: the best mean validation mIoU over "
        "contexts and mri-brain, 3 seeds each, of 0.2 and 0.5, benchmarks/method_fbr.py; "
        "contexts alone prefers 0.5 within one std, mri-brain 0.2 by 10 points); 0: off",
    )  # fmt: skip
    intra_weight: float = param(0.1, "weight of the intra-foreground contrast; 0: off")
    bg_weight: float = param(0.1, "weight of the background head's loss")
    negatives: int = param(256, "negatives per anchor class (NROIs, or other classes' pixels)")
    anchors: int = param(64, "uncertain foreground pixels drawn per image as anchors")
    proj_dims: int = param(64, "width of the foreground and background projections")
    kmeans_iters: int = param(10, "Lloyd iterations of the per-image k-means")
    dice_weight: float = param(0.5, "segmentation stage: soft Dice weight beside cross entropy")

    def __post_init__(self) -> None:
        check(self.cam_epochs >= 1, "method.fbr.cam_epochs must be >= 1")
        check(0 < self.pool_top <= 1, "method.fbr.pool_top must be in (0, 1], e.g. 0.1")
        check(
            0 <= self.cam_threshold < 1,
            "method.fbr.cam_threshold must be in [0, 1) (0: chosen on validation), e.g. 0.3",
        )
        for key in ("bg_score", "sure"):
            check(0 < getattr(self, key) < 1, f"method.fbr.{key} must be in (0, 1), e.g. 0.3")
        check(self.nrois >= 1 and self.bank_size >= self.nrois,
              "method.fbr.nrois must be >= 1 and bank_size >= nrois")  # fmt: skip
        check(self.temperature > 0, "method.fbr.temperature must be > 0, e.g. 0.5")
        for key in ("nroi_weight", "intra_weight", "bg_weight", "dice_weight"):
            value = getattr(self, key)
            check(value >= 0 and math.isfinite(value),
                  f"method.fbr.{key} must be a finite number >= 0")  # fmt: skip
        for key in ("negatives", "anchors", "proj_dims", "kmeans_iters"):
            check(getattr(self, key) >= 1, f"method.fbr.{key} must be >= 1")
