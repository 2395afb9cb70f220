"""A method written outside `raysegbg/`, used by tests/test_plugin.py: it is named by its import
path (`method.name=tests.toy_method:Toy`, settings under `method.toy.*`) and uses the general
interface: its own training step through the loop's optimiser, and an EMA teacher updated in
`after_step` that predicts."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from raysegbg.config import check, param
from raysegbg.methods.base import Batch, Method, Optim, Stage, Step, StepInfo
from raysegbg.methods.losses import cross_entropy, soft_dice
from raysegbg.models import build_model


@dataclass(frozen=True)
class ToyParams:
    """A segmentation net trained as usual; a slow-moving copy of it predicts."""

    ema: float = param(0.8, "teacher <- ema * teacher + (1 - ema) * student, after every step")
    dice_weight: float = param(0.5, "soft Dice next to cross entropy")

    def __post_init__(self) -> None:
        check(0 <= self.ema < 1, "method.toy.ema must be in [0, 1)")


class Toy(Method):
    Params = ToyParams

    def __init__(self, cfg, num_classes: int, in_channels: int, ignore_index: int):
        super().__init__(cfg, num_classes, in_channels, ignore_index)
        self.student = build_model(cfg.model, in_channels, num_classes)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)

    def optimizers(self, stage: Stage) -> list[Optim]:
        return [Optim("student", self.student)]

    def training_step(self, batch: Batch, step: Step) -> dict[str, torch.Tensor]:
        logits = step.module("student")(batch.images)
        losses = {"ce": cross_entropy(logits, batch.masks, self.ignore_index),
                  "dice": soft_dice(logits, batch.masks, self.ignore_index)}  # fmt: skip
        losses["loss"] = losses["ce"] + self.params.dice_weight * losses["dice"]
        step.optimize(losses["loss"], "student")
        return losses

    @torch.no_grad()
    def after_step(self, batch: Batch, info: StepInfo) -> dict[str, float]:
        for t, s in zip(self.teacher.state_dict().values(), self.student.state_dict().values(),
                        strict=True):  # fmt: skip
            if t.is_floating_point():
                t.mul_(self.params.ema).add_(s, alpha=1 - self.params.ema)
            else:
                t.copy_(s)
        return {"teacher_gap": float(sum((a - b).abs().sum() for a, b in zip(
            self.teacher.parameters(), self.student.parameters(), strict=True)))}  # fmt: skip

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.teacher(images)
