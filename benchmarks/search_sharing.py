"""A prn search with stage results shared between trials versus the same search without.

An 8-trial grid (`raysegbg tune --grid`) over the refiner's patch sizes and loss weights with
one base setting, run twice on a local Ray, in one run of this script: `train.reuse_stages=true`
(the trials share one trained base through the search's stage-results actor) and `false` (every
trial trains its own). prn: base 10 epochs (its default), refiner 3 epochs, on the built-in
`varying_contrast` set (64 px), 1 CPU per trial, 2 trials at a time, no early stopping.
Compute is the sum over all trials of every epoch's time (`perf/epoch_s` in each trial's
TensorBoard), split by stage (base, pseudo-labels, refine); wall is each search's duration.

Goals (exit 1 if missed): total trial compute with sharing <= 0.45 x without; every trial's
final validation mIoU identical in both searches (same settings, same seeds).

    python benchmarks/search_sharing.py [--base-epochs 10] [--epochs 3] [--steps 20]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from common import check, report
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from raysegbg.data.synthetic import make_dataset
from raysegbg.tune import SearchOptions, run_search

SPACE = """description: prn refiner settings, one base
params:
  method.prn.patch_sizes: {type: categorical, choices: ["[8]", "[16]", "[8, 16]", "[4, 8]"]}
  method.prn.pseudo_weight: {type: categorical, choices: [0.5, 0.8]}
"""
STAGES = ("base", "pseudo-labels", "refine")


def stage_seconds(run: Path, base_epochs: int) -> dict[str, float]:
    """Seconds per stage of one trial's run, from its TensorBoard `perf/epoch_s`."""
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    out = dict.fromkeys(STAGES, 0.0)
    for event in acc.Scalars("perf/epoch_s"):
        stage = 0 if event.step <= base_epochs else 1 if event.step == base_epochs + 1 else 2
        out[STAGES[stage]] += event.value
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-epochs", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=3, help="refiner epochs")
    parser.add_argument("--steps", type=int, default=20, help="steps per epoch")
    parser.add_argument("--n", type=int, default=300, help="images in the synthetic set")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="search_sharing_") as tmp:
        data = Path(tmp) / "vc"
        make_dataset("varying_contrast", data, n=args.n, size=64, seed=0)
        space = Path(tmp) / "space.yaml"
        space.write_text(SPACE)
        for reuse in (True, False):
            root = Path(tmp) / f"runs-{'shared' if reuse else 'alone'}"
            overrides = [
                f"data.path={data}", "method.name=prn", "data.crop_size=64",
                "model.encoder_depth=4", "model.decoder_channels=[64,32,16,16]",
                f"method.prn.base_epochs={args.base_epochs}", f"train.epochs={args.epochs}",
                "train.batch_size=16", f"train.steps_per_epoch={args.steps}",
                "scaling.workers=1", "logging.image_every=1000", f"logging.storage_path={root}",
                f"train.reuse_stages={str(reuse).lower()}",
            ]  # fmt: skip
            opts = SearchOptions(
                space=str(space), overrides=overrides, samples=8, grid=True, max_concurrent=2,
                scheduler="none", name="s", address="local",
            )  # fmt: skip
            start = time.perf_counter()
            found = run_search(opts)
            wall = time.perf_counter() - start
            trials = {}
            for row in found.rows:
                key = (row.params["method.prn.patch_sizes"], row.params["method.prn.pseudo_weight"])
                seconds = stage_seconds(Path(found.search_dir) / row.name, args.base_epochs)
                trials[key] = (row.metric, seconds, row.status)
            results[reuse] = (wall, trials)
            total = sum(sum(s.values()) for _, s, _ in trials.values())
            print(f"reuse_stages={reuse}: {len(trials)} trials, wall {wall:.0f} s, "
                  f"compute {total:.0f} s", flush=True)  # fmt: skip

    print("\n| search | trials | wall s | compute s | base | pseudo-labels | refine |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    totals = {}
    for reuse, (wall, trials) in results.items():
        by_stage = {s: sum(t[1][s] for t in trials.values()) for s in STAGES}
        totals[reuse] = sum(by_stage.values())
        shares = " | ".join(f"{by_stage[s]:.0f} s ({100 * by_stage[s] / totals[reuse]:.0f} %)"
                            for s in STAGES)  # fmt: skip
        label = "shared stages" if reuse else "no sharing"
        print(f"| {label} | {len(trials)} | {wall:.0f} | {totals[reuse]:.0f} | {shares} |")
    print(
        "\n| patch sizes | pseudo weight | val mIoU shared | val mIoU alone |\n|---|---:|---:|---:|"
    )
    shared, alone = results[True][1], results[False][1]
    same = 0
    for key in sorted(alone):
        a, b = shared.get(key, (float("nan"),))[0], alone[key][0]
        same += a == b
        print(f"| {key[0]} | {key[1]} | {a:.6f} | {b:.6f} |")
    goals = [
        check(
            "compute with sharing / without <= 0.45", totals[True] / totals[False], 0.45, lower=True
        ),  # fmt: skip
        check("trials with identical val mIoU (of 8)", same, 8, digits=0),
    ]
    return report(goals)


if __name__ == "__main__":
    sys.exit(main())
