"""Typed, frozen run configuration: one YAML file plus `--set a.b=value` overrides.

Every key is checked against the dataclass fields and their types, so a typo is an error that
lists the valid keys instead of a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raysegbg.errors import RaysegbgError


@dataclass(frozen=True)
class DataConfig:
    """Where the Parquet dataset lives and how training samples are augmented."""

    path: str = "data/hetero_bg"
    crop_size: int = 64  # training crop (pixels); 0 keeps the full image
    augment: bool = True
    hflip: bool = True
    vflip: bool = False
    scale_min: float = 0.8
    scale_max: float = 1.25
    val_split: str = "val"
    cache: bool = True  # keep decoded images in memory after first use


@dataclass(frozen=True)
class ModelConfig:
    """A segmentation-models-pytorch model: any architecture and encoder."""

    arch: str = "Unet"
    encoder: str = "resnet18"
    encoder_depth: int = 4
    decoder_channels: tuple[int, ...] = (128, 64, 32, 16)
    encoder_weights: str | None = None  # smp weight name; never downloaded by default
    weights_path: str = ""  # local file with encoder (or full model) weights
    sync_bn: bool = True  # batch statistics over the global batch when workers > 1


@dataclass(frozen=True)
class BaselineParams:
    """Plain supervised segmentation: cross entropy plus optional soft Dice."""

    ce_weight: float = 1.0
    dice_weight: float = 0.5
    class_weights: tuple[float, ...] = ()


@dataclass(frozen=True)
class McibiParams:
    """Mining Contextual Information Beyond Image: a dataset-level class memory."""

    dims: int = 64  # memory / pixel feature size
    attention_dims: int = 32
    # work at 1/stride of the image (labels are downsampled); 0: the finest power of two that
    # leaves <= 32 x 32 positions on a training crop (the memory read attends over all of them)
    feature_stride: int = 0
    momentum: float = 0.9  # update rate of an entry toward the batch's class mean
    momentum_follows_lr: bool = True  # momentum * lr/lr0, as in the reference
    aggregation: str = "soft"  # soft | hard: how a pixel reads the memory
    update: bool = True  # False = memory frozen at its (random) initial value (ablation)
    stage1_weight: float = 0.4
    stage2_weight: float = 1.0
    consistency_weight: float = 1.0


@dataclass(frozen=True)
class ColabParams:
    """Context Label Learning: background split into K learned context classes."""

    k: int = 3  # context subclasses of the background
    update_interval: int = 4  # steps between meta-updates of the task generator
    generator_encoder: str = "resnet18"
    generator_depth: int = 3
    generator_lr: float = 1e-3
    virtual_lr: float = 0.01  # step size of the virtual SGD step of the segmentation net
    dice_weight: float = 0.5  # soft Dice next to soft cross entropy
    distance_weighting: bool = False  # push far-away background toward context 0
    distance_max: int = 16  # pixels from the foreground at which the push is full
    meta_update: bool = True  # False = a frozen random generator (the control)
    meta_batch: str = "same"  # same | holdout: where the meta (ROI) loss is measured
    meta_holdout: float = 0.2  # with holdout: share of the training split kept for meta batches


@dataclass(frozen=True)
class PrnParams:
    """PatchRefineNet: a refiner trained on optimal patch-wise binarizations of a base model.

    Three stages in one run: the base model (`base_epochs`), pseudo-labels on the held-out
    images, then the refiner for `train.epochs` epochs.
    """

    base_epochs: int = 10
    base_checkpoint: str = ""  # a baseline/prn run or checkpoint folder to use as the base
    holdout: float = 0.5  # share of the training split kept from the base, for the refiner
    # regex whose first group names an image's group: the holdout takes whole groups (e.g.
    # blocks of slices, so the base never trained on a held-out slice's neighbours)
    holdout_group: str = ""
    # label every training image with a base that never saw it: two fold bases (trained on the
    # rest and on the held-out share) label each other's images, the refiner trains on all of
    # them, and the base it refines at inference trains on the whole split
    cross_fit: bool = False
    # refine on augmented crops (data.*: scale, crop, flips), pseudo-labels searched per batch
    refine_augment: bool = False
    # std (logits) of a random offset added to each refiner training image's base logit: one
    # value per largest patch plus one per image, so the refiner learns to undo logits biased by
    # region (the stored labels stay exact targets: a constant shift only moves a patch's
    # optimal threshold). 0: off
    bias_augment: float = 1.0
    patch_sizes: tuple[int, ...] = (8, 16)  # one pseudo-label and local head per size
    thresholds: int = 20  # threshold grid 1/n, 2/n, ..., 1.0
    pseudo_weight: float = 0.7  # loss on the patch pseudo-labels
    gt_weight: float = 0.3  # loss on the ground truth
    dice_weight: float = 0.5  # soft Dice next to cross entropy in both
    use_image: bool = True  # give the refiner the image next to the base probability
    residual: bool = True  # heads correct the base logit (and start as the base), else replace
    threshold_heads: bool = False  # also predict each patch's threshold (head t<p>)
    threshold_weight: float = 1.0  # loss on the threshold heads' expected patch IoU
    inference: str = "mean"  # mean of the heads | best: the head (or mean) best on validation
    refiner_encoder: str = "resnet18"
    refiner_depth: int = 3


@dataclass(frozen=True)
class MethodConfig:
    """Which method trains the model, and each method's own parameters."""

    name: str = "baseline"
    baseline: BaselineParams = field(default_factory=BaselineParams)
    mcibi: McibiParams = field(default_factory=McibiParams)
    colab: ColabParams = field(default_factory=ColabParams)
    prn: PrnParams = field(default_factory=PrnParams)


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"  # adamw | sgd
    lr: float = 2e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    schedule: str = "cosine"  # cosine | poly | constant
    warmup_steps: int = 0


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    batch_size: int = 16  # global batch, split evenly over workers
    val_batch_size: int = 32
    steps_per_epoch: int = 0  # 0 = one pass over the training split
    seed: int = 0
    amp: bool = True  # mixed precision, used on GPU only
    snapshot_every: int = 50  # steps between async snapshots of shared state to its actor


@dataclass(frozen=True)
class ScalingConfig:
    workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: int = 0  # 0 = the node's CPUs shared evenly between workers


@dataclass(frozen=True)
class LoggingConfig:
    storage_path: str = "runs"
    name: str = ""  # run name; empty = <method>-<timestamp>; same name resumes
    image_every: int = 5  # epochs between image grids in TensorBoard
    num_images: int = 4
    score: str = "val/miou"  # metric that picks the best checkpoint
    max_failures: int = 2  # worker-group restarts before the run fails


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


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
        return _build(tp, value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" (no dot) as a string
            return float(value)
        except ValueError:
            raise _type_error(value, tp, where) from None
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


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-data view (tuples become lists) for YAML, JSON and Ray."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


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
        if not p.is_file():
            raise RaysegbgError(f"config file {p} not found: pass an existing YAML, e.g. configs/")
        try:
            values = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            line = getattr(getattr(exc, "problem_mark", None), "line", -1) + 1
            raise RaysegbgError(f"config file {p} is not valid YAML (line {line})") from None
        if not isinstance(values, dict):
            raise RaysegbgError(f"config file {p} must hold a mapping of sections")
    return from_dict(apply_overrides(values, overrides or []))


def replace(cfg: Config, **sections: dict[str, Any]) -> Config:
    """A copy of `cfg` with some fields of some sections changed (type-checked)."""
    values = to_dict(cfg)
    for section, changes in sections.items():
        values[section].update(changes)
    return from_dict(values)


def validate(cfg: Config) -> None:
    """Cross-field checks that the types alone cannot express."""
    from raysegbg.methods import check_method_name

    check_method_name(cfg.method.name)
    _check_choice("optim.name", cfg.optim.name, ("adamw", "sgd"))
    _check_choice("optim.schedule", cfg.optim.schedule, ("cosine", "poly", "constant"))
    _check_choice("method.mcibi.aggregation", cfg.method.mcibi.aggregation, ("soft", "hard"))
    _check_choice("method.colab.meta_batch", cfg.method.colab.meta_batch, ("same", "holdout"))
    _check_choice("method.prn.inference", cfg.method.prn.inference, ("best", "mean"))
    prn = cfg.method.prn
    checks = [
        (cfg.train.epochs >= 1, "train.epochs must be >= 1"),
        (bool(prn.patch_sizes), "method.prn.patch_sizes needs at least one size, e.g. [8,16]"),
        (all(p >= 2 for p in prn.patch_sizes), "method.prn.patch_sizes must all be >= 2"),
        (0 <= prn.holdout < 1, "method.prn.holdout must be in [0, 1), e.g. 0.5"),
        (prn.threshold_weight >= 0, "method.prn.threshold_weight must be >= 0"),
        (prn.bias_augment >= 0, "method.prn.bias_augment must be >= 0 (a std in logits, e.g. 1)"),
        (
            not (prn.cross_fit and prn.base_checkpoint),
            "method.prn.cross_fit trains its own bases: drop method.prn.base_checkpoint or set "
            "method.prn.cross_fit=false",
        ),
        (
            not prn.cross_fit or prn.holdout > 0,
            "method.prn.cross_fit needs method.prn.holdout > 0 (e.g. 0.5): its two folds are the "
            "held-out share and the rest",
        ),
        (
            _regex_with_group(prn.holdout_group),
            f"method.prn.holdout_group {prn.holdout_group!r} is not a regular expression with a "
            "group: write one like '(.*_z\\d\\d)\\d$' (the group names the image's group)",
        ),
        (
            cfg.method.mcibi.feature_stride >= 0,
            "method.mcibi.feature_stride must be >= 0 (0 picks one from data.crop_size)",
        ),
        (prn.thresholds >= 2, "method.prn.thresholds must be >= 2 (20 gives 0.05 ... 1.0)"),
        (prn.base_epochs >= 1, "method.prn.base_epochs must be >= 1"),
        (
            prn.pseudo_weight >= 0 and prn.gt_weight >= 0 and prn.pseudo_weight + prn.gt_weight > 0,
            "method.prn.pseudo_weight and gt_weight must be >= 0 and not both 0",
        ),
        (
            0 < cfg.method.colab.meta_holdout < 1,
            "method.colab.meta_holdout must be in (0, 1), e.g. 0.2",
        ),
        (cfg.train.batch_size >= 1, "train.batch_size must be >= 1"),
        (cfg.scaling.workers >= 1, "scaling.workers must be >= 1"),
        (cfg.optim.lr > 0, "optim.lr must be > 0"),
        (0 < cfg.data.scale_min <= cfg.data.scale_max, "need 0 < data.scale_min <= scale_max"),
        (
            cfg.train.batch_size % cfg.scaling.workers == 0,
            f"train.batch_size ({cfg.train.batch_size}) must be divisible by the number of "
            f"workers ({cfg.scaling.workers}): change one of them",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise RaysegbgError(message)


def _regex_with_group(text: str) -> bool:
    """Empty, or a regular expression with at least one group."""
    try:
        return not text or re.compile(text).groups >= 1
    except re.error:
        return False


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise RaysegbgError(f"{key}={value!r} is not one of: {', '.join(choices)}")


def save_config(cfg: Config, path: Path) -> None:
    """Write the resolved config atomically so the run can be reproduced from it."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(path)
