"""Typed, frozen run configuration: one YAML file plus `--set a.b=value` overrides.

Every key is checked against the dataclass fields and their types, so a typo is an error that
lists the valid keys instead of a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raysegbg.errors import RaysegbgError
from raysegbg.registry import check_method_name, params_class, section_name, section_names


def param(default: Any, help: str) -> Any:
    """A config field with its help text (`raysegbg config show` lists them)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class DataConfig:
    """Where the Parquet dataset lives and how training samples are augmented."""

    path: str = param("data/hetero_bg", "dataset folder (`raysegbg data make` or `data import`)")
    crop_size: int = param(
        64, "training crop in pixels (smaller images padded with ignore); 0: full image"
    )
    augment: bool = param(
        True, "random rescaling, flips and the other augmentations below (false: crop only)"
    )
    hflip: bool = param(True, "with augment: random horizontal flips")
    vflip: bool = param(False, "with augment: random vertical flips")
    scale_min: float = param(0.8, "with augment: smallest random rescale factor")
    scale_max: float = param(1.25, "with augment: largest random rescale factor")
    rotate: float = param(0.0, "with augment: random rotation by up to ± this many degrees")
    affine_scale: float = param(
        0.0, "with augment: random zoom by a factor in [1/(1+x), 1+x], size kept (unlike scale_*)"
    )
    shear: float = param(0.0, "with augment: random shear along each axis by up to ± degrees")
    translate: float = param(
        0.0, "with augment: random shift by up to ± this fraction of the width and height"
    )
    elastic: float = param(
        0.0, "with augment: elastic deformation, the largest random displacement in pixels"
    )
    elastic_smoothness: float = param(
        16.0, "with elastic: pixels between the field's random control points (larger: smoother)"
    )
    intensity_scale: float = param(
        0.0, "with augment: multiply intensities (in [0, 1]) by a factor in [1-x, 1+x]"
    )
    intensity_shift: float = param(
        0.0, "with augment: add a random offset in [-x, x] to intensities (in [0, 1])"
    )
    gamma: float = param(
        0.0, "with augment: raise intensities (in [0, 1]) to a power in [1/(1+x), 1+x]"
    )
    brightness: float = param(
        0.0, "with augment, 3-channel images: scale the brightness by a factor in [1-x, 1+x]"
    )
    contrast: float = param(
        0.0, "with augment, 3-channel images: blend with the mean grey by a factor in [1-x, 1+x]"
    )
    saturation: float = param(
        0.0, "with augment, 3-channel images: blend with the grey image by a factor in [1-x, 1+x]"
    )
    val_split: str = param("val", "split validated after every epoch (scores the checkpoints)")
    cache: bool = param(True, "reader memory: keep decoded images in memory after first use")
    reader: str = param(
        "auto",
        "memory: read the split's images into memory once; stream: read Parquet row groups on "
        "demand, memory per worker independent of the dataset's size (order: see "
        "shuffle_window); auto: stream when the split's decoded images would pass 2 GiB",
    )
    shuffle_window: int = param(
        16, "reader stream: row groups shuffled together (groups in random order, rows of "
        "this many groups in random order)"
    )  # fmt: skip
    workers: int = param(
        0, "background processes per training worker that decode and augment batches "
        "(0: in the training step)"
    )  # fmt: skip
    prefetch: int = param(2, "with workers: batches each background process prepares ahead")


@dataclass(frozen=True)
class ModelConfig:
    """A segmentation-models-pytorch model: any architecture and encoder."""

    arch: str = param("Unet", "smp architecture: Unet, FPN, DeepLabV3Plus, Segformer, ...")
    encoder: str = param("resnet18", "smp encoder, or a timm one as tu-<name>")
    encoder_depth: int = param(4, "encoder stages used (smp's encoder_depth)")
    decoder_channels: tuple[int, ...] = param(
        (128, 64, 32, 16), "Unet/UnetPlusPlus/MAnet decoder widths, one per encoder stage"
    )
    encoder_weights: str | None = param(None, "smp weight name (downloaded); null: random init")
    weights_path: str = param("", "local file of encoder (or full model) weights to start from")
    sync_bn: bool = param(True, "batch statistics over the global batch when workers > 1")


@dataclass(frozen=True)
class MethodConfig:
    """Which method trains the model; its settings are `method.<method>.*`.

    Those are typed by the method's own `Params` dataclass (see `raysegbg.registry`). The
    chosen method's section is always there (defaults filled in); another method's section is
    kept, checked, when given (a search over methods sets several)."""

    name: str = param("baseline", "a registered method (see below) or a plug-in: pkg.module:Class")
    sections: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_method_name(self.name)
        section = section_name(self.name)
        if section not in self.sections:
            filled = {**self.sections, section: _method_params(self.name, {}, section)}
            object.__setattr__(self, "sections", filled)

    def __getattr__(self, key: str) -> Any:
        sections = self.__dict__.get("sections", {})
        if key in sections:
            return sections[key]
        raise AttributeError(f"no method section '{key}' in this config (method.{key}.*)")

    @property
    def params(self) -> Any:
        """The chosen method's parameters."""
        return self.sections[section_name(self.name)]


@dataclass(frozen=True)
class OptimConfig:
    """The optimiser and learning-rate schedule of every training stage."""

    name: str = param("adamw", "adamw | adam | sgd")
    lr: float = param(2e-3, "base learning rate (reached after the warm-up)")
    weight_decay: float = param(1e-4, "weight decay (decoupled for adamw)")
    momentum: float = param(0.9, "momentum of sgd (unused by adam and adamw)")
    schedule: str = param("cosine", "cosine | poly | constant: lr decay over a stage's steps")
    warmup_steps: int = param(0, "steps of linear lr warm-up at the start of each stage")
    clip_norm: float = param(0.0, "clip each optimiser's gradient norm to this; 0: no clipping")


@dataclass(frozen=True)
class TrainConfig:
    """How long and in what batches the run trains."""

    epochs: int = param(20, "training epochs (a multi-stage method: of its last stage)")
    batch_size: int = param(16, "global batch, split evenly over workers")
    val_batch_size: int = param(32, "validation (and eval) batch of each worker")
    steps_per_epoch: int = param(0, "optimiser steps per epoch; 0: one pass over the train split")
    seed: int = param(0, "seeds the initial weights, sample order and augmentation")
    amp: bool = param(True, "mixed precision (bf16, else fp16), on GPU only")
    snapshot_every: int = param(50, "steps between async snapshots of shared state to its actor")
    patience: int = param(
        0,
        "stop after this many epochs without a better logging.score; 0: off (a multi-stage "
        "method: counted in its last stage)",
    )
    reuse_stages: bool = param(
        True,
        "reuse a stage result (prn's bases, fbr's CAM stage) that a run or trial with the same "
        "data, settings and seed computed, from <logging.storage_path>/stage_results; false: "
        "always train it",
    )


@dataclass(frozen=True)
class ScalingConfig:
    """How many Ray Train workers, and what each gets."""

    workers: int = param(2, "Ray Train workers (DDP ranks)")
    use_gpu: bool = param(False, "one GPU per worker (DDP over NCCL)")
    cpus_per_worker: int = param(0, "CPUs (and torch threads) per worker; 0: the node's, shared")
    min_workers: int = param(
        0,
        "elastic: after losing nodes, go on (from the last checkpoint) with as few as this many "
        "workers, growing back to `workers` when nodes return; 0: always `workers`",
    )


@dataclass(frozen=True)
class LoggingConfig:
    """Where runs are written, and what is logged and kept."""

    storage_path: str = param("runs", "folder or URI (s3://...) that holds the run folders")
    name: str = param("", "run name; empty: <method>-<time>; an existing run's name resumes it")
    image_every: int = param(5, "epochs between validation image grids in TensorBoard")
    num_images: int = param(4, "validation images in each grid")
    score: str = param("val/miou", "metric that picks the best checkpoint (higher = better)")
    max_failures: int = param(2, "worker-group restarts before the run fails; -1: forever")
    progress_every: float = param(10.0, "seconds between progress lines within an epoch; 0: off")


READERS = ("auto", "memory", "stream")  # how a split's rows are read (data/rows.py)
BLENDS = ("gaussian", "constant")  # how overlapping sliding windows are averaged


@dataclass(frozen=True)
class InferenceConfig:
    """How `eval` and `predict` apply the model to images larger than its training crops."""

    window: int = param(
        0, "sliding-window side in pixels; 0: data.crop_size (no windows when that is 0 too)"
    )
    max_whole: int = param(
        0,
        "images with a side above this many pixels are predicted in sliding windows; "
        "0: twice the window; -1: never",
    )
    overlap: float = param(0.25, "fraction of a window that overlaps the next one, in [0, 1)")
    blend: str = param(
        "gaussian", "gaussian | constant: weights of each window's pixels where windows overlap"
    )


@dataclass(frozen=True)
class Config:
    """A whole run: one section per dataclass above."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting only lossless cases (int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except RaysegbgError:
                continue
        raise _type_error(value, tp, where)
    if origin is tuple:
        if isinstance(value, str) and value.lstrip().startswith("["):
            # a list written as YAML text: a search space's categorical choice ("[8, 16]")
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                pass
        if not isinstance(value, (list, tuple)):
            raise _type_error(value, tp, where)
        (item_tp, _) = typing.get_args(tp)
        return tuple(_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise _type_error(value, tp, where)
        return _method_config(value, where) if tp is MethodConfig else _build(tp, value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" (no dot) as a string
            value = float(value)
        except ValueError:
            raise _type_error(value, tp, where) from None
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        raise RaysegbgError(f"config key '{where}' is {value}: use a finite number")
    if tp is bool and not isinstance(value, bool):
        raise _type_error(value, tp, where)
    if tp in (int, float, str) and (not isinstance(value, tp) or isinstance(value, bool)):
        raise _type_error(value, tp, where)
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _type_error(value: Any, tp: Any, where: str) -> RaysegbgError:
    return RaysegbgError(
        f"config key '{where}' expects {_type_name(tp)}, got {value!r} "
        f"({type(value).__name__}): fix the value in the YAML file or the --set override"
    )


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        where = f"{prefix}.{key}" if prefix else key
        if key not in names:
            valid = ", ".join(f"{prefix}.{n}" if prefix else n for n in names)
            raise RaysegbgError(f"unknown config key '{where}': valid keys are {valid}")
        kwargs[key] = _coerce(value, hints[key], where)
    return cls(**kwargs)


def _method_config(values: dict[str, Any], where: str) -> MethodConfig:
    """`method:` -> MethodConfig: the name, then each section typed by its method's Params."""
    name = values.get("name", MethodConfig.name)
    if not isinstance(name, str):
        raise _type_error(name, str, f"{where}.name")
    check_method_name(name)
    known = {**section_names(), section_name(name): name}
    sections = {}
    for key, section in values.items():
        if key == "name":
            continue
        if key not in known:
            valid = ", ".join(f"{where}.{k}" for k in ["name", *known])
            raise RaysegbgError(f"unknown config key '{where}.{key}': valid keys are {valid}")
        if not isinstance(section, dict):
            raise RaysegbgError(f"config key '{where}.{key}' must be a section of settings")
        sections[key] = _method_params(known[key], section, key)
    return MethodConfig(name, sections)


def _method_params(name: str, values: dict[str, Any], section: str) -> Any:
    params = params_class(name)
    if params is None:
        if values:
            raise RaysegbgError(f"method {name} has no settings: drop method.{section}.*")
        return None
    return _build(params, values, f"method.{section}")


def to_dict(cfg: Any) -> Any:
    """Plain-data view (tuples become lists) for YAML, JSON and Ray."""
    if isinstance(cfg, MethodConfig):
        return {"name": cfg.name, **{k: to_dict(v) for k, v in cfg.sections.items()}}
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, dict):
        return {k: to_dict(x) for k, x in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(x) for x in cfg]
    return cfg


def describe(cls: type) -> list[tuple[str, Any, str]]:
    """(key, default, help) of every field of a config dataclass."""
    return [
        (f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory(),
         f.metadata.get("help", ""))
        for f in dataclasses.fields(cls)
    ]  # fmt: skip


def from_dict(values: dict[str, Any]) -> Config:
    cfg = _build(Config, values or {})
    validate(cfg)
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as YAML so numbers and lists keep their type)."""
    if "=" not in text:
        raise RaysegbgError(f"--set '{text}' is not key=value: write e.g. --set train.epochs=5")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = values
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RaysegbgError(f"--set {text}: '{part}' is a value, not a section")
        node[path[-1]] = value
    return values


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read YAML (optional), apply `--set` overrides, type-check, validate."""
    values: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.exists():
            raise RaysegbgError(f"config file {p} not found: pass an existing YAML, e.g. configs/")
        values = read_yaml(p, "config file") or {}
        if not isinstance(values, dict):
            raise RaysegbgError(
                f"config file {p} must hold a mapping of sections, e.g. 'train: {{epochs: 5}}': "
                "see configs/quickstart.yaml"
            )
    return from_dict(apply_overrides(values, overrides or []))


def read_yaml(path: Path, what: str) -> Any:
    """The data of a YAML file; a file that cannot be read, is not UTF-8 or is not YAML is
    one line naming `what` it is and the fix."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RaysegbgError(
            f"{what} {path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
            f"{exc.start}): save it as UTF-8"
        ) from None
    except OSError as exc:
        raise RaysegbgError(
            f"cannot read {what} {path} ({exc.strerror or exc}): pass a readable YAML file"
        ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: {getattr(exc, 'problem', '')}" if mark else "syntax"
        raise RaysegbgError(
            f"{what} {path} is not valid YAML ({where}): fix the YAML syntax there"
        ) from None


def replace(cfg: Config, **sections: dict[str, Any]) -> Config:
    """A copy of `cfg` with some fields of some sections changed (type-checked)."""
    values = to_dict(cfg)
    for section, changes in sections.items():
        values[section].update(changes)
    return from_dict(values)


# (key, lowest valid value, highest or None, what a value means): numbers outside are refused
# in one line
RANGES: tuple[tuple[str, int | float, int | float | None, str], ...] = (
    ("data.crop_size", 0, None, " (0 keeps the full image)"),
    ("data.shuffle_window", 1, None, ""),
    ("data.workers", 0, None, " (0: in the training step)"),
    ("data.prefetch", 1, None, ""),
    ("model.encoder_depth", 1, None, ""),
    ("optim.weight_decay", 0, None, ""),
    ("optim.warmup_steps", 0, None, ""),
    ("optim.clip_norm", 0, None, " (0: no clipping)"),
    ("train.epochs", 1, None, ""),
    ("train.batch_size", 1, None, ""),
    ("train.val_batch_size", 1, None, ""),
    ("train.steps_per_epoch", 0, None, " (0: one pass over the training split)"),
    ("train.seed", 0, None, ""),
    ("train.snapshot_every", 1, None, ""),
    ("train.patience", 0, None, " (0: off)"),
    ("scaling.workers", 1, None, ""),
    ("scaling.cpus_per_worker", 0, None, " (0: the node's CPUs shared evenly)"),
    ("scaling.min_workers", 0, None, " (0: a fixed number of workers)"),
    ("logging.image_every", 1, None, ""),
    ("logging.num_images", 0, None, ""),
    ("logging.max_failures", -1, None, " (-1: retry forever)"),
    ("logging.progress_every", 0, None, " (0: off)"),
    ("inference.window", 0, None, " (0: data.crop_size)"),
    ("inference.max_whole", -1, None, " (0: twice the window, -1: never use windows)"),
    ("optim.momentum", 0, 1, ""),
    ("data.rotate", 0, 180, " (0: off)"),
    ("data.affine_scale", 0, 1, " (0: off)"),
    ("data.shear", 0, 45, " (0: off)"),
    ("data.translate", 0, 0.5, " (0: off)"),
    ("data.elastic", 0, None, " (0: off)"),
    ("data.elastic_smoothness", 1, None, ""),
    ("data.intensity_scale", 0, 1, " (0: off)"),
    ("data.intensity_shift", 0, 1, " (0: off)"),
    ("data.gamma", 0, 2, " (0: off)"),
    ("data.brightness", 0, 1, " (0: off)"),
    ("data.contrast", 0, 1, " (0: off)"),
    ("data.saturation", 0, 1, " (0: off)"),
)
# what `logging.score` may name: reported every epoch, higher is better
SCORES = ("val/miou", "val/fg_dice", "val/precision", "val/recall", "val/pixel_acc", "epoch")


def validate(cfg: Config) -> None:
    """Ranges and cross-field checks that the types alone cannot express (a method's own
    settings are checked by its Params dataclass)."""
    check_choice("optim.name", cfg.optim.name, ("adamw", "adam", "sgd"))
    check_choice("optim.schedule", cfg.optim.schedule, ("cosine", "poly", "constant"))
    check_choice("inference.blend", cfg.inference.blend, BLENDS)
    check_choice("data.reader", cfg.data.reader, READERS)
    check(
        0 <= cfg.inference.overlap < 1,
        f"inference.overlap={cfg.inference.overlap} is out of range: use a number in [0, 1)",
    )
    for key, low, high, note in RANGES:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        kind = "an integer" if isinstance(value, int) else "a number"
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        ok = value >= low and (high is None or value <= high)
        check(ok, f"{key}={value} is out of range: use {kind} {allowed}{note}")
    checks = [
        (cfg.optim.lr > 0, f"optim.lr must be > 0 (got {cfg.optim.lr}): use e.g. 1e-3"),
        (
            0 < cfg.data.scale_min <= cfg.data.scale_max,
            f"data.scale_min={cfg.data.scale_min}, data.scale_max={cfg.data.scale_max}: "
            "use 0 < scale_min <= scale_max",
        ),
        (
            all(c >= 1 for c in cfg.model.decoder_channels),
            f"model.decoder_channels={list(cfg.model.decoder_channels)}: use integers >= 1",
        ),
        (
            cfg.train.batch_size % cfg.scaling.workers == 0,
            f"train.batch_size ({cfg.train.batch_size}) must be divisible by the number of "
            f"workers ({cfg.scaling.workers}): change one of them",
        ),
        (
            cfg.scaling.min_workers <= cfg.scaling.workers,
            f"scaling.min_workers ({cfg.scaling.min_workers}) is above scaling.workers "
            f"({cfg.scaling.workers}): use at most as many",
        ),
        (
            all(cfg.train.batch_size % n == 0 for n in _elastic_sizes(cfg.scaling)),
            f"train.batch_size ({cfg.train.batch_size}) must be divisible by every number of "
            f"workers an elastic run may use (scaling.min_workers {cfg.scaling.min_workers} to "
            f"scaling.workers {cfg.scaling.workers}): change one of them",
        ),
    ]
    for ok, message in checks:
        check(ok, message)
    check_score(cfg.logging.score)
    if cfg.logging.name:  # empty: a name is made up when the run starts
        check_name("logging.name", cfg.logging.name)


def _elastic_sizes(scaling: ScalingConfig) -> range:
    """The worker counts a run may train with (one, unless `min_workers` makes it elastic)."""
    return range(scaling.min_workers or scaling.workers, scaling.workers + 1)


def check_score(score: str, classes: tuple[str, ...] | None = None) -> None:
    """`logging.score` picks the best checkpoint (the highest value): it must be a metric every
    method reports, and with the dataset's `classes` known, a per-class IoU of one of them."""
    per_class = score.startswith("val/iou/")
    if score in SCORES or (per_class and (classes is None or score[8:] in classes)):
        return
    choices = [*SCORES, *(f"val/iou/{c}" for c in classes or ("<class>",))]
    raise RaysegbgError(
        f"logging.score={score!r} is not a score raysegbg reports (higher = better): use one "
        f"of {', '.join(choices)}"
    )


def check_name(key: str, name: str) -> None:
    """A run or search name becomes one folder directly inside the storage path: anything
    that could point elsewhere (a separator, so also an absolute path; `..`; a leading `.`)
    or that names no folder at all is refused."""
    bad = any(c in name for c in "/\\\0") or ".." in name or name.startswith(".")
    if bad or not name.strip():
        fix = re.sub(r"[/\\\0]+|\.\.+", "-", name).strip(" .-") or "my-run"
        raise RaysegbgError(
            f"{key}={name!r} is not a plain folder name (no '/', '\\', '..', leading '.', "
            f"or empty): use one name inside logging.storage_path, e.g. {fix!r}"
        )


def check(ok: bool, message: str) -> None:
    """For Params.__post_init__: raise the one-line `message` unless `ok`."""
    if not ok:
        raise RaysegbgError(message)


def check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise RaysegbgError(f"{key}={value!r} is not one of: {', '.join(choices)}")


def save_config(cfg: Config, path: Path) -> None:
    """Write the resolved config atomically so the run can be reproduced from it."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(path)
