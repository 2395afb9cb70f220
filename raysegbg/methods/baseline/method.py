"""`baseline`: the plain segmentation model, cross entropy plus optional soft Dice."""

from __future__ import annotations

import torch

from raysegbg.config import Config
from raysegbg.methods.base import Batch, Method, StepInfo
from raysegbg.methods.baseline.params import BaselineParams
from raysegbg.methods.losses import cross_entropy, soft_dice
from raysegbg.models import build_model


class Baseline(Method):
    Params = BaselineParams

    def __init__(self, cfg: Config, num_classes: int, in_channels: int, ignore_index: int):
        super().__init__(cfg, num_classes, in_channels, ignore_index)
        self.net = build_model(cfg.model, in_channels, num_classes)
        weights = self.params.class_weights
        if weights and len(weights) != num_classes:
            from raysegbg.errors import RaysegbgError

            raise RaysegbgError(
                f"method.baseline.class_weights has {len(weights)} values but the dataset has "
                f"{num_classes} classes: give one weight per class"
            )
        self.register_buffer(
            "class_weights", torch.tensor(weights, dtype=torch.float32) if weights else None
        )

    def forward(self, batch: Batch, info: StepInfo) -> dict[str, torch.Tensor]:
        logits = self.net(batch.images)
        losses = {"ce": cross_entropy(logits, batch.masks, self.ignore_index, self.class_weights)}
        if self.params.dice_weight > 0:
            losses["dice"] = soft_dice(logits, batch.masks, self.ignore_index)
        losses["loss"] = self.params.ce_weight * losses[
            "ce"
        ] + self.params.dice_weight * losses.get("dice", 0.0)
        return losses

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)
