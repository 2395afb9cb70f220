"""The optimisers of one training stage, and the `Step` API a method's training step uses.

Each optimiser a method declares (`Optim`) gets its own torch optimiser, AMP grad scaler and
lr, and its module is DDP-wrapped, or, with `ddp=False`, its gradients are all-reduced here
after the backward. The loop builds one `StepRunner` per training stage.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from raysegbg import dist
from raysegbg.config import OptimConfig
from raysegbg.methods.base import StepInfo
from raysegbg.optim import Optim, make_optimizer


class StepRunner:
    """Implements `raysegbg.methods.base.Step` over a stage's optimisers."""

    def __init__(self, specs: list[Optim], cfg: OptimConfig, device: torch.device,
                 amp_dtype: torch.dtype | None):  # fmt: skip
        self.cfg, self.device = cfg, device
        self.specs = {spec.name: spec for spec in specs}
        self.modules = {spec.name: _wrap(spec, device) for spec in specs}
        self.optimizers = {spec.name: make_optimizer(cfg, spec) for spec in specs}
        scaled = amp_dtype == torch.float16  # bf16 and float32 need no loss scaling
        self.scalers = {s.name: torch.amp.GradScaler(device.type, enabled=scaled) for s in specs}
        self.info = StepInfo(0, 0, 1.0)
        self.logged: dict[str, float] = {}  # scalars a step asked to log

    def set_lr(self, scale: float) -> None:
        """Every scheduled optimiser at `scale` × its base lr (the others stay at theirs)."""
        for name, opt in self.optimizers.items():
            spec = self.specs[name]
            base = spec.lr if spec.lr is not None else self.cfg.lr
            for group in opt.param_groups:
                group["lr"] = base * scale if spec.schedule else base

    def lr(self) -> float:
        """The first optimiser's current lr (what TensorBoard's `lr` shows)."""
        return next(iter(self.optimizers.values())).param_groups[0]["lr"]

    # -- the Step API -------------------------------------------------------------------
    def module(self, name: str) -> nn.Module:
        return self.modules[name]

    def backward(self, loss: torch.Tensor, *names: str) -> None:
        specs = [self.specs[n] for n in names]
        params = [p for spec in specs for p in spec.parameters()]
        for p in params:
            p.grad = None
        scaled = self.scalers[names[0]].scale(loss)  # one backward shares the first's scale
        with torch.autocast(self.device.type, enabled=False):
            if any(spec.ddp for spec in specs):
                scaled.backward()  # DDP's hooks reduce as the gradients arrive
            else:  # only these parameters' gradients (e.g. not a meta-gradient's inner net)
                torch.autograd.backward(scaled, inputs=params)

    def step(self, *names: str) -> None:
        for name in names:
            spec, opt, scaler = self.specs[name], self.optimizers[name], self.scalers[name]
            params = spec.parameters()
            if not spec.ddp:
                _average_over_ranks(params)
            if self.cfg.clip_norm > 0:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, self.cfg.clip_norm)
            scaler.step(opt)
            scaler.update()

    def optimize(self, loss: torch.Tensor, *names: str) -> None:
        self.backward(loss, *names)
        self.step(*names)

    def log(self, **scalars: float) -> None:
        self.logged.update(scalars)

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
            "scalers": {n: s.state_dict() for n, s in self.scalers.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
            self.scalers[name].load_state_dict(state["scalers"][name])


def _wrap(spec: Optim, device: torch.device) -> nn.Module:
    """DDP over the spec's module, ignoring the module's parameters another optimiser trains
    (and those submodules' buffers)."""
    if dist.world_size() == 1 or not spec.ddp:
        return spec.module
    keep = {id(p) for p in spec.parameters()}
    ignored = []
    for prefix, sub in spec.module.named_modules():
        dot = f"{prefix}." if prefix else ""
        own = [n for n, p in sub.named_parameters(recurse=False) if p.requires_grad]
        dropped = [n for n in own if id(getattr(sub, n)) not in keep]
        if dropped:
            ignored += [dot + n for n in dropped]
            ignored += [dot + n for n, _ in sub.named_buffers(recurse=False)]
    DDP._set_params_and_buffers_to_ignore_for_model(spec.module, ignored)
    ids = [device.index] if device.type == "cuda" else None
    return DDP(spec.module, device_ids=ids, find_unused_parameters=False)


def _average_over_ranks(params: list[nn.Parameter]) -> None:
    """Gradients of a module outside DDP: one flat all-reduce, then divide by the world size
    (a parameter without a gradient on this rank counts as zero)."""
    world = dist.world_size()
    if world == 1 or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = dist.all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]))
    for p, g in zip(params, flat.split([g.numel() for g in grads]), strict=True):
        p.grad = g.view_as(p) / world
