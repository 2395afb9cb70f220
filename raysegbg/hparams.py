"""What one TensorBoard HParams session holds: the settings runs are compared by, and the
final metrics.

A run writes one session when it ends (`tb.RunWriter.hparams`); a search replaces each
trial's with one that also knows how the trial ended (`tune_report`). Both hold the common
settings a user compares runs by (not paths, names or logging knobs), the chosen method's own
settings only (`method.name`, `method.<its section>.*`: a config may carry other methods'
sections too) and the final validation metrics with the run's score. Plain data, no torch: the
command line imports it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from raysegbg.registry import section_name

# Settings that change nothing a user compares runs by: where the data and runs are, memory
# and speed knobs. Every other key of data, model, optim, train and scaling is compared.
NOT_COMPARED = frozenset({
    "data.path", "data.cache", "data.workers", "data.prefetch", "model.weights_path",
    "train.val_batch_size",
    "train.snapshot_every", "scaling.cpus_per_worker", "scaling.min_workers",
})  # fmt: skip
LOGGING_COMPARED = frozenset({"logging.score"})  # the rest of `logging` is where and how often
FINAL_METRICS = ("val/miou", "val/fg_dice", "val/fpr", "val/precision", "val/recall", "best_score")
METRIC_PREFIX = "hparams/"  # session metrics are scalars of their own: hparams/val/miou, ...


def flat(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {'optim.lr': 0.002, ...}."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat(value, f"{name}."))
        else:
            out[name] = value
    return out


def run_hparams(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The compared settings of a config (`config.to_dict` form), as HParams values."""
    section = f"method.{section_name(cfg['method']['name'])}."
    return {key: hparam_value(v) for key, v in flat(cfg).items() if _compared(key, section)}


def _compared(key: str, method_section: str) -> bool:
    top = key.split(".", 1)[0]
    if top == "method":
        return key == "method.name" or key.startswith(method_section)
    if top == "logging":
        return key in LOGGING_COMPARED
    if top == "inference":  # how `eval`/`predict` apply a model, not how it was trained
        return False
    return key not in NOT_COMPARED


def hparam_value(value: Any) -> int | float | str:
    """What the HParams table can show: numbers and strings (a bool as true/false, a list or
    None as its text), so no column is dropped or shown as 0/1."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float, str)):
        return value
    return "null" if value is None else str(value)


def metric_tag(key: str) -> str:
    """The session metric of a reported metric, `val/miou` -> `hparams/val/miou` (not the
    curve's own tag: its final value is one more point, at step 0)."""
    return METRIC_PREFIX + key


def final_metrics(metrics: Mapping[str, Any], first: Iterable[str] = ()) -> dict[str, float]:
    """The session metrics: `first` (the searched metric, the score), then `FINAL_METRICS`,
    each that is a finite number in `metrics`."""
    keys = dict.fromkeys([*first, *FINAL_METRICS])
    return {metric_tag(k): float(metrics[k]) for k in keys if _finite(metrics.get(k))}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
