"""MCIBI versus the baseline and versus a memory frozen at its initial value.

Same network, data, schedule and seeds; only the method changes. mIoU on the test split
(×100), mean ± std over seeds, on the built-in `ambiguous` multi-class set (local appearance
ambiguous, class statistics consistent across the dataset) and on the real MRI atlas task
(mricron-data ch2 + AAL grouped into 7 lobes; needs mricron-data).

Goal: on every task that ran, mcibi's mean mIoU is above the baseline's; exit 1 if missed.
Without both variants (`--variants`) the goal is not evaluated (exit 0). Information, not a
goal: whether mcibi-frozen (the memory update switched off) is below mcibi.

    python benchmarks/method_mcibi.py [--seeds 0 1 2] [--epochs 6]
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
    make_mri_lobes,
    means,
    need_mricron,
    report,
    table,
)

from raysegbg.data.synthetic import make_dataset

TASKS = ("ambiguous", "mri-lobes")


def goals(rows: Rows) -> int:
    """Print the goal's line per task and the control's; return the exit code."""
    found, notes = [], []
    for task, m in means(rows, "miou").items():
        if {"baseline", "mcibi"} <= m.keys():
            desc = f"{task}: mcibi mIoU > baseline mIoU"
            found.append(check(desc, m["mcibi"], m["baseline"], strict=True))
        if {"mcibi", "mcibi-frozen"} <= m.keys():
            shown = f"mcibi-frozen mIoU {m['mcibi-frozen']:.2f} vs mcibi {m['mcibi']:.2f}"
            notes.append(control_note(task, m["mcibi-frozen"] < m["mcibi"], shown))
    if not found:
        notes.insert(0, "goal not evaluated: mcibi mIoU > baseline (no task ran both)")
    return report(found, notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30, help="steps per epoch")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--variants", nargs="+", default=["baseline", "mcibi", "mcibi-frozen"])
    parser.add_argument("--set", nargs="*", default=[], help="extra config overrides")
    args = parser.parse_args()
    need_mricron(args.tasks)
    common = ["model.encoder_depth=4", "model.decoder_channels=[64,32,16,16]",
              f"train.epochs={args.epochs}", "train.batch_size=16",
              f"train.steps_per_epoch={args.steps}", f"data.crop_size={args.size}",
              "logging.image_every=1000", *args.set]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        tasks = {}
        data = make_dataset("ambiguous", Path(tmp) / "amb", n=600, size=args.size, seed=0)
        if "ambiguous" in args.tasks:
            tasks["ambiguous"] = [*common, f"data.path={Path(tmp) / 'amb'}"]
        if "mri-lobes" in args.tasks:
            make_mri_lobes(Path(tmp) / "mri", args.size)
            tasks["mri-lobes"] = [*common, f"data.path={Path(tmp) / 'mri'}"]
        variants = {
            "baseline": ["method.name=baseline", "method.baseline.dice_weight=0"],
            "mcibi": ["method.name=mcibi"],
            "mcibi-frozen": ["method.name=mcibi", "method.mcibi.update=false"],
        }
        variants = {k: v for k, v in variants.items() if k in args.variants}
        rows = compare(tasks, variants, args.seeds, ["miou", "fg_dice"])
    print(f"\n{data.name}: {data.splits}; seeds {args.seeds}; {args.epochs} epochs x "
          f"{args.steps} steps; extra {args.set}\n")  # fmt: skip
    print(table(rows, ["miou", "fg_dice"]))
    sys.exit(goals(rows))


if __name__ == "__main__":
    main()
