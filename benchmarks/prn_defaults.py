"""prn's defaults re-checked on the validation split: bias_augment × use_image, over seeds.

Both were once picked from seed-0 test-split figures (`bias_augment=1.0`, `use_image=true`);
this check moved `bias_augment` to 0 (README, prn). Here every variant is scored on the
validation split only (the test split is never read): per seed, one prn run with the defaults
trains the base; the three other variants train their refiner on that same base
(`method.prn.base_checkpoint`), so only the refiner setting differs. Score: validation mIoU and
foreground Dice of each run's best checkpoint (by val mIoU).
Task: the built-in `varying_contrast` set, or with `--task mri-brain` the MRI brain (mricron's
ch2 + ch2bet, needs mricron-data); in-process runs.

Goal (exit 1 if missed): the defaults have the highest mean validation mIoU, within 0.2 points
(×100) of the best variant.

    python benchmarks/prn_defaults.py [--task contrast|mri-brain] [--seeds 0 1 2]
                                      [--base-epochs 6] [--epochs 6]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import check, make_mri_brain, need_mricron, report

from raysegbg.config import load_config
from raysegbg.data.synthetic import make_dataset
from raysegbg.inference import evaluate_run
from raysegbg.local import train_local

DEFAULT = (0.0, True)
VARIANTS = [(0.0, True), (1.0, True), (0.0, False), (1.0, False)]  # (bias_augment, use_image)


def name(variant: tuple[float, bool]) -> str:
    return f"bias_augment={variant[0]:g} use_image={str(variant[1]).lower()}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--base-epochs", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=6, help="refiner epochs")
    parser.add_argument("--steps", type=int, default=30, help="steps per epoch")
    parser.add_argument("--n", type=int, default=600, help="images in the synthetic set")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--task", choices=["contrast", "mri-brain"], default="contrast")
    args = parser.parse_args()
    need_mricron([args.task])
    scores: dict[tuple[float, bool], dict[str, list[float]]] = {
        v: {"miou": [], "fg_dice": []} for v in VARIANTS
    }
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        if args.task == "mri-brain":
            make_mri_brain(data, args.size)
        else:
            make_dataset("varying_contrast", data, n=args.n, size=args.size, seed=0)
        common = [f"data.path={data}", "method.name=prn", "model.encoder_depth=4",
                  "model.decoder_channels=[64,32,16,16]", f"train.epochs={args.epochs}",
                  f"method.prn.base_epochs={args.base_epochs}", "train.batch_size=16",
                  f"train.steps_per_epoch={args.steps}", f"data.crop_size={args.size}",
                  "logging.image_every=1000", f"logging.storage_path={tmp}"]  # fmt: skip
        for seed in args.seeds:
            base_run = Path(tmp) / f"default-s{seed}"
            for variant in VARIANTS:
                start = time.perf_counter()
                label = name(variant).replace(" ", "_")
                run = base_run if variant == DEFAULT else Path(tmp) / f"{label}-s{seed}"
                overrides = [*common, f"train.seed={seed}", f"logging.name={run.name}",
                             f"method.prn.bias_augment={variant[0]}",
                             f"method.prn.use_image={str(variant[1]).lower()}"]  # fmt: skip
                if variant != DEFAULT:  # the refiner on this seed's default run's base
                    overrides.append(f"method.prn.base_checkpoint={base_run}")
                train_local(load_config(None, overrides), run, log=lambda line: None)
                got = evaluate_run(run, "val", "best")
                for metric in ("miou", "fg_dice"):
                    scores[variant][metric].append(100 * got[metric])
                print(f"seed {seed}  {name(variant):<34} val mIoU {100 * got['miou']:.2f}  "
                      f"fg Dice {100 * got['fg_dice']:.2f}  ({time.perf_counter() - start:.0f} s)",
                      flush=True)  # fmt: skip

    print(f"\n{args.task}: validation split, seeds {args.seeds}; base {args.base_epochs} + refiner "
          f"{args.epochs} epochs x {args.steps} steps; mean ± std (x100)\n")  # fmt: skip
    print("| variant | val mIoU | val fg Dice |\n|---|---:|---:|")
    means = {}
    for variant in VARIANTS:
        cells = []
        for metric in ("miou", "fg_dice"):
            values = scores[variant][metric]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.fmean(values):.2f} ± {spread:.2f}")
        means[variant] = statistics.fmean(scores[variant]["miou"])
        mark = " (default)" if variant == DEFAULT else ""
        print(f"| {name(variant)}{mark} | {cells[0]} | {cells[1]} |")
    best = max(means, key=means.get)
    goal = check(f"defaults' val mIoU within 0.2 of the best ({name(best)})",
                 means[DEFAULT] - means[best], -0.2)  # fmt: skip
    return report([goal])


if __name__ == "__main__":
    sys.exit(main())
