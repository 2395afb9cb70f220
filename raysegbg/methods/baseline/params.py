"""`baseline`'s settings (`method.baseline.*`): no torch here, so a config loads fast."""

from __future__ import annotations

from dataclasses import dataclass

from raysegbg.config import check, param


@dataclass(frozen=True)
class BaselineParams:
    """Plain supervised segmentation: cross entropy plus optional soft Dice."""

    ce_weight: float = param(1.0, "weight of the pixel cross entropy")
    dice_weight: float = param(0.5, "weight of the soft Dice of the foreground classes")
    class_weights: tuple[float, ...] = param((), "per-class cross-entropy weights (empty: 1)")

    def __post_init__(self) -> None:
        check(self.ce_weight >= 0 and self.dice_weight >= 0,
              "method.baseline.ce_weight and dice_weight must be >= 0")  # fmt: skip
        check(all(w >= 0 for w in self.class_weights),
              "method.baseline.class_weights must all be >= 0")  # fmt: skip
