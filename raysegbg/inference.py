"""`eval` and `predict`: load a run's best checkpoint in-process and apply it."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from raysegbg import storage
from raysegbg.checkpoint import load_checkpoint, run_config
from raysegbg.config import Config
from raysegbg.data.format import DatasetMeta, read_meta
from raysegbg.data.loader import PAD_MULTIPLE, SegDataset, eval_batches
from raysegbg.errors import RaysegbgError
from raysegbg.methods.base import Method
from raysegbg.metrics import confusion, summarize
from raysegbg.storage import Location
from raysegbg.train import build_method

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def load_run(
    run_dir: Location, which: str = "best"
) -> tuple[Config, DatasetMeta, Method, Location]:
    """A run's config, dataset meta, method (weights of the `which` checkpoint) and that
    checkpoint's folder. `run_dir` may be a URI (object store): its config.yaml and the one
    checkpoint are downloaded."""
    run_dir = storage.location(run_dir)
    if not storage.is_file(storage.join(run_dir, "config.yaml")):
        raise RaysegbgError(
            f"{run_dir} is not a raysegbg run folder (no config.yaml): pass the folder printed "
            "by `raysegbg train`"
        )
    cfg = run_config(run_dir)
    ckpt, state = load_checkpoint(run_dir, which, cfg.logging.score)
    meta = read_meta(cfg.data.path)
    method = build_method(cfg, meta.num_classes, meta.channels, meta.ignore_index)
    try:
        method.load_state_dict(state["method"])
    except RuntimeError as exc:  # e.g. the dataset at data.path was re-made with other classes
        detail = str(exc).splitlines()[-1].strip().rstrip(".")
        raise RaysegbgError(
            f"checkpoint {ckpt} does not fit the model its run config builds "
            f"({detail[:160]}): restore the run's dataset at {cfg.data.path}, or train the "
            "run again"
        ) from None
    return cfg, meta, method.eval(), ckpt


@torch.no_grad()
def evaluate_run(run_dir: Location, split: str = "test", which: str = "best") -> dict[str, float]:
    cfg, meta, method, ckpt = load_run(run_dir, which)
    dataset = SegDataset(cfg.data.path, split)
    cm = torch.zeros(meta.num_classes, meta.num_classes, dtype=torch.long)
    for batch in eval_batches(dataset, cfg.train.val_batch_size):
        pred = method.predict(batch.images).argmax(1)
        cm += confusion(pred, batch.masks, meta.num_classes, meta.ignore_index)
    out = summarize(cm.numpy(), meta.classes)
    out["samples"] = float(len(dataset))
    return out


COLOUR_MODES = {"RGB", "RGBA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"}


def _load_image(path: Path, channels: int) -> np.ndarray:
    """The image as the run's model reads it: a grayscale image for a colour run is repeated
    over the channels (as `data import` does), an alpha channel is dropped, but a colour image
    for a grayscale run is refused, since dropping its colour quietly would segment images
    unlike the ones the run was trained on."""
    try:
        with Image.open(path) as im:
            if channels == 1 and im.mode in COLOUR_MODES:
                raise RaysegbgError(
                    f"image {path} is colour ({im.mode}) but the run was trained on grayscale "
                    "(1-channel) images: convert it to grayscale first, or use a run trained "
                    "on colour images"
                )
            return np.asarray(im.convert("L" if channels == 1 else "RGB"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise RaysegbgError(f"cannot read image {path}: {exc}; remove or replace it") from None


@torch.no_grad()
def predict_folder(
    run_dir: Location, input_dir: Path, output_dir: Path, overwrite: bool = False
) -> int:
    """Write one PNG class-id mask per input image. The masks are written to a temporary
    folder beside `output_dir` and moved in only when all are done, so a failure leaves no
    half-written mask; an existing mask is replaced only with `overwrite`."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    files = _input_images(input_dir, output_dir)
    _check_outputs(files, output_dir, overwrite)
    _, meta, method, _ = load_run(run_dir)
    images = [_load_image(p, meta.channels) for p in files]  # all readable before any write
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}-", dir=output_dir.parent))
    try:
        for path, arr in zip(files, images, strict=True):
            Image.fromarray(_predict_one(method, arr)).save(tmp / f"{path.stem}.png")
        _move_into(tmp, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return len(files)


def _move_into(tmp: Path, output_dir: Path) -> None:
    """Rename the finished masks into place (one rename each, or of the whole folder)."""
    if not output_dir.exists():
        os.replace(tmp, output_dir)
        return
    for p in tmp.iterdir():
        os.replace(p, output_dir / p.name)


def _input_images(input_dir: Path, output_dir: Path) -> list[Path]:
    """The images to segment, after making sure no mask can land on top of one."""
    files = (
        sorted(p for p in input_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if input_dir.is_dir()
        else []
    )
    if not files:
        raise RaysegbgError(f"no images (.png/.jpg/...) in {input_dir}: pass a folder of images")
    if output_dir.resolve().is_relative_to(input_dir.resolve()):
        raise RaysegbgError(
            f"--output {output_dir} is --input {input_dir} or inside it, so masks could "
            "overwrite the images: pass an output folder outside the input folder"
        )
    return files


def _check_outputs(files: list[Path], output_dir: Path, overwrite: bool) -> None:
    """Refuse two images with one mask name, and existing masks unless `overwrite`."""
    if output_dir.exists() and not output_dir.is_dir():
        raise RaysegbgError(f"--output {output_dir} is a file: pass a folder")
    seen: dict[str, Path] = {}
    for path in files:
        if path.stem in seen:
            raise RaysegbgError(
                f"{seen[path.stem].name} and {path.name} would both be written to "
                f"{path.stem}.png: rename one of them"
            )
        seen[path.stem] = path
    existing = [s for s in seen if (output_dir / f"{s}.png").exists()]
    if existing and not overwrite:
        raise RaysegbgError(
            f"{len(existing)} mask(s) already in {output_dir} (e.g. {existing[0]}.png): pass "
            "--overwrite to replace them, or choose another --output"
        )


def _predict_one(method: Method, arr: np.ndarray) -> np.ndarray:
    img = arr[:, :, None] if arr.ndim == 2 else arr
    x = torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).float()[None] / 127.5 - 1
    h, w = x.shape[2:]
    ph, pw = -h % PAD_MULTIPLE, -w % PAD_MULTIPLE
    x = torch.nn.functional.pad(x, (0, pw, 0, ph))
    pred = method.predict(x).argmax(1)[0, :h, :w]
    return pred.to(torch.uint8).numpy()
