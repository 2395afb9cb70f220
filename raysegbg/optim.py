"""The optimiser and the learning-rate schedule of a training stage."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from raysegbg.config import OptimConfig


def make_optimizer(cfg: OptimConfig, params: Iterable[torch.nn.Parameter]):
    params = [p for p in params if p.requires_grad]
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


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
