"""`raysegbg tune`: the command, and what a search leaves behind when it ends.

The reports (table, `summary.csv`, `best_config.yaml`, metric-vs-parameter plot, one HParams
session per trial) need no Ray, so they live here, next to the command that prints them;
`raysegbg.tune.run_search` writes them. The handler returns an exit code and lets
`RaysegbgError` propagate: the main CLI prints it as one line.
"""

from __future__ import annotations

import argparse
import csv
import math
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raysegbg.config import from_dict, to_dict
from raysegbg.search_space import SearchSpace, apply_params

FINAL_KEYS = ("val/miou", "val/fg_dice", "val/fpr", "val/precision", "val/recall", "best_score")


def add_tune_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `tune`."""
    p = subparsers.add_parser(
        "tune",
        help="search hyperparameters with Ray Tune (Optuna + ASHA early stopping)",
        description="Samples a search space (YAML, see search_spaces/) with Optuna, trains each "
        "trial as a Ray Train run, stops poor trials early (ASHA on epochs), and writes one "
        "TensorBoard folder, summary.csv and best_config.yaml under <storage>/<name>/.",
    )
    p.add_argument("--space", help="search-space YAML, e.g. search_spaces/baseline.yaml")
    p.add_argument("--config", help="base run config YAML (see configs/)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a base config key, e.g. --set train.epochs=9 (repeatable)",
    )
    p.add_argument("--samples", type=int, default=20, help="number of trials (default 20)")
    p.add_argument(
        "--max-concurrent",
        type=int,
        default=0,
        help="trials at once (default: as many as the cluster's CPUs/GPUs hold)",
    )
    p.add_argument("--scheduler", choices=("asha", "none"), default="asha")
    p.add_argument(
        "--grace",
        type=int,
        default=0,
        metavar="EPOCHS",
        help="epochs every trial gets before ASHA may stop it (default: a quarter of "
        "train.epochs); rungs at grace x 3^k",
    )
    p.add_argument("--name", help="search name (default: tune-<space>-<time>)")
    p.add_argument(
        "--resume",
        metavar="NAME",
        help="continue an interrupted search (its stored space and options; pass the same "
        "--config/--set so its storage path is found)",
    )
    p.add_argument("--address", help="Ray cluster to join (default: start a local Ray)")
    p.add_argument("--metric", default="val/miou", help="metric to optimise (default val/miou)")
    p.add_argument("--mode", choices=("max", "min"), default="max")
    p.add_argument("--seed", type=int, default=0, help="seed of the Optuna sampler")
    p.set_defaults(func=cmd_tune)


def cmd_tune(args: argparse.Namespace) -> int:
    from raysegbg.tune import SearchOptions, run_search

    result = run_search(SearchOptions(**_options(args)))
    print("\n" + format_table(result.rows, result.metric))
    out = result.search_dir
    if result.interrupted:
        done = sum(r.status != "unfinished" for r in result.rows)
        print(f"\nsearch interrupted after {done} of {result.samples} trials; continue it with")
        print(f"  {_resume_command(args, out.name)}")
        return 1
    if result.best is not None:
        print(f"\nbest trial {result.best.trial_id}: {result.metric} {result.best.metric:.4f}")
        print(f"best config  {out / BEST_CONFIG}  (raysegbg train --config {out / BEST_CONFIG})")
    print(f"summary      {out / SUMMARY_CSV}, {out / PLOT}")
    print(f"TensorBoard: tensorboard --logdir {out}")
    return 0


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """SearchOptions fields from the parsed arguments."""
    same = ("space", "config", "samples", "max_concurrent", "scheduler", "grace", "address")
    opts = {key: getattr(args, key) for key in (*same, "metric", "mode", "seed")}
    return {**opts, "overrides": args.set, "name": args.name or "", "resume": args.resume or ""}


def _resume_command(args: argparse.Namespace, name: str) -> str:
    """The command that continues this search (the base config tells where it is stored)."""
    words = ["raysegbg", "tune", "--resume", name]
    words += ["--config", args.config] if args.config else []
    for override in args.set:
        words += ["--set", override]
    words += ["--address", args.address] if args.address else []
    return shlex.join(words)


# -- reports ----------------------------------------------------------------------------------
SUMMARY_CSV = "summary.csv"
BEST_CONFIG = "best_config.yaml"
PLOT = "metric_vs_params.png"
HPARAMS_DIR = "hparams"


@dataclass
class TrialRow:
    """How one trial went: its sampled parameters and its last reported metrics."""

    trial_id: str
    params: dict[str, Any]
    metric: float  # the searched metric at its last epoch
    epochs: int
    status: str  # finished | stopped (early, by ASHA) | error | unfinished (interrupted)
    metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""


def best_row(rows: list[TrialRow], mode: str) -> TrialRow | None:
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
    write_hparams(search_dir / HPARAMS_DIR, rows)
    return best


def format_table(rows: list[TrialRow], metric: str) -> str:
    names = _param_names(rows)
    header = ["trial", "status", "epochs", metric, *names]
    lines = [header]
    for r in sorted(rows, key=lambda r: r.trial_id):
        cells = [r.trial_id, r.status, str(r.epochs), _fmt(r.metric)]
        lines.append(cells + [_fmt(r.params[n]) if n in r.params else "-" for n in names])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    padded = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    return "\n".join(line.rstrip() for line in padded)


def write_csv(path: Path, rows: list[TrialRow], names: list[str], metric: str) -> None:
    extra = [k for k in FINAL_KEYS if k != metric]
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["trial_id", "status", "epochs", metric, *names, *extra, "error"])
        for r in sorted(rows, key=lambda r: r.trial_id):
            values = [r.params.get(n, "") for n in names] + [r.metrics.get(k, "") for k in extra]
            out.writerow([r.trial_id, r.status, r.epochs, r.metric, *values, r.error])


def write_best_config(path: Path, base: dict[str, Any], best: TrialRow, metric: str) -> None:
    """The base config with the best trial's values: `raysegbg train --config` runs it as is
    (a fresh run name, so it never resumes a trial)."""
    values = apply_params(base, {**best.params, "logging.name": ""})
    cfg = from_dict(values)  # the same checks as `raysegbg train`
    header = f"# best trial {best.trial_id} ({best.status}, {best.epochs} epochs): {metric} "
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


def write_hparams(root: Path, rows: list[TrialRow]) -> None:
    """One HParams session per trial (sampled values vs final metrics), rewritten each time
    the search ends so a resumed search has exactly one per trial."""
    from raysegbg.tb import RunWriter

    shutil.rmtree(root, ignore_errors=True)
    for r in rows:
        finals = {k: r.metrics[k] for k in FINAL_KEYS if math.isfinite(r.metrics.get(k, math.nan))}
        metrics = {f"hparams/{k.split('/')[-1]}": v for k, v in finals.items()}
        metrics["hparams/epochs"] = float(r.epochs)
        writer = RunWriter(root / r.trial_id)
        writer.hparams({**r.params, "status": r.status}, metrics)
        writer.close()


def _param_names(rows: list[TrialRow]) -> list[str]:
    names: list[str] = []
    for r in rows:
        names += [n for n in r.params if n not in names]
    return names


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else "-"
    return str(value)
