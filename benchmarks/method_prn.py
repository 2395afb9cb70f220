"""PatchRefineNet versus its base model, a ground-truth-only refiner and the oracle.

Per task and seed: one full prn run (base, pseudo-labels, refiner), then a refiner trained on
the ground truth only (pseudo_weight 0) on top of the *same* base (loaded from the first run;
with `--set method.prn.cross_fit=true`, the same seeded bases trained again, since the refiner's
training inputs come from the fold bases).
Test-split foreground IoU (×100), mean ± std over seeds:
- base: the base model at threshold 0.5;
- refiner (GT only) / PRN: the refined prediction (the GT-only refiner has no pseudo-label
  loss and no threshold heads, whose loss is built from the patch optima);
- oracle: the base probabilities binarized at each patch's optimal threshold, found with the
  test ground truth (the upper bound PRN's pseudo-labels aim at), smallest patch size.
Tasks: the built-in `varying_contrast` set and the MRI brain (ch2 + ch2bet; needs
mricron-data). In-process runs (no Ray): this compares methods, not infrastructure.

Goal: PRN's mean fg IoU is above the base's on every task that ran, and on mri-brain by at
least 2 points (x100); exit 1 if missed. Information, not a goal: whether the GT-only refiner
(no pseudo-labels) is below PRN.

    python benchmarks/method_prn.py [--seeds 0 1 2] [--base-epochs 6] [--epochs 6]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import check, control_note, make_mri_brain, need_mricron, report

from raysegbg.config import load_config
from raysegbg.data.loader import SegDataset, eval_batches
from raysegbg.data.synthetic import make_dataset
from raysegbg.inference import load_run
from raysegbg.local import train_local
from raysegbg.methods.patch_thresholds import foreground_iou, patch_pseudo_labels, threshold_grid
from raysegbg.methods.prn.labels import head_name

TASKS = ("contrast", "mri-brain")
GT_ONLY = "refiner (GT only)"
VARIANTS = ["base", GT_ONLY, "PRN", "oracle"]


@torch.no_grad()
def test_iou(run_dir: Path, split: str = "test") -> dict[str, float]:
    """Foreground IoU of the base, the refined prediction and the patch oracle."""
    cfg, meta, method, _ = load_run(run_dir, "last")
    patch = min(cfg.method.prn.patch_sizes)
    grid = threshold_grid(cfg.method.prn.thresholds)
    heads = [f"head {head_name(h)}" for h in method.all_heads]
    counts = {k: [0, 0] for k in ("base", "refined", "oracle", *heads)}
    for batch in eval_batches(SegDataset(cfg.data.path, split), cfg.train.val_batch_size):
        valid, fg = batch.masks != meta.ignore_index, batch.masks == 1
        prob = method.base_probability(batch.images)[:, 0]
        oracle, _ = patch_pseudo_labels(prob, fg, valid, patch, grid)
        logits, _ = method.refiner_logits(batch.images)  # what predict() reads, once
        refined = method.combine(logits, method.inference_head)[:, 0] > 0.5
        per_head = [v[:, 0] >= 0 for v in logits.values()]
        preds = [("base", prob >= 0.5), ("refined", refined), ("oracle", oracle),
                 *zip(heads, per_head, strict=True)]  # fmt: skip
        for name, pred in preds:
            inter, union = foreground_iou(pred, fg, valid)
            counts[name][0] += inter
            counts[name][1] += union
    return {k: i / max(u, 1) for k, (i, u) in counts.items()}


def one_seed(common: list[str], seed: int, root: Path) -> dict[str, float]:
    def train(name: str, extra: list[str]) -> Path:
        run = [f"train.seed={seed}", f"logging.storage_path={root}", f"logging.name={name}"]
        cfg = load_config(None, [*common, *extra, *run])
        train_local(cfg, root / name, log=lambda line: None)
        return root / name

    full = test_iou(train(f"prn-{seed}", []))
    control = ["method.prn.pseudo_weight=0", "method.prn.gt_weight=1",
               "method.prn.threshold_heads=false"]  # fmt: skip
    if not load_config(None, common).method.prn.cross_fit:  # else: the same bases, retrained
        control.append(f"method.prn.base_checkpoint={root / f'prn-{seed}'}")
    gt_only = test_iou(train(f"gt-{seed}", control))
    assert abs(gt_only["base"] - full["base"]) < 1e-9, "the GT-only refiner must share the base"
    heads = "  ".join(f"{k} {v:.4f}" for k, v in full.items() if k.startswith("head"))
    print(f"  PRN heads alone: {heads}", flush=True)
    return {"base": full["base"], GT_ONLY: gt_only["refined"], "PRN": full["refined"],
            "oracle": full["oracle"]}  # fmt: skip


def goals(rows: list[tuple[str, dict[str, list[float]]]]) -> int:
    """Print the goal's lines per task and the GT-only control's; return the exit code."""
    found, notes = [], []
    for task, values in rows:
        m = {v: statistics.mean(x) for v, x in values.items()}
        found.append(check(f"{task}: PRN fg IoU > base", m["PRN"], m["base"], strict=True))
        if task == "mri-brain":
            found.append(check("mri-brain: PRN fg IoU >= base + 2", m["PRN"], m["base"] + 2))
        shown = f"{GT_ONLY} fg IoU {m[GT_ONLY]:.2f} vs PRN {m['PRN']:.2f}"
        notes.append(control_note(task, m[GT_ONLY] < m["PRN"], shown))
    if "mri-brain" not in {task for task, _ in rows}:
        notes.insert(0, "goal not evaluated: mri-brain PRN fg IoU >= base + 2 (did not run)")
    return report(found, notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--base-epochs", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=6, help="refiner epochs")
    parser.add_argument("--steps", type=int, default=30, help="steps per epoch")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--n", type=int, default=600, help="images in the synthetic set")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--set", nargs="*", default=[], help="extra config overrides")
    args = parser.parse_args()
    need_mricron(args.tasks)
    common = ["method.name=prn", "model.encoder_depth=4", "model.decoder_channels=[64,32,16,16]",
              f"method.prn.base_epochs={args.base_epochs}", f"train.epochs={args.epochs}",
              "train.batch_size=16", f"train.steps_per_epoch={args.steps}",
              f"data.crop_size={args.size}", "logging.image_every=1000", *args.set]  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        if "contrast" in args.tasks:
            make_dataset("varying_contrast", Path(tmp) / "vc", n=args.n, size=args.size, seed=0)
            paths["contrast"] = Path(tmp) / "vc"
        if "mri-brain" in args.tasks:
            paths["mri-brain"] = make_mri_brain(Path(tmp) / "brain", args.size)
        for task, path in paths.items():
            values: dict[str, list[float]] = {v: [] for v in VARIANTS}
            for seed in args.seeds:
                start = time.perf_counter()
                root = Path(tmp) / f"runs-{task}"
                got = one_seed([*common, f"data.path={path}"], seed, root)
                for v in VARIANTS:
                    values[v].append(100 * got[v])
                shown = "  ".join(f"{v} {got[v]:.4f}" for v in VARIANTS)
                print(f"{task:<10} seed {seed}  {shown}  ({time.perf_counter() - start:.0f} s)",
                      flush=True)  # fmt: skip
            rows.append((task, values))
    print(f"\nseeds {args.seeds}; base {args.base_epochs} + refiner {args.epochs} epochs x "
          f"{args.steps} steps; test split foreground IoU x100\n")  # fmt: skip
    print(f"{'task':<12}{'variant':<20}{'fg IoU (mean ± std)':>22}{'vs base':>10}")
    for task, values in rows:
        base = statistics.mean(values["base"])
        for v in VARIANTS:
            mean = statistics.mean(values[v])
            std = statistics.stdev(values[v]) if len(values[v]) > 1 else 0.0
            print(f"{task:<12}{v:<20}{mean:>13.2f} ± {std:<6.2f}{mean - base:>+10.2f}")
    sys.exit(goals(rows))


if __name__ == "__main__":
    main()
