"""`raysegbg tune`: the command-line wiring of a hyperparameter search.

Parses the arguments into `raysegbg.tune.SearchOptions`, runs the search (`tune` is imported
inside the handler, so `raysegbg --help` does not import Ray) and prints the table and where
the reports are (`raysegbg.tune_report` writes them). The handler returns an exit code and
lets `RaysegbgError` propagate: the main CLI prints it as one line.
"""

from __future__ import annotations

import argparse
import shlex
from typing import Any

from raysegbg.tune_report import BEST_CONFIG, PLOT, SUMMARY_CSV, format_table


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
        print(f"\nbest trial {result.best.name}: {result.metric} {result.best.metric:.4f}")
        print(f"best config  {out / BEST_CONFIG}  (raysegbg train --config {out / BEST_CONFIG})")
    print(f"summary      {out / SUMMARY_CSV}, {out / PLOT}")
    print(f"TensorBoard: tensorboard --logdir {out}")
    return 0


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """SearchOptions fields from the parsed arguments (a search's name checked here, before
    Ray starts: an empty `--name ""` would otherwise quietly become the default)."""
    from raysegbg.config import check_name

    for flag, value in (("--name", args.name), ("--resume", args.resume)):
        if value is not None:
            check_name(flag, value)
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
