"""`rrn`'s settings (`method.rrn.*`): no torch here, so a config loads fast."""

from __future__ import annotations

import math
from dataclasses import dataclass

from raysegbg.config import check, check_choice, param


@dataclass(frozen=True)
class RrnParams:
    """Region relevance: two networks teach each other on unlabeled images, through region
    filters learnt on labeled ones."""

    labeled_fraction: float = param(
        1.0, "share of the training rows with a mask used as labeled (a fixed hash of the id); "
        "the rest, and rows without a mask, are the unlabeled stream, masks hidden",
    )  # fmt: skip
    unlabeled_batch: int = param(0, "unlabeled images per step (global); 0: train.batch_size")
    # threshold 0.97 (of 0.9 / 0.97) and the ramp-up / warm-up over the first third of the
    # epochs: chosen on validation, 3 seeds, both tasks of benchmarks/method_rrn.py
    threshold: float = param(
        0.97, "keep a pseudo-label region when its discriminator score (predicted accuracy) is "
        "above this; 0 keeps every region, 1 drops every region",
    )  # fmt: skip
    filter: str = param(
        "discriminator", "discriminator | oracle: what scores a region for the filter: the "
        "discriminators (the method), or the region's true pseudo-label accuracy from the "
        "hidden masks (a diagnostic: the best any region filter can do at this threshold; "
        "needs method.rrn.labeled_fraction < 1 on a fully labeled set)",
    )  # fmt: skip
    region: int = param(8, "region size in pixels (the discriminator's stride; a power of 2)")
    cps_weight: float = param(1.0, "weight of the unlabeled (cross pseudo-label) loss; 0: off")
    correction: bool = param(True, "lower a region's loss weight where the networks disagree")
    rampup_share: float = param(
        0.33, "share of train.epochs over which the unlabeled loss weight rises to cps_weight "
        "(a sigmoid-shaped ramp: networks trained from scratch first learn from the labels)",
    )  # fmt: skip
    warmup_share: float = param(
        0.33, "share of train.epochs of unfiltered cross pseudo supervision first (no region "
        "filter, no correction)",
    )  # fmt: skip
    cutmix: bool = param(True, "mix unlabeled pairs with a box (and their pseudo-labels)")
    disc_lr: float = param(1e-4, "Adam lr of the discriminators (constant)")
    disc_channels: int = param(32, "width of the discriminators' first layer")
    inference: str = param("average", "average | net1 | net2: which network predicts")
    label_images: int = param(
        -1, "unlabeled images labelled at the end of every epoch (pseudo-label store, kept vs "
        "dropped accuracy against hidden ground truth); -1: all, 0: none",
    )  # fmt: skip
    store_labels: bool = param(True, "write those pseudo-labels to the run's store")

    def __post_init__(self) -> None:
        check(0 < self.labeled_fraction <= 1,
              "method.rrn.labeled_fraction must be in (0, 1], e.g. 0.125")  # fmt: skip
        check(0 <= self.threshold <= 1, "method.rrn.threshold must be in [0, 1], e.g. 0.97")
        check(
            self.region >= 2 and math.log2(self.region).is_integer() and self.region <= 32,
            "method.rrn.region must be a power of 2 from 2 to 32 (pixels), e.g. 8",
        )
        check(self.unlabeled_batch >= 0, "method.rrn.unlabeled_batch must be >= 0")
        check(self.label_images >= -1, "method.rrn.label_images must be -1 (all), 0 or more")
        check(self.cps_weight >= 0 and math.isfinite(self.cps_weight),
              "method.rrn.cps_weight must be a finite number >= 0")  # fmt: skip
        check(0 <= self.warmup_share <= 1 and 0 <= self.rampup_share <= 1,
              "method.rrn.warmup_share and rampup_share must be in [0, 1], e.g. 0.33")  # fmt: skip
        check(self.disc_lr > 0 and self.disc_channels >= 1,
              "method.rrn.disc_lr must be > 0 and disc_channels >= 1")  # fmt: skip
        check_choice("method.rrn.inference", self.inference, ("average", "net1", "net2"))
        check_choice("method.rrn.filter", self.filter, ("discriminator", "oracle"))
