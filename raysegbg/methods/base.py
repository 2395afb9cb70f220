"""The small interface every method implements; the training loop knows nothing else."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from raysegbg.config import Config


@dataclass
class Batch:
    """One rank's share of a global batch (unlabeled rows only when the method asks)."""

    images: torch.Tensor  # (B, C, H, W) float
    masks: torch.Tensor  # (B, H, W) long, ignore_index where unknown
    ids: list[str]


@dataclass
class StepInfo:
    step: int  # global optimisation step, 0-based
    epoch: int
    lr_scale: float  # current lr / base lr (some methods tie momenta to it)


class Method(nn.Module):
    """A segmentation method: owns its networks, computes its losses, predicts logits.

    `forward` returns a dict of named losses with the total under "loss"; it is what DDP wraps,
    so every parameter that gets gradients must be reached through it.
    """

    uses_unlabeled = False
    needs_shared_state = False  # memories / pseudo-labels hosted by the run's state actor

    def __init__(self, cfg: Config, num_classes: int, in_channels: int, ignore_index: int):
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.ignore_index = ignore_index

    def forward(self, batch: Batch, info: StepInfo) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes, H, W) for evaluation and inference."""
        raise NotImplementedError

    def optim_parameters(self):
        """Parameters of the main optimiser (methods with their own inner optimiser narrow it)."""
        return self.parameters()

    def ddp_ignored_modules(self) -> list[str]:
        """Submodules DDP must not synchronise (their gradients are reduced by the method)."""
        return []

    def before_step(self, batch: Batch, info: StepInfo) -> dict[str, float]:
        """Runs on the unwrapped method before each training step (e.g. a meta-update);
        returns scalars to log. Every rank calls it at the same steps."""
        return {}

    def tb_histograms(self) -> dict:
        """Method-specific histograms for TensorBoard (tag -> 1-D array), once per epoch."""
        return {}

    def tb_images(self) -> dict:
        """Method-specific images for TensorBoard (tag -> H×W×3 uint8), once per epoch."""
        return {}

    def shared_state(self) -> list[str]:
        """Names of the shared-state entries (memories, pseudo-label stores) this method uses."""
        return []
