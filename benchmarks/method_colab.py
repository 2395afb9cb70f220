"""CoLab versus the baseline and versus a frozen random task generator.

Same segmentation network, data, schedule and seeds; only the method changes. Test-split
foreground Dice, precision and false-positive rate (×100), mean ± std over seeds, on the
built-in sets with a heterogeneous background (`head`: synthetic head slices whose scalp and
extra-cranial tissue look like brain; `hetero_bg`: red blobs on a patchwork, saturated) and on
the real MRI brain task (mricron-data ch2 + ch2bet brain mask; needs mricron-data).

Goal: on every task that ran, colab K=3 (without 3 in `--k`: the first K) has a higher mean
foreground Dice and a lower mean FPR than the baseline; exit 1 if missed. Information, not a
goal: whether the frozen generator (K=3, meta update off) is worse than it, per metric.

    python benchmarks/method_colab.py [--seeds 0 1 2] [--epochs 5] [--k 2 3 4]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from common import (
    Rows,
    check,
    compare,
    control_note,
    make_mri_brain,
    means,
    need_mricron,
    report,
    table,
)

from raysegbg.data.synthetic import make_dataset

METRICS = ["fg_dice", "precision", "fpr"]
BUILT_IN = ("head", "hetero_bg")  # the built-in sets among --tasks
GOAL_METRICS = {"fg_dice": False, "fpr": True}  # metric: is lower better?


def goals(rows: Rows, method: str, control: str = "frozen gen K=3") -> int:
    """Print the goal's line per task and metric, and the control's; return the exit code."""
    stats = {metric: means(rows, metric) for metric in GOAL_METRICS}
    found, notes = [], []
    for task in stats["fg_dice"]:
        for metric, lower in GOAL_METRICS.items():
            m = stats[metric][task]
            desc = f"{task}: {method} {metric} {'<' if lower else '>'} baseline"
            found.append(check(desc, m[method], m["baseline"], lower=lower, strict=True))
            worse = m[control] > m[method] if lower else m[control] < m[method]
            shown = f"{control} {metric} {m[control]:.2f} vs {method} {m[method]:.2f}"
            notes.append(control_note(task, worse, shown))
    if not found:
        notes.insert(0, f"goal not evaluated: {method} vs baseline (no task ran)")
    return report(found, notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30, help="steps per epoch")
    parser.add_argument("--k", type=int, nargs="+", default=[2, 3, 4])
    held = "also colab with these K and the meta batch from a holdout"
    parser.add_argument("--held-k", type=int, nargs="*", default=[], help=held)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--n", type=int, default=600, help="images in the built-in set")
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=["head", "mri-brain"],
        choices=[*BUILT_IN, "mri-brain"],
    )
    parser.add_argument("--set", nargs="*", default=[], help="extra config overrides")
    args = parser.parse_args()
    need_mricron(args.tasks)
    common = ["model.encoder_depth=4", "model.decoder_channels=[64,32,16,16]",
              f"train.epochs={args.epochs}", "train.batch_size=16",
              f"train.steps_per_epoch={args.steps}", f"data.crop_size={args.size}",
              "logging.image_every=1000", *args.set]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        tasks = {}
        for name in BUILT_IN:
            if name in args.tasks:
                make_dataset(name, Path(tmp) / name, n=args.n, size=args.size, seed=0)
                tasks[name] = [*common, f"data.path={Path(tmp) / name}"]
        if "mri-brain" in args.tasks:
            make_mri_brain(Path(tmp) / "brain", args.size)
            tasks["mri-brain"] = [*common, f"data.path={Path(tmp) / 'brain'}"]
        variants = {"baseline": ["method.name=baseline"]}
        for k in args.k:
            variants[f"colab K={k}"] = ["method.name=colab", f"method.colab.k={k}"]
        for k in args.held_k:
            variants[f"colab K={k} held"] = ["method.name=colab", f"method.colab.k={k}",
                                             "method.colab.meta_batch=holdout"]  # fmt: skip
        variants["frozen gen K=3"] = [
            "method.name=colab",
            "method.colab.k=3",
            "method.colab.meta_update=false",
        ]
        rows = compare(tasks, variants, args.seeds, METRICS)
    print(
        f"\nseeds {args.seeds}; {args.epochs} epochs x {args.steps} steps; built-in set "
        f"{args.n} images; extra {args.set}; test split\n"
    )
    print(table(rows, METRICS))
    sys.exit(goals(rows, "colab K=3" if 3 in args.k else f"colab K={args.k[0]}"))


if __name__ == "__main__":
    main()
