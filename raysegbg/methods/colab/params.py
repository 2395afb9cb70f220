"""`colab`'s settings (`method.colab.*`): no torch here, so a config loads fast."""

from __future__ import annotations

from dataclasses import dataclass

from raysegbg.config import check, check_choice, param


@dataclass(frozen=True)
class ColabParams:
    """Context Label Learning: background split into K learned context classes."""

    k: int = param(3, "context subclasses of the background")
    update_interval: int = param(4, "steps between meta-updates of the task generator")
    generator_encoder: str = param("resnet18", "smp encoder of the task generator")
    generator_depth: int = param(3, "encoder depth of the task generator")
    generator_lr: float = param(1e-3, "Adam lr of the task generator (constant)")
    virtual_lr: float = param(0.01, "step size of the virtual SGD step of the segmentation net")
    dice_weight: float = param(0.5, "soft Dice next to soft cross entropy")
    distance_weighting: bool = param(False, "push far-away background toward context 0")
    distance_max: int = param(16, "pixels from the foreground at which the push is full")
    meta_update: bool = param(True, "false: a frozen random generator (the control)")
    meta_batch: str = param("same", "same | holdout: where the meta (ROI) loss is measured")
    meta_holdout: float = param(0.2, "with holdout: share of the training split for meta batches")

    def __post_init__(self) -> None:
        check_choice("method.colab.meta_batch", self.meta_batch, ("same", "holdout"))
        check(0 < self.meta_holdout < 1, "method.colab.meta_holdout must be in (0, 1), e.g. 0.2")
        check(self.k >= 1, "method.colab.k must be >= 1 (context subclasses)")
        check(self.update_interval >= 1, "method.colab.update_interval must be >= 1 (steps)")
        check(self.generator_lr > 0 and self.virtual_lr > 0,
              "method.colab.generator_lr and virtual_lr must be > 0")  # fmt: skip
