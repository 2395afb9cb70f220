"""fbr versus its CAM baseline, trained from image-level labels only.

Same networks, data, schedule and seeds in every variant; only the contrastive terms change:

- cam: classification (+ the background head) only (`nroi_weight=0`, `intra_weight=0`);
- intra: + the intra-foreground contrast (`nroi_weight=0`);
- fbr: + the pixel-to-NROI contrast (the full method).

Every run chooses its CAM threshold on the validation split (`cam_threshold=0`), then trains
the segmentation network on its pseudo masks. Columns (mean ± std over seeds, ×100):
the CAM classifier's image-label F1 on validation (which classes it finds in an image: CAMs
cannot localise a class the classifier misses); pseudo-mask mIoU on the training images
(against their masks, never used for training); the false-positive rate inside the
co-occurring background (the share of background pixels of a class's own texture, e.g. water
under a boat, or of the head around the brain, that the pseudo masks call foreground); the
segmentation network's mIoU on validation and, once, on the test split.

Tasks: the built-in `contexts` set and two real ones (they need mricron-data) from its ch2
head MRI, axial slices, image-level labels derived from the masks:
- mri-brain: the brain (ch2bet) inside the skull, scalp and neck that always surround it, the
  background the product is about; slices of head without brain included (17 % of the
  training slices: the classifier's negatives). One foreground class: the intra-foreground
  contrast has no other class to push from, so `intra` trains exactly what `cam` does. Slabs
  of 8 slices: with 16, validation was one slab, the bottom 15 slices (neck, the brain a
  sliver), every run chose the grid's top threshold there (0.95) and the pseudo masks of the
  whole head suffered; with 8 it holds two slabs of the upper brain, as the test split does;
- mri-lobes: AAL grouped into 7 lobes, all from one head. Which lobes a slice holds is a
  function of its height, and every part of the slice tells the height. A control row,
  `cam/outline`, trains the CAM classifier on the head's filled outline instead of the MRI
  (the same slices, labels and splits; nothing inside the head visible): when it finds the
  labels within 5 F1 points of the MRI classifier, the labels carry no information about where
  the lobes are, nothing leads a CAM to them, and the task's goals are printed but not
  checked (the line says so). Every variant has stayed near the all-background level
  there, with tiles of each slice and with coordinate channels too (seed 0 probes).

Settings chosen on validation: `--grid KEY=V1,V2,...` trains every value for the variants
that do not fix KEY (e.g. `method.fbr.nroi_weight` for fbr only), over all seeds, and keeps the
value with the best mean validation mIoU; only the kept runs are then scored on the test split
(read once).

Goals, per task: fbr's mean test mIoU and mean pseudo-mask mIoU above the CAM baseline's
(mri-lobes: only when its labels are not found from the outline alone, above). Exit 1 if one
is missed.

    python benchmarks/method_fbr.py [--seeds 0 1 2] [--cam-epochs 8] [--epochs 4]
        [--grid method.fbr.nroi_weight=0.02,0.05,0.2] [--probe]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import (
    PROBE_HELP,
    PROBE_LINE,
    cell,
    check,
    finite_mean,
    make_mri_brain,
    make_mri_lobes,
    need_mricron,
    report,
)
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from raysegbg.config import load_config
from raysegbg.data.loader import SegDataset
from raysegbg.data.synthetic import context_maps, make_dataset
from raysegbg.inference import evaluate_run
from raysegbg.local import train_local
from raysegbg.state.store import PseudoLabelStore

TASKS = ("contexts", "mri-brain", "mri-lobes")
OUTLINE_MARGIN = 5.0  # F1 points: within this, the labels are found from the outline alone
VARIANTS = {
    "cam": ["method.fbr.nroi_weight=0", "method.fbr.intra_weight=0"],
    "intra": ["method.fbr.nroi_weight=0"],
    "fbr": [],
}


def pseudo_scalars(run: Path) -> dict[str, float]:
    """The pseudo masks' mIoU and CAM threshold, and the CAM classifier's image-label F1 on
    validation at the end of the CAM stage (NaN for a run that reused another run's CAM stage,
    as the runs of a `--grid` over a segmentation-only setting do: the F1 column averages the
    runs that trained theirs)."""
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    logged = set(acc.Tags()["scalars"])
    tags = ("pseudo/miou", "pseudo/threshold", "fbr/val_label_f1")
    return {t: acc.Scalars(t)[-1].value if t in logged else float("nan") for t in tags}


def context_fp(run: Path, maps: dict[str, np.ndarray]) -> float:
    """Share of co-occurring background pixels (a class's own texture) the pseudo masks call
    foreground, over every training image."""
    store = PseudoLabelStore.load(run / "state" / "labels")
    hit = total = 0
    for key in store.ids():
        context = maps[key.rsplit("@", 1)[0]] > 0
        mask = store.get([key])[0].mask
        hit += int((mask[context] > 0).sum())
        total += int(context.sum())
    return hit / max(total, 1)


def head_maps(path: Path) -> dict[str, np.ndarray]:
    """mri-brain: id -> its co-occurring background, every training image's head around the
    brain (brighter than the air, which the import scales to -1, and not brain)."""
    data, maps = SegDataset(path, "train"), {}
    for i, image_id in enumerate(data.ids):
        image, mask = data[i]
        maps[image_id] = ((image[0] > -0.8) & (mask == 0)).numpy()
    return maps


def train_and_score(overrides: list[str], seed: int, root: Path, maps) -> dict[str, float]:
    name = f"r{len(list(root.iterdir()))}"
    cfg = load_config(None, [*overrides, f"train.seed={seed}", f"logging.storage_path={root}",
                             f"logging.name={name}"])  # fmt: skip
    train_local(cfg, root / name, log=lambda line: None)
    out = pseudo_scalars(root / name)
    out["context_fp"] = context_fp(root / name, maps) if maps else float("nan")
    out["val"] = evaluate_run(root / name, "val", "last")["miou"]
    out["test"], out["run"] = float("nan"), root / name  # test: scored later, kept runs only
    return out


def grid_values(grids: list[str], overrides: list[str]) -> list[list[str]]:
    """The settings a variant tries: every value of each grid key it does not fix itself."""
    options = [[]]
    for grid in grids:
        key, _, values = grid.partition("=")
        if any(o.startswith(f"{key}=") for o in overrides):
            continue
        options = [[*o, f"{key}={v}"] for o in options for v in values.split(",")]
    return options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cam-epochs", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=4, help="segmentation epochs")
    parser.add_argument("--steps", type=int, default=15, help="steps per epoch")
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--n", type=int, default=600, help="images of the built-in set")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--set", nargs="*", default=[], help="extra config overrides")
    parser.add_argument(
        "--grid",
        nargs="*",
        default=[],
        metavar="KEY=V1,V2",
        help="values chosen on validation (best mean val mIoU over the seeds)",
    )
    parser.add_argument("--probe", action="store_true", help=PROBE_HELP)
    args = parser.parse_args()
    need_mricron(args.tasks)
    common = ["method.name=fbr", "model.encoder_depth=3", "model.decoder_channels=[32,16,8]",
              "optim.lr=3e-3", f"method.fbr.cam_epochs={args.cam_epochs}",
              f"train.epochs={args.epochs}", "train.batch_size=16",
              f"train.steps_per_epoch={args.steps}", f"data.crop_size={args.size}",
              "logging.image_every=1000", *args.set]  # fmt: skip
    goals, lines, notes = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        tasks = {}
        if "contexts" in args.tasks:
            out = Path(tmp) / "contexts"
            make_dataset("contexts", out, n=args.n, size=args.size, seed=0)
            tasks["contexts"] = (out, context_maps("contexts", args.n, args.size, seed=0))
        if "mri-brain" in args.tasks:
            brain = make_mri_brain(Path(tmp) / "brain", args.size, min_foreground=0.0, slab=8)
            tasks["mri-brain"] = (brain, head_maps(brain))
        if "mri-lobes" in args.tasks:
            lobes = make_mri_lobes(Path(tmp) / "mri", args.size)
            outline = make_mri_lobes(Path(tmp) / "outline", args.size, silhouette=True)
            for split in ("train", "val"):  # the control sees the same slices and labels
                assert SegDataset(outline, split).ids == SegDataset(lobes, split).ids
            tasks["mri-lobes"] = (lobes, None)
        for task, (data, maps) in tasks.items():
            root = Path(tmp) / f"runs-{task}"
            root.mkdir()
            results: dict[str, list[dict[str, float]]] = {}
            chosen: dict[str, str] = {}
            for variant, overrides in VARIANTS.items():
                tried = {}
                for option in grid_values(args.grid, overrides):
                    runs = []
                    for seed in args.seeds:
                        start = time.perf_counter()
                        r = train_and_score([*common, f"data.path={data}", *overrides, *option],
                                            seed, root, maps)  # fmt: skip
                        runs.append(r)
                        print(f"{task:<10} {variant:<6} {' '.join(option)} seed {seed}  "
                              f"label F1 {r['fbr/val_label_f1']:.4f}  "
                              f"pseudo {r['pseudo/miou']:.4f} (t {r['pseudo/threshold']:.2f})  "
                              f"context fp {r['context_fp']:.4f}  val {r['val']:.4f}  "
                              f"({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
                    tried[" ".join(option)] = runs
                best = max(tried, key=lambda o: finite_mean([r["val"] for r in tried[o]]))
                chosen[variant], results[variant] = best, tried[best]
                for r in results[variant]:  # the test split, read once: the kept runs only
                    if not args.probe:
                        r["test"] = evaluate_run(r["run"], "test", "last")["miou"]
            if task == "mri-lobes":  # the control: the CAM classifier on the outline alone
                results["cam/outline"], chosen["cam/outline"] = [], chosen["cam"]
                option = chosen["cam"].split()
                for seed in args.seeds:
                    r = train_and_score([*common, f"data.path={outline}", *VARIANTS["cam"],
                                         *option], seed, root, maps)  # fmt: skip
                    results["cam/outline"].append(r)
                    print(f"{task:<10} cam/outline seed {seed}  "
                          f"label F1 {r['fbr/val_label_f1']:.4f}", flush=True)  # fmt: skip
            for variant, runs in results.items():
                cols = "".join(cell([r[k] for r in runs])
                               for k in ("fbr/val_label_f1", "pseudo/miou", "context_fp", "val",
                                         "test"))  # fmt: skip
                thresholds = "/".join(f"{r['pseudo/threshold']:.2f}" for r in runs)
                lines.append(f"{task:<11}{variant:<12}{cols}   {thresholds}   {chosen[variant]}")
            if args.probe:
                continue
            m = {v: {k: finite_mean([r[k] for r in runs]) * 100
                     for k in ("pseudo/miou", "test", "fbr/val_label_f1")}
                 for v, runs in results.items()}  # fmt: skip
            task_goals = [
                check(f"{task}: fbr test mIoU > CAM baseline", m["fbr"]["test"],
                      m["cam"]["test"], strict=True),
                check(f"{task}: fbr pseudo-mask mIoU > CAM baseline", m["fbr"]["pseudo/miou"],
                      m["cam"]["pseudo/miou"], strict=True),
            ]  # fmt: skip
            if "cam/outline" in m:
                seen = m["cam"]["fbr/val_label_f1"]
                outline_f1 = m["cam/outline"]["fbr/val_label_f1"]
                if outline_f1 >= seen - OUTLINE_MARGIN:
                    notes.append(
                        f"{task}: not checked: the CAM classifier on the head's outline alone "
                        f"finds the labels within {OUTLINE_MARGIN:g} points of the one on the MRI, "
                        f"or better (val label F1 {outline_f1:.2f} vs {seen:.2f}), so they do "
                        "not say where the lobes are: "
                        + "; ".join(g.line() for g in task_goals)
                    )  # fmt: skip
                    continue
            goals += task_goals
    print(f"\nseeds {args.seeds}; CAM {args.cam_epochs} + segmentation {args.epochs} epochs x "
          f"{args.steps} steps; {args.size} px; extra {args.set}\n")  # fmt: skip
    head = (f"{'task':<11}{'variant':<12}{'label F1':>15}{'pseudo mIoU':>15}{'context FP':>15}"
            f"{'val mIoU':>15}{'test mIoU':>15}   CAM threshold per seed   "
            "setting (chosen on val)")  # fmt: skip
    print(head + "\n" + "-" * len(head) + "\n" + "\n".join(lines))
    sys.exit(report(goals, [PROBE_LINE] if args.probe else notes))


if __name__ == "__main__":
    main()
