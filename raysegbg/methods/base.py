"""The small interface every method implements; the training loop knows nothing else.

A method is an `nn.Module` that owns its networks and says, per stage, which optimisers train
what (`optimizers`), which rows it reads (`streams`) and how one step goes (`training_step`).
The loop does what is generic: lr schedules, autocast and gradient scaling, the gradient
all-reduce (DDP, or by hand for modules outside DDP), clipping, logging and checkpoints. Most
methods only write `forward(batch, info) -> losses` and inherit the one-optimiser step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from raysegbg.config import Config, to_dict
from raysegbg.data.batch import Batch, Stream
from raysegbg.optim import Optim

__all__ = ["Batch", "Method", "Optim", "Stage", "StageRun", "Step", "StepInfo", "Stream"]


@dataclass
class StepInfo:
    step: int  # global optimisation step, 0-based
    epoch: int
    lr_scale: float  # current lr / base lr of the run's schedule (some methods tie momenta to it)


@dataclass(frozen=True)
class Stage:
    """One stage of a method, run in order by the same entry point, each checkpointed.

    A training stage (`epochs` > 0) trains the stage's `optimizers()` for that many epochs; a
    one-shot stage (`epochs` == 0) runs `Method.run_stage` once and counts as one epoch (it is
    reported and checkpointed like one). Methods subclass it to say what a stage does.
    """

    name: str
    epochs: int = 0
    keep: Callable[[str], bool] | None = None  # which training-split ids it sees (None: all)
    augment: bool = True  # False: whole images, no crop/scale/flip


@dataclass(frozen=True)
class SharedStage:
    """A training stage whose result other runs and trials reuse (`state/sharing.py`).

    name: what the result is (e.g. `prn-base`); settings: every setting the stage's training
    reads, as flat `section.key` values (the result's key, with the dataset and the seed);
    prefixes: the method's parameters and buffers it produces (`base.`); version: the stage
    code's version, raised whenever what the stage computes changes.
    """

    name: str
    settings: dict[str, Any]
    prefixes: tuple[str, ...]
    version: str


def training_settings(cfg: Config) -> dict[str, Any]:
    """The settings every trained stage's result depends on, as flat `section.key` values:
    data, model and optimiser, the batch, steps, AMP, workers and device, and the score (a
    stage result records the best one). Not the data loader's speed settings."""
    flat = {f"{section}.{k}": v for section in ("data", "model", "optim")
            for k, v in to_dict(getattr(cfg, section)).items()}  # fmt: skip
    for key in ("workers", "prefetch", "cache"):  # speed only
        flat.pop(f"data.{key}")
    train = cfg.train
    flat.update({
        "train.batch_size": train.batch_size, "train.steps_per_epoch": train.steps_per_epoch,
        "train.amp": train.amp, "scaling.workers": cfg.scaling.workers,
        "scaling.use_gpu": cfg.scaling.use_gpu, "logging.score": cfg.logging.score,
    })  # fmt: skip
    return flat


class Step(Protocol):
    """What a training step may ask of the loop (see `raysegbg.train.StepRunner`)."""

    info: StepInfo

    def module(self, name: str) -> nn.Module:
        """Optimiser `name`'s module, DDP-wrapped when it is: call it for the forward pass."""

    def backward(self, loss: torch.Tensor, *names: str) -> None:
        """Clear the named optimisers' gradients, then back-propagate `loss` (AMP-scaled)."""

    def step(self, *names: str) -> None:
        """All-reduce (outside DDP), unscale, clip and apply the named optimisers' gradients."""

    def optimize(self, loss: torch.Tensor, *names: str) -> None:
        """`backward` then `step`."""

    def log(self, **scalars: float) -> None:
        """Scalars of this step for TensorBoard (`train/<name>`, every few steps)."""


@dataclass
class StageRun:
    """What a stage hook may use: the stage's share of the training split and the run."""

    dataset: Any  # SegDataset of the stage's training images
    device: torch.device
    rank: int
    world_size: int
    state: Any  # the shared-state client (every rank), or None
    log: Callable[[str], None]
    train_dataset: Any  # the whole training split (SegDataset)


class Method(nn.Module):
    """A segmentation method: owns its networks, computes its losses, predicts logits.

    `Params` is the frozen dataclass of its settings (`method.<name>.*`, with defaults, help
    and validation in `__post_init__`), found by the config through the registry.
    """

    Params: ClassVar[type | None] = None
    needs_shared_state: ClassVar[bool] = False  # memories / pseudo-labels in the state actor
    # its mechanism-off control (`raysegbg compare`): the method's own settings that switch the
    # mechanism off and leave the architecture; empty: no control (the baseline)
    control: ClassVar[dict[str, object]] = {}
    supervision: ClassVar[str] = "masks"  # what it trains from, shown in comparisons

    def __init__(self, cfg: Config, num_classes: int, in_channels: int, ignore_index: int):
        super().__init__()
        self.cfg = cfg
        self.params = cfg.method.params
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.ignore_index = ignore_index

    @classmethod
    def check_data(cls, cfg: Config, num_classes: int) -> None:
        """Reject a dataset the method cannot train on (called before Ray starts)."""

    # -- what the loop asks, per stage ----------------------------------------------------
    def stages(self) -> list[Stage]:
        """The stages run in order; most methods have one."""
        return [Stage("train", self.cfg.train.epochs)]

    def streams(self) -> dict[str, Stream]:
        """The rows read each step: `train` (whose length sets the epoch) and, optionally,
        `unlabeled` (attached as `batch.unlabeled`)."""
        return {"train": Stream()}

    def optimizers(self, stage: Stage) -> list[Optim]:
        """The optimisers of a training stage; the default trains every parameter."""
        return [Optim("main", self)]

    def enter_stage(self, stage: Stage, run: StageRun) -> None:
        """Runs on every rank when a stage starts (or a run resumes inside it), before the
        stage's optimisers are built: e.g. choose which networks train, load pseudo-labels."""

    def shared_stage(self, stage: Stage) -> SharedStage | None:
        """Whether `stage` can be reused by runs and trials that agree on its settings (and
        how); None: it is always computed by the run itself."""
        return None

    def stage_dataset(self, stage: Stage, run: StageRun) -> Any:
        """The rows a training stage reads (after `enter_stage`): by default the stage's share
        of the training split, e.g. `run.dataset.with_masks(pseudo_masks)` to train on masks
        the method made."""
        return run.dataset

    def run_stage(self, stage: Stage, run: StageRun) -> dict[str, float]:
        """The work of a one-shot stage (every rank calls it); returns scalars to report."""
        raise NotImplementedError(f"{type(self).__name__} has no one-shot stage '{stage.name}'")

    # -- one step ---------------------------------------------------------------------------
    def training_step(self, batch: Batch, step: Step) -> dict[str, torch.Tensor]:
        """One optimisation step; returns named losses (the total under "loss") to log. The
        default: `forward` through the (DDP-wrapped) method, one optimiser."""
        losses = step.module("main")(batch, step.info)
        step.optimize(losses["loss"], "main")
        return losses

    def forward(self, batch: Batch, info: StepInfo) -> dict[str, torch.Tensor]:
        """The losses of the default training step: a dict with the total under "loss"."""
        raise NotImplementedError

    def after_step(self, batch: Batch, info: StepInfo) -> dict[str, float]:
        """Runs on every rank after the optimisers stepped (e.g. a memory or EMA update);
        returns scalars to log."""
        return {}

    def after_epoch(self, val_batches: Callable[[], Any]) -> dict[str, float]:
        """Runs on every rank after each training epoch, before validation; `val_batches()`
        yields this rank's validation batches (on the device). Returns scalars to report."""
        return {}

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes, H, W) for evaluation and inference."""
        raise NotImplementedError

    # -- TensorBoard ------------------------------------------------------------------------
    def tb_histograms(self) -> dict:
        """Method-specific histograms for TensorBoard (tag -> 1-D array), once per epoch."""
        return {}

    def tb_images(self) -> dict:
        """Method-specific images for TensorBoard (tag -> H×W×3 uint8), once per epoch."""
        return {}
