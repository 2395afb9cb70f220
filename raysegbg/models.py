"""Model factory over segmentation-models-pytorch (wrap smp, never re-implement models)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import segmentation_models_pytorch as smp
import torch
from torch import nn

from raysegbg import dist
from raysegbg.config import ModelConfig
from raysegbg.errors import RaysegbgError


def architectures() -> list[str]:
    return sorted(smp.MODEL_ARCHITECTURES_MAPPING)


def encoders() -> list[str]:
    return sorted(smp.encoders.get_encoder_names())


def check_model_config(cfg: ModelConfig) -> None:
    """Unknown names fail here, listing the valid ones, before any worker starts."""
    if cfg.arch.lower() not in smp.MODEL_ARCHITECTURES_MAPPING:
        raise RaysegbgError(
            f"unknown model.arch '{cfg.arch}': choose one of {', '.join(architectures())}"
        )
    if not cfg.encoder.startswith("tu-") and cfg.encoder not in smp.encoders.encoders:
        raise RaysegbgError(
            f"unknown model.encoder '{cfg.encoder}': choose one of {', '.join(encoders())} "
            "or a timm encoder as 'tu-<name>'"
        )
    if cfg.weights_path and not Path(cfg.weights_path).is_file():
        raise RaysegbgError(f"model.weights_path {cfg.weights_path} does not exist: fix the path")


def check_model_builds(cfg: ModelConfig, in_channels: int, classes: int) -> None:
    """Build the model on torch's meta device (no memory, no weights: a few milliseconds), so
    settings smp refuses (an encoder_depth the architecture cannot take, decoder_channels of
    the wrong length) fail before any worker starts, and read `weights_path` once."""
    check_model_config(cfg)
    try:
        with torch.device("meta"):
            _create(cfg, in_channels, classes, weights=None)
    except RuntimeError:  # an encoder that reads tensor values as it is built (mit_b*)
        pass  # cannot be built on meta: the workers build it for real
    if cfg.weights_path:
        _read_weights(Path(cfg.weights_path))


def build_model(cfg: ModelConfig, in_channels: int, classes: int) -> nn.Module:
    """An smp model with `classes` output channels; weights come from a local file only."""
    check_model_config(cfg)
    model = _create(cfg, in_channels, classes, cfg.encoder_weights)
    if cfg.weights_path:
        load_weights(model, Path(cfg.weights_path))
    freeze_unused(model, in_channels)
    return model


def smp_kwargs(cfg: ModelConfig, in_channels: int, classes: int) -> dict:
    """The arguments of `smp.create_model` that build this model (without weights): what an
    exported state dict loads into."""
    kwargs: dict = {"arch": cfg.arch, "encoder_name": cfg.encoder, "encoder_weights": None,
                    "in_channels": in_channels, "classes": classes,
                    "encoder_depth": cfg.encoder_depth}  # fmt: skip
    if cfg.arch.lower() in ("unet", "unetplusplus", "manet"):
        kwargs["decoder_channels"] = list(cfg.decoder_channels)
    return kwargs


def _create(cfg: ModelConfig, in_channels: int, classes: int, weights: str | None) -> nn.Module:
    kwargs = smp_kwargs(cfg, in_channels, classes)
    try:
        return smp.create_model(**{**kwargs, "encoder_weights": weights})
    except (ValueError, KeyError, TypeError, AssertionError) as exc:
        msg = str(exc).splitlines()[0].rstrip(".") if str(exc) else type(exc).__name__
        raise RaysegbgError(
            f"cannot build {cfg.arch}/{cfg.encoder}: {msg}; change model.encoder_depth, "
            "model.decoder_channels (one per decoder stage) or model.arch"
        ) from None


def freeze_unused(model: nn.Module, in_channels: int, size: int = 64) -> list[str]:
    """Stop training parameters the forward pass never reaches (e.g. the deepest encoder
    stage when encoder_depth < 5): DDP would otherwise wait forever for their gradients."""
    was_training = model.training
    model.eval()  # leave BatchNorm running statistics untouched
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():  # also when building a model for inference under no_grad
        model(torch.zeros(1, in_channels, size, size)).float().sum().backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    for name, param in model.named_parameters():
        param.grad = None
        if name in unused:
            param.requires_grad_(False)
    model.train(was_training)
    return unused


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a full-model state dict, or an encoder-only one (keys without 'encoder.')."""
    state = _read_weights(path)
    target = model
    if not any(k.startswith("encoder.") for k in state) and hasattr(model, "encoder"):
        target = model.encoder
    missing, unexpected = target.load_state_dict(state, strict=False)
    if unexpected or len(missing) == len(target.state_dict()):
        raise RaysegbgError(
            f"weights in {path} do not match {type(target).__name__}: "
            f"{len(unexpected)} unexpected keys, {len(missing)} missing"
        )


def _read_weights(path: Path) -> dict:
    """A state dict from a torch file (tensors only: nothing in it can run code)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load fails in many ways (struct.error, RuntimeError, ...)
        raise RaysegbgError(
            f"model.weights_path {path} is not a torch weights file ({type(exc).__name__}): "
            "pass a state dict saved with torch.save(model.state_dict(), path)"
        ) from None
    state = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise RaysegbgError(
            f"model.weights_path {path} holds a {type(state).__name__}, not a state dict: "
            "pass a file saved with torch.save(model.state_dict(), path)"
        )
    return state


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics cover the global batch on every backend.

    torch's SyncBatchNorm runs on GPUs only; this one sums moments with a differentiable
    all-reduce (gloo or NCCL), so W CPU workers normalise exactly like one worker would.
    """

    group = None  # set by convert_global_bn: a process group of its own (see dist)
    local = False  # class-wide switch: per-rank statistics (see local_batch_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.world_size() > 1) or GlobalBatchNorm2d.local:
            return super().forward(x)
        dims = (0, 2, 3)
        count = torch.tensor([x.numel() / x.shape[1]], device=x.device, dtype=x.dtype)
        moments = torch.cat([x.sum(dims), (x * x).sum(dims), count])
        moments = dist.differentiable_sum(moments, self.group)
        c = x.shape[1]
        n = moments[-1]
        mean = moments[:c] / n
        var = (moments[c : 2 * c] / n - mean * mean).clamp_min(0.0)
        self._update_running(mean.detach(), var.detach() * n / (n - 1).clamp_min(1.0))
        y = (x - mean[None, :, None, None]) * torch.rsqrt(var[None, :, None, None] + self.eps)
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        if not self.track_running_stats:
            return
        self.num_batches_tracked += 1
        m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        self.running_mean.mul_(1 - m).add_(mean, alpha=m)
        self.running_var.mul_(1 - m).add_(var, alpha=m)


@contextlib.contextmanager
def local_batch_norm():
    """Per-rank BatchNorm statistics inside the block: for second-order passes (a meta-gradient
    through a virtual step), where the cross-rank all-reduce has no double backward."""
    GlobalBatchNorm2d.local = True
    try:
        yield
    finally:
        GlobalBatchNorm2d.local = False


def convert_global_bn(module: nn.Module, use_gpu: bool) -> nn.Module:
    """Swap BatchNorm layers for cross-rank ones (torch's on GPU, ours on CPU)."""
    if use_gpu:
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    _swap_bn(module, dist.new_group())
    return module


def _swap_bn(module: nn.Module, group) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, GlobalBatchNorm2d):
            new = GlobalBatchNorm2d(
                child.num_features,
                child.eps,
                child.momentum,
                child.affine,
                child.track_running_stats,
            )
            new.load_state_dict(child.state_dict())
            if child.affine:  # keep parameters frozen by freeze_unused frozen
                new.weight.requires_grad_(child.weight.requires_grad)
                new.bias.requires_grad_(child.bias.requires_grad)
            new.group = group
            setattr(module, name, new)
        else:
            _swap_bn(child, group)
