"""The small interface every method implements; the training loop knows nothing else."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True)
class Stage:
    """One stage of a method, run in order by the same entry point, each checkpointed.

    A training stage (`epochs` > 0) trains `optim_parameters()` for that many epochs; a one-shot
    stage (`epochs` == 0) runs `Method.run_stage` once and counts as one epoch (it is reported
    and checkpointed like one).
    """

    name: str
    epochs: int = 0
    keep: Callable[[str], bool] | None = None  # which training-split ids it sees (None: all)
    augment: bool = True  # False: whole images, no crop/scale/flip


@dataclass
class StageRun:
    """What a stage hook may use: the stage's share of the training split and the run."""

    dataset: Any  # SegDataset of the stage's training images
    device: torch.device
    rank: int
    world_size: int
    state: Any  # the shared-state client on rank 0, else None
    log: Callable[[str], None]
    train_dataset: Any  # the whole training split (SegDataset)


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

    @classmethod
    def check_data(cls, cfg: Config, num_classes: int) -> None:
        """Reject a dataset the method cannot train on (called before Ray starts)."""

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

    def stages(self) -> list[Stage]:
        """The stages run in order; most methods have one."""
        return [Stage("train", self.cfg.train.epochs)]

    def enter_stage(self, stage: Stage, run: StageRun) -> None:
        """Runs on every rank when a stage starts (or a run resumes inside it), before the
        stage's optimiser is built: e.g. choose which networks train, load pseudo-labels."""

    def run_stage(self, stage: Stage, run: StageRun) -> dict[str, float]:
        """The work of a one-shot stage (every rank calls it); returns scalars to report."""
        raise NotImplementedError(f"{type(self).__name__} has no one-shot stage '{stage.name}'")

    def before_step(self, batch: Batch, info: StepInfo) -> dict[str, float]:
        """Runs on the unwrapped method before each training step (e.g. a meta-update);
        returns scalars to log. Every rank calls it at the same steps."""
        return {}

    def after_epoch(self, val_batches: Callable[[], Any]) -> dict[str, float]:
        """Runs on every rank after each training epoch, before validation; `val_batches()`
        yields this rank's validation batches (on the device). Returns scalars to report."""
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
