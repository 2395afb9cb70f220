"""A method's optimisers (`Optim`: what each trains and how), their torch optimisers and the
learning-rate schedule of a training stage."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from raysegbg.config import OptimConfig
from raysegbg.errors import RaysegbgError

KINDS = ("adamw", "adam", "sgd")


@dataclass(frozen=True)
class Optim:
    """One optimiser of a stage: what it trains and how.

    `module` is what DDP wraps (when workers > 1) and what `Step.module(name)` calls; `params`
    (default: the module's trainable parameters) is what the optimiser updates, and DDP
    ignores the module's other parameters. With `ddp=False` the module is not wrapped and the
    loop all-reduces the optimiser's gradients after each backward (for gradients that are not
    a plain forward/backward, e.g. a meta-gradient). `lr`, `kind` and `weight_decay` default
    to `optim.*`; `schedule=False` keeps the lr constant instead of following `optim.schedule`.
    """

    name: str
    module: nn.Module
    params: tuple[nn.Parameter, ...] | None = None
    lr: float | None = None
    kind: str | None = None  # adamw | adam | sgd
    weight_decay: float | None = None
    schedule: bool = True
    ddp: bool = True

    def parameters(self) -> list[nn.Parameter]:
        params = self.module.parameters() if self.params is None else self.params
        return [p for p in params if p.requires_grad]


def make_optimizer(cfg: OptimConfig, spec: Optim) -> torch.optim.Optimizer:
    """A torch optimiser for a method's `Optim` (unset fields come from `optim.*`)."""
    params = spec.parameters()
    kind = spec.kind or cfg.name
    lr = spec.lr if spec.lr is not None else cfg.lr
    decay = spec.weight_decay if spec.weight_decay is not None else cfg.weight_decay
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=decay)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=decay)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=decay)
    raise RaysegbgError(f"optimiser {spec.name}: kind {kind!r} is not one of {', '.join(KINDS)}")


def lr_scale(cfg: OptimConfig, step: int, total: int) -> float:
    """Multiplier of the base learning rate at `step` (linear warm-up, then the schedule)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "poly":
        return (1 - progress) ** 0.9
    return 1.0
