"""How much training does ASHA + Optuna save over a full grid, for the same answer?

A small space (learning rate x Dice weight, 3 x 3 = 9 points) on a tiny seeded dataset
(200 images of 32 px, depth-3 U-Net, 16 steps an epoch, 1 CPU per trial, 2 trials at a time).
First every grid point is trained for all epochs; its best final metric minus 1 point (0.01
of mIoU) is the target. Then `raysegbg tune` (Optuna TPE proposing points of the same grid,
ASHA with its default grace period) runs as many trials as the grid has points. The cost of
a search is its trial-epochs: the epochs reported by all its trials, in wall-clock order,
until one of them reaches the target. Goal: ASHA + Optuna needs at most 35 % of the grid's
(in this run; exit 1 if missed).

Runs are seeded and deterministic on CPU, so a grid point gives the same curve in any search.
One search is one draw of the sampler, so the grid's curves are also replayed through the
same ASHA rule and TPE sampler for 20 sampler seeds (2 trials at a time, ~25 s to start a
trial, ~1 s an epoch), which shows how typical the measured draw is.

    python benchmarks/tune_efficiency.py [--epochs 9] [--seed 0] [--smoke-test]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna
import yaml
from common import Goal, check, report

from raysegbg.data.synthetic import make_dataset
from raysegbg.tune import ASHA_REDUCTION, SearchOptions, SearchResult, make_sampler, run_search

LRS = [1e-4, 1e-3, 1e-2]
DICE_WEIGHTS = [0.0, 0.5, 1.0]
GOAL = 0.35
METRIC = "val/miou"
CONCURRENT = 2


def base_overrides(data: Path, runs: Path, epochs: int) -> list[str]:
    values = {
        "data.path": data, "data.crop_size": 32, "model.encoder_depth": 3,
        "model.decoder_channels": "[32,16,8]", "train.epochs": epochs, "train.batch_size": 8,
        "train.steps_per_epoch": 16, "scaling.workers": 1, "scaling.cpus_per_worker": 1,
        "logging.storage_path": runs, "logging.image_every": 1000, "logging.num_images": 2,
    }  # fmt: skip
    return [f"{k}={v}" for k, v in values.items()]


def write_space(path: Path, lrs: list[float], dice: list[float]) -> Path:
    params = {
        "optim.lr": {"type": "categorical", "choices": lrs},
        "method.baseline.dice_weight": {"type": "categorical", "choices": dice},
    }
    path.write_text(yaml.safe_dump({"params": params}, sort_keys=False))
    return path


# -- measuring a search -----------------------------------------------------------------------
def reports(result: SearchResult) -> list[tuple[float, str, int, float]]:
    """Every epoch report of every trial: (wall time, trial, epoch, metric), oldest first."""
    out = []
    for row in result.rows:
        with (result.search_dir / row.name / "progress.csv").open() as f:
            for rec in csv.DictReader(f):
                out.append(
                    (float(rec["wall_time"]), row.trial_id, int(rec["epoch"]), float(rec[METRIC]))
                )
    return sorted(out)


def epochs_to_target(values: list[float], target: float) -> int | None:
    """Trial-epochs (reports, in order) up to the first one at or above `target`."""
    return next((i for i, value in enumerate(values, 1) if value >= target), None)


def trained_epochs(result: SearchResult) -> int:
    """Epochs actually trained, from each trial's TensorBoard: a trial that ASHA stops has
    usually started its next epoch before the stop lands."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    total = 0
    for row in result.rows:
        acc = EventAccumulator(str(result.search_dir / row.name / "tb"))
        acc.Reload()
        total += max((e.step for e in acc.Scalars(METRIC)), default=0)
    return total


def grid_curves(grid: SearchResult) -> dict[tuple, list[float]]:
    """(lr, dice weight) -> the metric after every epoch."""
    curves: dict[tuple, list[float]] = {}
    for _, trial, _, value in reports(grid):
        row = next(r for r in grid.rows if r.trial_id == trial)
        key = (row.params["optim.lr"], row.params["method.baseline.dice_weight"])
        curves.setdefault(key, []).append(value)
    return curves


# -- replaying ASHA + TPE on the grid's curves -----------------------------------------------
def replay(curves: dict[tuple, list[float]], epochs: int, seed: int, start_s: float = 25.0):
    """One search of len(curves) trials, `CONCURRENT` at a time, with the rule of
    `raysegbg.tune`: rungs at grace x 3^k before the last epoch, stop below the rung's
    (1 - 1/3) quantile. Returns the metric of every report, in time order."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    grace = max(1, epochs // 4)
    count = int(np.log((epochs - 1) / grace) / np.log(ASHA_REDUCTION) + 1)
    rungs: dict[int, list[float]] = {grace * ASHA_REDUCTION**k: [] for k in range(count)}
    study = optuna.create_study(direction="maximize", sampler=make_sampler(seed, len(curves)))
    lrs, dice = sorted({k[0] for k in curves}), sorted({k[1] for k in curves})
    running, values, started = [], [], 0
    while running or started < len(curves):
        while started < len(curves) and len(running) < CONCURRENT:
            trial = study.ask()
            key = (trial.suggest_categorical("lr", lrs), trial.suggest_categorical("d", dice))
            running.append([start_s + (values[-1][0] if values else 0.0), trial, key, 0])
            started += 1
        running.sort(key=lambda r: r[0])
        item = running[0]
        item[3] += 1
        value = curves[item[2]][item[3] - 1]
        values.append((item[0], value))
        recorded = rungs.get(item[3])
        stop = bool(recorded) and value < np.nanpercentile(recorded, 100 * (1 - 1 / 3))
        if recorded is not None:
            recorded.append(value)
        if stop or item[3] == epochs:
            study.tell(item[1], value)
            running.pop(0)
        else:
            item[0] += 1.0
    return [v for _, v in values]


def replay_summary(curves: dict[tuple, list[float]], epochs: int, target: float) -> str:
    full = len(curves) * epochs
    shares = []
    for seed in range(20):
        needed = epochs_to_target(replay(curves, epochs, seed), target)
        shares.append(needed / full if needed else None)
    met = sum(s is not None and s <= GOAL for s in shares)
    reached = [s for s in shares if s is not None]
    median = statistics.median([s if s is not None else 1.0 for s in shares])
    return (
        f"replayed over 20 sampler seeds: target reached in {len(reached)}/20, median "
        f"{100 * median:.0f} % of the grid (unreached counted as 100 %), <= {GOAL:.0%} in {met}/20"
    )


# -- the benchmark ----------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=9)
    parser.add_argument("--seed", type=int, default=0, help="seed of the Optuna sampler")
    parser.add_argument("--n", type=int, default=200, help="images in the synthetic dataset")
    parser.add_argument("--lrs", type=float, nargs="+", default=LRS)
    parser.add_argument("--dice-weights", type=float, nargs="+", default=DICE_WEIGHTS)
    parser.add_argument("--out", help="keep the searches here (default: a temporary folder)")
    parser.add_argument("--smoke-test", action="store_true", help="2 x 2 grid, 3 epochs")
    args = parser.parse_args()
    lrs, dice = args.lrs, args.dice_weights
    if args.smoke_test:
        lrs, dice = lrs[-2:], dice[-2:]
    epochs = 3 if args.smoke_test else args.epochs
    if args.out:
        sys.exit(run(Path(args.out), lrs, dice, epochs, args))
    # trials keep checkpoints (~50 MB each here): do not leave them behind
    with tempfile.TemporaryDirectory(prefix="tune-efficiency-") as tmp:
        code = run(Path(tmp), lrs, dice, epochs, args)
    sys.exit(code)


def run(root: Path, lrs: list[float], dice: list[float], epochs: int, args) -> int:
    """The grid, then ASHA + Optuna, under `root`; prints the report, returns the exit code."""
    import ray

    data = root / "data"
    if not (data / "dataset.json").exists():
        make_dataset("hetero_bg", data, n=args.n, size=32, seed=0)
    common = {
        "space": str(write_space(root / "space.yaml", lrs, dice)),
        "overrides": base_overrides(data, root / "runs", epochs),
        "max_concurrent": CONCURRENT,
        "seed": args.seed,
    }
    stamp = time.strftime("%H%M%S")
    start = time.perf_counter()
    grid = run_search(SearchOptions(**common, scheduler="none", grid=True, name=f"grid-{stamp}"))
    asha = run_search(SearchOptions(**common, samples=len(grid.rows), name=f"asha-{stamp}"))
    seconds = time.perf_counter() - start
    goal = print_report(grid, asha, epochs, lrs, dice, seconds)
    kept = f"in {grid.search_dir.parent}" if args.out else "deleted (pass --out DIR to keep them)"
    print(f"searches (TensorBoard logdirs) {kept}")
    ray.shutdown()
    return report([goal])


def print_report(grid, asha, epochs: int, lrs, dice, seconds: float) -> Goal:
    curves = grid_curves(grid)
    best = max(curve[-1] for curve in curves.values())
    target, full = best - 0.01, len(curves) * epochs
    print(f"\nfinal {METRIC} of the grid ({epochs} epochs each; rows lr, columns Dice weight)")
    print("          " + "  ".join(f"{d:>6}" for d in dice))
    for lr in lrs:
        print(f"{lr:<8g}  " + "  ".join(f"{curves[(lr, d)][-1]:.4f}" for d in dice))
    print(f"\ntarget: grid best {best:.4f} - 0.01 = {target:.4f}\n")
    header = ("search", "trials", "trial-epochs", "trained", "to target", "% of grid", "best ever")
    rows = [header]
    for name, result in (("full grid", grid), ("ASHA + Optuna (TPE)", asha)):
        values = [value for *_, value in reports(result)]
        needed = epochs_to_target(values, target)
        share = f"{100 * needed / full:.0f} %" if needed else "not reached"
        rows.append((name, str(len(result.rows)), str(len(values)), str(trained_epochs(result)),
                     str(needed or "-"), share, f"{max(values):.4f}"))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    print()
    print(replay_summary(curves, epochs, target))
    statuses = [r.status for r in asha.rows]
    stopped, finished = statuses.count("stopped"), statuses.count("finished")
    print(f"ASHA trials: {finished} finished, {stopped} stopped early; wall time {seconds:.0f} s")
    return this_run_goal(asha, target, full)


def this_run_goal(asha: SearchResult, target: float, full: int) -> Goal:
    """The goal: this ASHA + Optuna search reaches the target within `GOAL` of the grid's cost."""
    needed = epochs_to_target([value for *_, value in reports(asha)], target)
    desc = f"ASHA + Optuna trial-epochs to target, % of the grid's {full}, <= {100 * GOAL:.0f}"
    if needed is None:
        return Goal(desc, False, "target not reached")
    return check(desc, 100 * needed / full, 100 * GOAL, lower=True, digits=1)


if __name__ == "__main__":
    main()
