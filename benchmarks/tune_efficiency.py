"""How much training does ASHA + Optuna save over a full grid, for the same answer?

A small space (learning rate x Dice weight, 3 x 3 = 9 points) on a tiny seeded dataset
(32 px, depth-3 U-Net, 1 CPU per trial, 2 trials at a time). First every grid point is trained
for all epochs; its best final metric, minus 1 point (0.01 of mIoU), is the target. Then
`raysegbg tune` (Optuna TPE proposing points of the same grid, ASHA stopping trials at epochs
1 and 3) runs with the same number of trials. The cost of a search is its trial-epochs: the
epochs reported by all its trials, in wall-clock order, until one of them reaches the target.
The goal is for ASHA + Optuna to need at most 35 % of the full grid's trial-epochs.

Runs are seeded and deterministic on CPU, so a point gives the same curve in both searches.

    python benchmarks/tune_efficiency.py [--epochs 9] [--samples 9] [--seed 0] [--smoke-test]
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import yaml

from raysegbg.data.synthetic import make_dataset
from raysegbg.tune import SearchOptions, SearchResult, run_search

LRS = [1e-4, 1e-3, 1e-2]
DICE_WEIGHTS = [0.0, 0.5, 1.0]
GOAL = 0.35
METRIC = "val/miou"


def base_overrides(data: Path, runs: Path, epochs: int) -> list[str]:
    values = {
        "data.path": data, "data.crop_size": 32, "model.encoder_depth": 3,
        "model.decoder_channels": "[32,16,8]", "train.epochs": epochs, "train.batch_size": 8,
        "train.steps_per_epoch": 4, "scaling.workers": 1, "scaling.cpus_per_worker": 1,
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


def reports(result: SearchResult) -> list[tuple[float, str, int, float]]:
    """Every epoch report of every trial: (wall time, trial, epoch, metric), oldest first."""
    out = []
    for row in result.rows:
        with (result.search_dir / row.trial_id / "progress.csv").open() as f:
            for rec in csv.DictReader(f):
                out.append(
                    (float(rec["wall_time"]), row.trial_id, int(rec["epoch"]), float(rec[METRIC]))
                )
    return sorted(out)


def epochs_to_target(result: SearchResult, target: float) -> int | None:
    """Trial-epochs reported (all trials) up to the first report at or above `target`."""
    for count, (_, _, _, value) in enumerate(reports(result), 1):
        if value >= target:
            return count
    return None


def best_final(result: SearchResult) -> float:
    return max(r.metric for r in result.rows if r.status == "finished")


def grid_matrix(result: SearchResult, lrs: list[float], dice: list[float]) -> str:
    """Final metric of each grid point: learning rates down, Dice weights across."""
    final = {(r.params["optim.lr"], r.params["method.baseline.dice_weight"]): r.metric
             for r in result.rows}  # fmt: skip
    lines = ["lr \\ dice  " + "  ".join(f"{d:>6}" for d in dice)]
    for lr in lrs:
        lines.append(f"{lr:<10g}  " + "  ".join(f"{final[(lr, d)]:.4f}" for d in dice))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=9)
    parser.add_argument("--samples", type=int, default=0, help="ASHA trials (default: grid size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n", type=int, default=200, help="images in the synthetic dataset")
    parser.add_argument("--out", help="keep the searches here (default: a temporary folder)")
    parser.add_argument("--smoke-test", action="store_true", help="2 x 2 grid, 3 epochs")
    args = parser.parse_args()
    lrs, dice = (LRS[1:], DICE_WEIGHTS[1:]) if args.smoke_test else (LRS, DICE_WEIGHTS)
    epochs = 3 if args.smoke_test else args.epochs
    root = Path(args.out or tempfile.mkdtemp(prefix="tune-efficiency-"))
    data = root / "data"
    if not (data / "dataset.json").exists():
        make_dataset("hetero_bg", data, n=args.n, size=32, seed=0)
    space = write_space(root / "space.yaml", lrs, dice)
    overrides = base_overrides(data, root / "runs", epochs)
    start = time.perf_counter()
    common = {"space": str(space), "overrides": overrides, "max_concurrent": 2, "seed": args.seed}
    stamp = time.strftime("%H%M%S")
    grid = run_search(SearchOptions(**common, scheduler="none", grid=True, name=f"grid-{stamp}"))
    samples = args.samples or len(grid.rows)
    asha = run_search(SearchOptions(**common, samples=samples, name=f"asha-{stamp}"))
    seconds = time.perf_counter() - start
    print_report(grid, asha, epochs, lrs, dice, seconds)
    import ray

    ray.shutdown()


def print_report(grid, asha, epochs, lrs, dice, seconds: float) -> None:
    full = len(grid.rows) * epochs
    target = best_final(grid) - 0.01
    print(f"\nfinal {METRIC} of the grid ({epochs} epochs each):\n{grid_matrix(grid, lrs, dice)}")
    print(f"\ntarget: grid best {best_final(grid):.4f} - 0.01 = {target:.4f}\n")
    header = ("search", "trials", "trial-epochs", "to target", "% of full grid", f"best {METRIC}")
    rows = [header]
    for name, result in (("full grid", grid), ("ASHA + Optuna (TPE)", asha)):
        spent = len(reports(result))
        needed = epochs_to_target(result, target)
        share = f"{100 * needed / full:.0f} %" if needed else "not reached"
        best = max(r.metric for r in result.rows)
        rows.append((name, str(len(result.rows)), str(spent), str(needed or "-"), share,
                     f"{best:.4f}"))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    needed = epochs_to_target(asha, target)
    verdict = "met" if needed is not None and needed / full <= GOAL else "NOT met"
    print(f"\ngoal <= {GOAL:.0%} of the grid's {full} trial-epochs: {verdict}")
    statuses = [r.status for r in asha.rows]
    stopped, finished = statuses.count("stopped"), statuses.count("finished")
    print(f"ASHA trials: {finished} finished, {stopped} stopped early; wall time {seconds:.0f} s")
    print(f"searches (TensorBoard logdirs) in {grid.search_dir.parent}")


if __name__ == "__main__":
    main()
