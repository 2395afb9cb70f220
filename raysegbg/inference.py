"""`eval` and `predict`: load a run's best checkpoint in-process and apply it.

The checkpoint records what applying it needs besides the run's config (class names,
channels, normalisation: `checkpoint.inference_record`), so `predict` works after the
run's dataset is gone; for checkpoints written before that, the dataset's meta stands in.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from raysegbg import storage
from raysegbg.checkpoint import (
    INFERENCE_KEY,
    inference_record,
    load_checkpoint,
    recorded_meta,
    run_config,
)
from raysegbg.config import Config, apply_overrides, from_dict, parse_override, replace, to_dict
from raysegbg.data.format import DatasetMeta, read_meta
from raysegbg.data.loader import SegDataset, eval_batches
from raysegbg.errors import RaysegbgError
from raysegbg.methods.base import Method
from raysegbg.metrics import Evaluation, confusion
from raysegbg.predictor import MASKS, Predictor, output_kinds, output_path, write_outputs
from raysegbg.sliding import Windows
from raysegbg.storage import Location
from raysegbg.train import build_method

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def load_run(
    run_dir: Location, which: str = "best"
) -> tuple[Config, DatasetMeta, Method, Location]:
    """A run's config, dataset meta, method (weights of the `which` checkpoint) and that
    checkpoint's folder. `run_dir` may be a URI (object store): its config.yaml and the one
    checkpoint are downloaded."""
    cfg, meta, state, ckpt = read_run(run_dir, which)
    return cfg, meta, build_loaded(cfg, meta, state, ckpt), ckpt


def read_run(
    run_dir: Location, which: str = "best", overrides: list[str] | None = None
) -> tuple[Config, DatasetMeta, dict[str, Any], Location]:
    """A run's config (with `overrides` of its `inference.*` keys), the dataset meta its
    `which` checkpoint records (or, for an older checkpoint, the dataset's), that
    checkpoint's state and folder."""
    run_dir = storage.location(run_dir)
    if not storage.is_file(storage.join(run_dir, "config.yaml")):
        raise RaysegbgError(
            f"{run_dir} is not a raysegbg run folder (no config.yaml): pass the folder printed "
            "by `raysegbg train`"
        )
    cfg = with_inference(run_config(run_dir), overrides or [])
    ckpt, state = load_checkpoint(run_dir, which, cfg.logging.score)
    return cfg, recorded_meta(state) or _dataset_meta(cfg, ckpt), state, ckpt


def with_inference(cfg: Config, overrides: list[str]) -> Config:
    """The run's config with the `--set` overrides of `eval` / `predict`: only `inference.*`
    keys, since the rest describes how the checkpoint's weights were trained."""
    for text in overrides:
        path, _ = parse_override(text)
        if path[0] != "inference" or len(path) != 2:
            raise RaysegbgError(
                f"--set {text}: eval and predict change only inference.* keys (e.g. "
                "inference.overlap=0.5); the others are the run's, fixed by its training"
            )
    return from_dict(apply_overrides(to_dict(cfg), overrides)) if overrides else cfg


def windows_of(cfg: Config) -> Windows | None:
    """The sliding windows `cfg.inference` asks for, sized from the training crop unless set;
    None when images are always predicted whole."""
    inf = cfg.inference
    size = inf.window or cfg.data.crop_size
    if size == 0 or inf.max_whole == -1:
        return None
    max_whole = inf.max_whole or 2 * size
    return Windows(size, max_whole, inf.overlap, inf.blend, cfg.train.val_batch_size)


def make_predictor(
    cfg: Config, meta: DatasetMeta, state: dict[str, Any], ckpt: Location, tta: bool = False
) -> Predictor:
    """The one way `eval` and `predict` apply a checkpoint (see `Predictor`)."""
    record = state.get(INFERENCE_KEY) or inference_record(cfg, meta)
    return Predictor(build_loaded(cfg, meta, state, ckpt), record, tta, windows_of(cfg))


def _dataset_meta(cfg: Config, ckpt: Location) -> DatasetMeta:
    try:
        return read_meta(cfg.data.path)
    except RaysegbgError:
        raise RaysegbgError(
            f"checkpoint {ckpt} predates checkpoints that record class names and channels, "
            f"and the run's dataset at {cfg.data.path} is missing or unreadable: restore it "
            "there (its dataset.json is enough), or train the run again"
        ) from None


def build_loaded(cfg: Config, meta: DatasetMeta, state: dict[str, Any], ckpt: Location) -> Method:
    """The method with the checkpoint's weights, in eval mode. Built without pretrained
    weights (the checkpoint holds all of them), so neither a download nor the run's
    `model.weights_path` file is needed."""
    cfg = replace(cfg, model={"encoder_weights": None, "weights_path": ""})
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
    return method.eval()


def evaluate_run(
    run_dir: Location, split: str = "test", which: str = "best", overrides: list[str] | None = None
) -> dict[str, float]:
    return evaluate(run_dir, split, which, overrides).metrics


@torch.no_grad()
def evaluate(
    run_dir: Location, split: str = "test", which: str = "best", overrides: list[str] | None = None
) -> Evaluation:
    """The confusion matrix of the `which` checkpoint on a split, and what it gives;
    `overrides`: `inference.*=value` settings of this evaluation."""
    cfg, meta, state, ckpt = read_run(run_dir, which, overrides)
    predictor = make_predictor(cfg, meta, state, ckpt)
    dataset = SegDataset(cfg.data.path, split, cache=False, reader=cfg.data.reader)
    cm = torch.zeros(meta.num_classes, meta.num_classes, dtype=torch.long)
    for batch in eval_batches(dataset, cfg.train.val_batch_size):
        pred = predictor.batch(batch.images).argmax(1)
        cm += confusion(pred, batch.masks, meta.num_classes, meta.ignore_index)
    return Evaluation(cm.numpy(), list(meta.classes), len(dataset))


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
    run_dir: Location,
    input_dir: Path,
    output_dir: Path,
    overwrite: bool = False,
    *,
    probs: bool = False,
    overlay: bool = False,
    tta: bool = False,
    overrides: list[str] | None = None,
) -> int:
    """Write one PNG class-id mask per input image, and with `probs` / `overlay` its class
    probabilities / a colour overlay (files: `raysegbg.predictor`); `tta` averages the
    softmax of the image and of its mirror image; `overrides`: `inference.*=value`
    settings (sliding windows) of this prediction. Everything is written to a temporary
    folder beside `output_dir` and moved in only when all is done, so a failure leaves no
    half-written file; an existing one is replaced only with `overwrite`."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    kinds = output_kinds(probs, overlay)
    files = _input_images(input_dir, output_dir)
    _check_outputs(files, output_dir, overwrite, kinds)
    cfg, meta, state, ckpt = read_run(run_dir, overrides=overrides)
    images = [_load_image(p, meta.channels) for p in files]  # all readable before the build
    predictor = make_predictor(cfg, meta, state, ckpt, tta)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}-", dir=output_dir.parent))
    try:
        for path, arr in zip(files, images, strict=True):
            write_outputs(tmp, path.stem, arr, _predict_one(predictor, arr), kinds)
        _move_into(tmp, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return len(files)


def _move_into(tmp: Path, output_dir: Path) -> None:
    """Rename the finished files into place (one rename each, or of the whole folder)."""
    if not output_dir.exists():
        os.replace(tmp, output_dir)
        return
    for p in sorted(tmp.rglob("*")):
        if p.is_file():
            target = output_dir / p.relative_to(tmp)
            target.parent.mkdir(exist_ok=True)
            os.replace(p, target)


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


def _check_outputs(files: list[Path], output_dir: Path, overwrite: bool, kinds: list[str]) -> None:
    """Refuse two images with one mask name, and existing outputs unless `overwrite`."""
    if output_dir.exists() and not output_dir.is_dir():
        raise RaysegbgError(f"--output {output_dir} is a file: pass a folder")
    for kind in [k for k in kinds if k != MASKS]:  # the subfolders of --probs, --overlay
        if (output_dir / kind).exists() and not (output_dir / kind).is_dir():
            raise RaysegbgError(f"{output_dir / kind} is a file, where predict writes a folder")
    seen: dict[str, Path] = {}
    for path in files:
        if path.stem in seen:
            raise RaysegbgError(
                f"{seen[path.stem].name} and {path.name} would both be written to "
                f"{path.stem}.png: rename one of them"
            )
        seen[path.stem] = path
    existing = [output_path(output_dir, k, s) for s in seen for k in kinds]
    existing = [p for p in existing if p.exists()]
    if existing and not overwrite:
        raise RaysegbgError(
            f"{len(existing)} output(s) already in {output_dir} (e.g. "
            f"{existing[0].relative_to(output_dir)}): pass --overwrite to replace them, or "
            "choose another --output"
        )


def _predict_one(predictor: Predictor, arr: np.ndarray) -> np.ndarray:
    """(C, H, W) class probabilities of one image."""
    return predictor.probabilities(arr)
