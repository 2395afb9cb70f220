"""The optimiser and the learning-rate schedule of a training stage."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from raysegbg.config import OptimConfig
from raysegbg.errors import RaysegbgError

if TYPE_CHECKING:
    from raysegbg.methods.base import Optim

KINDS = ("adamw", "adam", "sgd")


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
