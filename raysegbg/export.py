"""`export`: a run's checkpoint as a file other tools load, plus a JSON sidecar `<out>.json`
that says how to feed it (classes, channels, normalisation, the model config).

What is exported is the method's whole inference, `Method.predict`:

- where that is one smp model's forward pass (baseline; fbr after its `segment` stage; rrn with
  `inference=net1|net2`; prn before its refine stage), that smp model. Found by comparing its
  logits with the method's on a sample, so no method has to declare it.
- otherwise (colab's context channels, mcibi's memory read, prn's refiner over the base,
  rrn's average of two networks, fbr's CAMs before `segment`) the method's `predict` traced as
  one module: every one of them is plain tensor code. `state_dict` is refused for them, since
  no single smp model holds their inference.

Tracing fixes the decisions Python takes on the input size at the traced size, so the traced
module is compared with the method at a second size and refused where they differ (mcibi
without `data.crop_size` or `feature_stride`, whose stride follows the image size; fbr's CAMs
with `pool_top` < 1). The model takes float32 (B, C, H, W), pixels (value - mean) / std, H and
W multiples of `pad_multiple`; it returns (B, classes, H, W) logits.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import torch
from segmentation_models_pytorch.base import SegmentationModel
from torch import nn

from raysegbg.checkpoint import inference_record
from raysegbg.errors import RaysegbgError
from raysegbg.inference import load_run
from raysegbg.methods.base import Method
from raysegbg.models import smp_kwargs
from raysegbg.storage import Location

FORMATS = ("onnx", "torchscript", "state_dict")
TRACE_SIZE, CHECK_SIZE = (64, 64), (96, 128)  # traced at one size, checked at another
TOLERANCE = 1e-4  # traced or ONNX logits vs the method's (float reordering only)


def sidecar_path(out: Path) -> Path:
    return out.with_name(f"{out.name}.json")


def export_run(run_dir: Location, fmt: str, out: Path, which: str = "best",
               overwrite: bool = False) -> Path:  # fmt: skip
    """Write the `which` checkpoint of a run to `out` as `fmt`, and its sidecar; both go to
    temporary files renamed into place. Returns the sidecar's path."""
    out = Path(out)
    _check_target(fmt, out, overwrite)
    cfg, meta, method, ckpt = load_run(run_dir, which)
    name = cfg.method.name
    sample, check = (_sample(meta.channels, size) for size in (TRACE_SIZE, CHECK_SIZE))
    model = plain_model(method, sample)
    info = {**inference_record(cfg, meta), "format": fmt, "checkpoint": str(ckpt),
            "exported": "smp model" if model is not None else "method inference"}  # fmt: skip
    if fmt == "state_dict":
        if model is None:
            raise RaysegbgError(
                f"method '{name}' predicts with more than a plain smp model (this checkpoint's "
                "inference adds to it), so no smp state dict holds it: export it with "
                "--format torchscript or onnx"
            )
        info["smp"] = _rebuildable(model, smp_kwargs(cfg.model, meta.channels, meta.num_classes))
    module = model if model is not None else MethodInference(method)
    with _staged(out, sidecar_path(out)) as (tmp, tmp_sidecar):
        _write(fmt, module, name, sample, check, tmp)
        tmp_sidecar.write_text(json.dumps(_describe(info), indent=1) + "\n")
    return sidecar_path(out)


def _rebuildable(model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs`, after checking that `smp.create_model(**kwargs)` has the model's weights
    (names and shapes; built on the meta device: no memory, no time)."""
    with torch.device("meta"):
        fresh = smp.create_model(**kwargs)
    shapes = {k: v.shape for k, v in fresh.state_dict().items()}
    if shapes != {k: v.shape for k, v in model.state_dict().items()}:
        raise RaysegbgError(
            f"the exported model is not the smp model its run config describes ({kwargs}): "
            "export it with --format torchscript or onnx"
        )
    return kwargs


def _describe(info: dict[str, Any]) -> dict[str, Any]:
    """The sidecar: the inference record, and how to feed and read the model, in words."""
    return {
        **info,
        "input": "float32 (B, channels, H, W): pixel values 0..255 as (value - mean) / std per "
        "channel, then padded with 0 right and below to H and W multiples of pad_multiple",
        "output": "float32 (B, len(classes), H, W) logits: softmax for probabilities, argmax "
        "for the class-id mask (crop the padding off)",
    }


def _check_target(fmt: str, out: Path, overwrite: bool) -> None:
    """Refuse what would fail or destroy something, before the checkpoint is read."""
    if fmt == "onnx" and importlib.util.find_spec("onnx") is None:
        raise RaysegbgError("--format onnx needs the onnx package: pip install onnx onnxruntime")
    if not out.parent.is_dir():
        raise RaysegbgError(
            f"--out {out}: folder {out.parent} does not exist: create it or write elsewhere"
        )
    for path in (out, sidecar_path(out)):
        if path.is_dir():
            raise RaysegbgError(f"--out {out}: {path} is a folder: pass a file name")
        if path.exists() and not overwrite:
            raise RaysegbgError(
                f"{path} already exists: pass --overwrite to replace it, or choose another --out"
            )


@contextlib.contextmanager
def _staged(*paths: Path) -> Iterator[list[Path]]:
    """Temporary files beside `paths`, renamed onto them if the block succeeds; removed
    either way, so a failure leaves nothing behind."""
    tmps = [path.with_name(f".{path.name}.{os.getpid()}.tmp") for path in paths]
    try:
        yield tmps
        for tmp, path in zip(tmps, paths, strict=True):
            os.replace(tmp, path)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)


def _sample(channels: int, size: tuple[int, int]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(1, channels, *size, generator=gen)


class MethodInference(nn.Module):
    """A method's whole inference (`Method.predict`) as a module's forward pass. The method's
    networks are its submodules (so tracing records their weights as parameters), the method
    itself is not: tracing would read every attribute of it, including ones that read the
    dataset (rrn's `unlabeled_rows`)."""

    def __init__(self, method: Method):
        super().__init__()
        self.parts = nn.ModuleDict(dict(method.named_children()))
        for name, tensor in method.named_buffers(recurse=False):
            self.register_buffer(name, tensor)
        for name, param in method.named_parameters(recurse=False):
            self.register_parameter(name, param)
        object.__setattr__(self, "predict", method.predict)  # not a submodule

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.predict(images)


@torch.no_grad()
def plain_model(method: Method, sample: torch.Tensor) -> nn.Module | None:
    """The smp model inside `method` whose logits are the method's own, or None."""
    want = method.predict(sample)
    for module in method.modules():
        if not isinstance(module, SegmentationModel):
            continue
        try:
            got = module(sample)
        except (AttributeError, RuntimeError, TypeError):  # e.g. fbr's CAM net, headless
            continue
        if got.shape == want.shape and torch.allclose(got, want, rtol=0, atol=1e-6):
            return module
    return None


@torch.no_grad()
def _write(fmt: str, module: nn.Module, name: str, sample: torch.Tensor, check: torch.Tensor,
           path: Path) -> None:  # fmt: skip
    if fmt == "state_dict":
        torch.save(module.state_dict(), path)
        return
    traced = _trace(module, name, sample, check)
    if fmt == "torchscript":
        torch.jit.save(traced, str(path))
    else:
        _write_onnx(traced, module, name, check, path)


def _trace(module: nn.Module, name: str, sample: torch.Tensor, check: torch.Tensor):
    """torch.jit.trace, refused where the traced graph differs from eager at another size."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings: the comparison below decides
        try:
            traced = torch.jit.trace(module, sample, check_trace=False)
            same = _close(traced(check), module(check))
        except RaysegbgError:
            raise
        except Exception as exc:  # tracing fails in many ways (RuntimeError, TypeError, ...)
            reason = f"tracing failed ({type(exc).__name__}: {str(exc).splitlines()[0]})"
            raise _untraceable(name, reason) from None
    if not same:
        raise _untraceable(name, _size_reason())
    return traced


def _write_onnx(traced, module: nn.Module, name: str, check: torch.Tensor, path: Path) -> None:
    """The checked traced graph through torch.onnx.export (its TorchScript-based exporter: no
    packages beyond onnx), with free batch, height and width; compared with the method at a
    second size by onnxruntime where that is installed."""
    axes = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notice
        torch.onnx.export(
            traced,
            (check,),
            str(path),
            dynamo=False,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": axes, "logits": axes},
        )
    if importlib.util.find_spec("onnxruntime") is None:
        return
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"image": check.numpy()})[0])
    if not _close(got, module(check)):
        raise _untraceable(name, _size_reason())


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), TOLERANCE, TOLERANCE)


def _size_reason() -> str:
    (h, w), (h2, w2) = TRACE_SIZE, CHECK_SIZE
    return (
        f"its inference takes decisions on the input size in Python, which the exported graph "
        f"fixes at {h}x{w} (it gives other logits at {h2}x{w2})"
    )


def _untraceable(name: str, reason: str) -> RaysegbgError:
    return RaysegbgError(
        f"method '{name}' cannot be exported as a traced graph: {reason}; segment with "
        "`raysegbg predict` instead"
    )
