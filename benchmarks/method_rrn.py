"""rrn versus supervised-only and versus cross pseudo supervision without filtering (1/8 labeled).

A fixed share of the training images keeps its masks (`--labeled`, 1/8 by default); the others
are unlabeled, their masks hidden from training and used only to measure the pseudo-labels.
Same two networks, data, schedule and seeds in every variant; only the method changes:

- supervised: the labeled images only (`cps_weight=0`; `threshold=0`: its kept accuracy is
  the accuracy of every pseudo-label, as for cps);
- cps: cross pseudo supervision with CutMix, no filter, no correction (`threshold=0`);
- rrn: region filtering and disagreement correction, its threshold chosen among
  `--thresholds` by mean validation mIoU over the seeds (the test split is read once, for
  the table: supervised, cps and the chosen rrn only);
- oracle (with `--oracle`, a diagnostic, validation only): rrn with each region scored by its
  true pseudo-label accuracy from the hidden masks (`method.rrn.filter=oracle`) at the chosen
  threshold: the best a region filter can do there. When it does not beat cps, no
  discriminator can.

Tasks: the built-in `multiclass` set, and the MRI lobes task (mricron-data ch2 + AAL grouped
into 7 lobes; needs mricron-data); `--tasks ambiguous` adds the built-in set whose
classes differ only in a mean colour under pixel noise (pseudo-labels far noisier than on
multiclass: cps gains 6 points over supervised there, 3 seeds; rrn at 0.8 / 0.9 stays 0.2 /
0.6 below cps on validation, its discriminator's kept regions 97.8 % right, dropped 80-87 %;
the oracle at 0.9 gains only +0.23 over cps, 84.74 against 84.51: little for any region
filter to win there). Nor did the authors' released form of the selection help (seed 0, val,
both sets, probe reverted): cross pseudo supervision kept whole, plus a self-training loss on
each network's own kept regions, matched cps (96.23 / 84.37 against 96.26 / 84.41).
On multiclass the discriminators learn from labeled images the networks have memorised, so
they rarely see a wrong region; neither 4-px regions nor training them on synthetic errors as
well (classes permuted inside a random box; 3 seeds) lifted rrn above cps there.
`--tasks contexts` adds fbr's built-in set (boats on water, planes on sky, cars on road, 4
classes), where cross pseudo supervision sometimes goes wrong: on 2 of 6 seeds its pseudo-
labels drifted (test 94.83 and 97.68 against supervised 99.24 and 98.71) and rrn's filter
held (99.10, 98.66); on the other 4 cps and rrn were within 0.2 of each other and above
supervised. There, and only at a threshold of 0.995 (chosen on validation over seeds 0-2
against 0.97: 99.55 against 99.34; the oracle at 0.995 scored 99.06 on seed 0, no better),
rrn is above both, 6 seeds, test: rrn 99.44 ± 0.47, supervised 99.02 ± 0.46, cps 98.53 ±
1.98 (`--tasks contexts --thresholds 0.995 --seeds 0 1 2 3 4 5`).
mIoU ×100 on the test split, mean ± std over
seeds; the pseudo-label accuracy of kept and of dropped regions (rrn, last epoch, unlabeled
training images against their hidden masks).

Goals, per task: rrn's mean test mIoU above supervised and above cps; rrn's kept regions more
accurate than its dropped ones. Exit 1 if one is missed.

The schedule was chosen on validation (seed 0 probes, then the three seeds of the table): at 8
epochs x 12 steps, networks trained from scratch had not learnt every class when the
unlabeled loss came in, and cross pseudo supervision erased the classes they had not learnt
yet (cps 27 points below supervised on multiclass); 48 epochs with the unlabeled loss ramped
up, and filtering held back, over the first 16 let them learn the classes from the labels
first. The multiclass set has 160 images (16 labeled): at 480 (48 labeled) every variant
scored the same at 24 epochs (val mIoU, seed 0: supervised 94.7, cps 94.5, rrn 94.6), so the
labels were not what limited the networks and unlabeled images had nothing to add.

    python benchmarks/method_rrn.py [--seeds 0 1 2] [--epochs 48] [--rampup 16] [--n 160]
        [--tasks multiclass ambiguous contexts mri-lobes] [--probe]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from common import (
    PROBE_HELP,
    PROBE_LINE,
    cell,
    check,
    finite_mean,
    make_mri_lobes,
    need_mricron,
    report,
)

from raysegbg.config import load_config
from raysegbg.data.synthetic import make_dataset
from raysegbg.inference import evaluate_run
from raysegbg.local import train_local

KEPT = ("rrn/kept_acc", "rrn/dropped_acc", "rrn/kept_share")
BUILT_IN = ("multiclass", "ambiguous", "contexts")  # the built-in sets among --tasks


def train_and_score(overrides: list[str], seed: int, root: Path) -> dict:
    """One seeded in-process run: its folder, the val mIoU of its best (by validation)
    checkpoint, and the last epoch's kept / dropped pseudo-label accuracy. The test split is
    scored later, and only for the runs the table compares."""
    name = f"r{len(list(root.iterdir()))}"
    cfg = load_config(None, [*overrides, f"train.seed={seed}", f"logging.storage_path={root}",
                             f"logging.name={name}"])  # fmt: skip
    metrics, _ = train_local(cfg, root / name, log=lambda line: None)
    out = {k: metrics.get(k, float("nan")) for k in KEPT}
    out["val"] = evaluate_run(root / name, "val")["miou"]
    out["test"], out["run"] = float("nan"), root / name
    return out


def train_seeds(task: str, variant: str, overrides: list[str], seeds: list[int],
                root: Path) -> list[dict]:  # fmt: skip
    """One variant over the seeds, a line per run."""
    runs = []
    for seed in seeds:
        start = time.perf_counter()
        r = train_and_score(overrides, seed, root)
        runs.append(r)
        print(f"{task:<11} {variant:<11} seed {seed}  val {r['val']:.4f}  kept "
              f"{r['rrn/kept_acc']:.4f} dropped {r['rrn/dropped_acc']:.4f} share "
              f"{r['rrn/kept_share']:.3f}  ({time.perf_counter() - start:.0f} s)",
              flush=True)  # fmt: skip
    return runs


def row(task: str, variant: str, runs: list[dict[str, float]], test: bool) -> str:
    column = lambda key: cell([r[key] for r in runs])  # noqa: E731
    kept = "".join(column(k) for k in KEPT)
    return f"{task:<12}{variant:<12}{column('val')}{column('test') if test else cell([])}{kept}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=48)
    parser.add_argument(
        "--rampup",
        type=int,
        default=16,
        help="epochs of the unlabeled-loss ramp-up, and of unfiltered warm-up",
    )
    parser.add_argument("--steps", type=int, default=12, help="steps per epoch")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--labeled", type=float, default=0.125)
    parser.add_argument("--n", type=int, default=160, help="images of a built-in set")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.9, 0.97])
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=["multiclass", "mri-lobes"],
        choices=[*BUILT_IN, "mri-lobes"],
    )
    parser.add_argument(
        "--oracle",
        action="store_true",
        help="also the oracle filter at the chosen threshold (validation only)",
    )
    parser.add_argument("--set", nargs="*", default=[], help="extra config overrides")
    parser.add_argument("--probe", action="store_true", help=PROBE_HELP)
    args = parser.parse_args()
    need_mricron(args.tasks)
    common = ["method.name=rrn", f"method.rrn.labeled_fraction={args.labeled}",
              "model.encoder_depth=3", "model.decoder_channels=[32,16,8]", "optim.lr=3e-3",
              f"train.epochs={args.epochs}", "train.batch_size=8",
              f"train.steps_per_epoch={args.steps}", f"data.crop_size={args.size}",
              f"method.rrn.rampup_share={args.rampup / args.epochs}",
              f"method.rrn.warmup_share={args.rampup / args.epochs}",
              "logging.image_every=1000", *args.set]  # fmt: skip
    variants = {
        "supervised": ["method.rrn.cps_weight=0", "method.rrn.threshold=0"],
        "cps": ["method.rrn.threshold=0", "method.rrn.correction=false"],
        **{f"rrn@{t:g}": [f"method.rrn.threshold={t}"] for t in args.thresholds},
    }
    goals, rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tasks = {}
        for name in BUILT_IN:
            if name in args.tasks:
                make_dataset(name, Path(tmp) / name, n=args.n, size=args.size, seed=0)
                tasks[name] = Path(tmp) / name
        if "mri-lobes" in args.tasks:
            tasks["mri-lobes"] = make_mri_lobes(Path(tmp) / "mri", args.size)
        for task, data in tasks.items():
            root = Path(tmp) / f"runs-{task}"
            root.mkdir()
            results: dict[str, list[dict]] = {}
            for variant, overrides in variants.items():
                results[variant] = train_seeds(
                    task, variant, [*common, f"data.path={data}", *overrides], args.seeds, root
                )
            chosen = max((v for v in variants if v.startswith("rrn@")),
                         key=lambda v: finite_mean([r["val"] for r in results[v]]))  # fmt: skip
            # the table's test column: these only (a probe reads none)
            compared = () if args.probe else ("supervised", "cps", chosen)
            if args.oracle:
                oracle = [
                    *common,
                    f"data.path={data}",
                    *variants[chosen],
                    "method.rrn.filter=oracle",
                ]
                results[f"oracle@{chosen[4:]}"] = train_seeds(
                    task, "oracle", oracle, args.seeds, root
                )
            for variant in compared:  # the test split, read once
                for r in results[variant]:
                    r["test"] = evaluate_run(r["run"], "test")["miou"]
                print(
                    f"{task:<11} {variant:<11} test "
                    + " ".join(f"{r['test']:.4f}" for r in results[variant]),
                    flush=True,
                )
            for variant in results:
                mark = "  <- chosen on val" if variant == chosen else ""
                rows.append(row(task, variant, results[variant], variant in compared) + mark)
            if args.probe:
                continue
            test = {v: finite_mean([r["test"] for r in results[v]]) * 100 for v in compared}
            rrn = results[chosen]
            goals += [
                check(f"{task}: rrn ({chosen}) test mIoU > supervised", test[chosen],
                      test["supervised"], strict=True),
                check(f"{task}: rrn ({chosen}) test mIoU > cps", test[chosen], test["cps"],
                      strict=True),
                check(f"{task}: rrn kept-region accuracy > dropped-region accuracy",
                      finite_mean([r["rrn/kept_acc"] for r in rrn]) * 100,
                      finite_mean([r["rrn/dropped_acc"] for r in rrn]) * 100, strict=True),
            ]  # fmt: skip
    print(f"\nlabeled {args.labeled}; seeds {args.seeds}; {args.epochs} epochs x {args.steps} "
          f"steps, ramp-up {args.rampup}; {args.size} px; built-in sets n={args.n}; "
          f"extra {args.set}\n")  # fmt: skip
    head = (f"{'task':<12}{'variant':<12}{'val mIoU':>15}{'test mIoU':>15}{'kept acc':>15}"
            f"{'dropped acc':>15}{'kept share':>15}")  # fmt: skip
    print(head + "\n" + "-" * len(head) + "\n" + "\n".join(rows))
    sys.exit(report(goals, [PROBE_LINE] if args.probe else []))


if __name__ == "__main__":
    main()
