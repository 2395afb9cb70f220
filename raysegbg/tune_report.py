"""What a `raysegbg tune` search leaves behind when it ends: the reports.

A table of the trials (printed by `tune_commands`), `summary.csv`, `best_config.yaml` (the
base config with the best trial's values), a metric-vs-parameter plot and one TensorBoard
HParams session per trial, in the trial's run (`<trial>/tb`, replacing the one the run wrote)
with the table's columns declared once in `hparams/`. `raysegbg.tune.run_search` writes them
into the search folder. They need no Ray: this module imports neither `tune` nor
`tune_commands`.
"""

from __future__ import annotations

import csv
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raysegbg.config import from_dict, to_dict
from raysegbg.hparams import FINAL_METRICS, final_metrics, hparam_value, metric_tag, run_hparams
from raysegbg.search_space import SearchSpace, apply_params

SUMMARY_CSV = "summary.csv"
BEST_CONFIG = "best_config.yaml"
PLOT = "metric_vs_params.png"
HPARAMS_DIR = "hparams"  # the search's HParams columns (the sessions are in the trials' runs)


@dataclass
class TrialRow:
    """How one trial went: its sampled parameters and its last reported metrics."""

    name: str  # its folder in the search and its run's name (`raysegbg.tune.trial_name`)
    trial_id: str
    params: dict[str, Any]
    metric: float  # the searched metric at its last epoch
    epochs: int
    status: str  # finished | stopped (early, by ASHA) | error | unfinished (interrupted)
    metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""


def best_row(rows: list[TrialRow], mode: str) -> TrialRow | None:
    """The trial with the best searched metric (errors and unscored trials left out)."""
    scored = [r for r in rows if r.status != "error" and math.isfinite(r.metric)]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda r: r.metric)


def write_reports(
    search_dir: Path,
    rows: list[TrialRow],
    space: SearchSpace,
    base: dict[str, Any],
    metric: str,
    mode: str,
) -> TrialRow | None:
    """Write every report of the search; returns the best trial (None if none scored)."""
    best = best_row(rows, mode)
    write_csv(search_dir / SUMMARY_CSV, rows, space.names, metric)
    if best is not None:
        write_best_config(search_dir / BEST_CONFIG, base, best, metric)
    plot_metric(search_dir / PLOT, rows, space, metric)
    write_hparams(search_dir, rows, base, metric)
    return best


def format_table(rows: list[TrialRow], metric: str) -> str:
    """The trials as an aligned text table, in the order they started: status, epochs,
    metric, values."""
    names = _param_names(rows)
    header = ["trial", "status", "epochs", metric, *names]
    lines = [header]
    for r in sorted(rows, key=lambda r: r.name):
        cells = [r.name, r.status, str(r.epochs), _fmt(r.metric)]
        lines.append(cells + [_fmt(r.params[n]) if n in r.params else "-" for n in names])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    padded = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    return "\n".join(line.rstrip() for line in padded)


def write_csv(path: Path, rows: list[TrialRow], names: list[str], metric: str) -> None:
    """`summary.csv`: one line per trial, the final metrics and error after the values."""
    extra = [k for k in FINAL_METRICS if k != metric]
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["trial", "trial_id", "status", "epochs", metric, *names, *extra, "error"])
        for r in sorted(rows, key=lambda r: r.name):
            values = [r.params.get(n, "") for n in names] + [r.metrics.get(k, "") for k in extra]
            out.writerow([r.name, r.trial_id, r.status, r.epochs, r.metric, *values, r.error])


def write_best_config(path: Path, base: dict[str, Any], best: TrialRow, metric: str) -> None:
    """The base config with the best trial's values: `raysegbg train --config` runs it as is
    (a fresh run name, so it never resumes a trial)."""
    values = apply_params(base, {**best.params, "logging.name": ""})
    cfg = from_dict(values)  # the same checks as `raysegbg train`
    header = f"# best trial {best.name} ({best.status}, {best.epochs} epochs): {metric} "
    path.write_text(f"{header}{best.metric:.4f}\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False))


def plot_metric(path: Path, rows: list[TrialRow], space: SearchSpace, metric: str) -> None:
    """One panel per parameter: each trial's metric against its value, by how it ended."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = space.names
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        _plot_param(ax, rows, space.param(name))
        ax.set_ylabel(metric)
    if any(ax.get_legend_handles_labels()[0] for ax in axes[0]):
        axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _plot_param(ax: Any, rows: list[TrialRow], param: Any) -> None:
    """Categorical values evenly spaced in the space's order; numbers over the whole searched
    range, on a log axis (decade labels) for log-scaled parameters."""
    from matplotlib.ticker import LogFormatterSciNotation, NullFormatter

    for status, marker in (("finished", "o"), ("stopped", "x"), ("unfinished", "^")):
        shown = [r for r in rows if r.status == status and param.name in r.params]
        values = [r.params[param.name] for r in shown]
        if param.kind == "categorical":
            values = [param.choices.index(v) for v in values]
        if shown:
            ax.scatter(values, [r.metric for r in shown], marker=marker, label=status)
    if param.kind == "categorical":
        ax.set_xticks(range(len(param.choices)), [str(c) for c in param.choices])
    elif param.kind == "log_float" or param.log:
        ax.set_xscale("log")
        ax.set_xlim(param.low / 1.2, param.high * 1.2)  # the whole searched range
        ax.xaxis.set_major_formatter(LogFormatterSciNotation())
        ax.xaxis.set_minor_formatter(NullFormatter())
    else:
        margin = (param.high - param.low) * 0.05
        ax.set_xlim(param.low - margin, param.high + margin)
    ax.set_xlabel(param.name)


def write_hparams(
    search_dir: Path, rows: list[TrialRow], base: dict[str, Any], metric: str
) -> None:
    """One HParams session per trial in its run's `tb/`, rewritten each time the search ends
    (so a resumed search has exactly one per trial): the trial's compared settings (its
    method's only), searched values and status against its final metrics, the searched one
    first. `hparams/` declares the columns of them all."""
    from raysegbg.tb import clear_sessions, write_experiment, write_session

    sessions: list[dict[str, Any]] = []
    tags: dict[str, None] = {}
    for r in rows:
        hparams, metrics = trial_session(r, base, metric)
        tb = search_dir / r.name / "tb"
        clear_sessions(tb)
        write_session(tb, hparams, metrics, experiment=False)
        sessions.append(hparams)
        tags.update(dict.fromkeys(metrics))
    shutil.rmtree(search_dir / HPARAMS_DIR, ignore_errors=True)
    if sessions:
        write_experiment(search_dir / HPARAMS_DIR, sessions, list(tags))


def trial_session(
    row: TrialRow, base: dict[str, Any], metric: str
) -> tuple[dict[str, Any], dict[str, float]]:
    """A trial's HParams session: (hyperparameters, metrics)."""
    cfg = to_dict(from_dict(apply_params(base, row.params)))
    hparams = run_hparams(cfg)
    hparams.update({k: hparam_value(v) for k, v in row.params.items()})
    hparams["status"] = row.status
    metrics = final_metrics(row.metrics, [metric, cfg["logging"]["score"]])
    metrics[metric_tag("epochs")] = float(row.epochs)
    return hparams, metrics


def _param_names(rows: list[TrialRow]) -> list[str]:
    names: list[str] = []
    for r in rows:
        names += [n for n in r.params if n not in names]
    return names


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else "-"
    return str(value)
