"""Training throughput: a plain torch loop versus the same work through raysegbg on Ray Train.

Same model (smp U-Net, ResNet-18 encoder), same global batch, same data and augmentation,
same number of torch threads. Images/s are measured over the training steps of every epoch
after the first (warm-up: page faults, PNG decoding into the cache).

This machine's speed drifts by up to ~15 % within minutes (a shared VM: two plain loops a
minute apart measured 71.9 and 84.6 images/s), more than the overhead being measured. So the
runs alternate, plain / Ray / plain / Ray / ... / plain, over `--rounds` rounds; each Ray run
is compared with the mean of the plain loops just before and just after it, and the goal is
on the median of those ratios.

Goal: images/s through Ray at least 0.97 x the plain loop's (median ratio ray / plain >=
0.97); exit 1 if missed.

    python benchmarks/train_overhead.py [--epochs 4] [--n 600] [--batch 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from common import check, report

from raysegbg.config import load_config
from raysegbg.data.loader import SegDataset, TrainLoader
from raysegbg.data.synthetic import make_dataset
from raysegbg.methods.losses import cross_entropy, soft_dice
from raysegbg.models import build_model


def plain_loop(cfg, threads: int) -> list[float]:
    """The reference: a hand-written torch loop, images/s per epoch."""
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.train.seed)
    ds = SegDataset(cfg.data.path, "train")
    steps = len(ds) // cfg.train.batch_size
    loader = TrainLoader(ds, cfg.data, cfg.train.batch_size, steps, cfg.train.seed)
    model = build_model(cfg.model, ds.meta.channels, ds.meta.num_classes)
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.optim.lr, weight_decay=1e-4
    )
    model.train()
    rates = []
    for epoch in range(cfg.train.epochs):
        start = time.perf_counter()
        for batch in loader.epoch(epoch):
            logits = model(batch.images)
            loss = cross_entropy(logits, batch.masks, 255) + 0.5 * soft_dice(
                logits, batch.masks, 255
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        rates.append(steps * cfg.train.batch_size / (time.perf_counter() - start))
    return rates


def ray_loop(cfg) -> list[float]:
    """The same run through `raysegbg train` (1 Ray Train worker, all CPUs)."""
    import ray
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from raysegbg.ray_train import fit

    result = fit(cfg)
    ray.shutdown()  # Ray's own processes must not slow the plain loop that follows
    events = EventAccumulator(str(result.run_dir / "tb"))
    events.Reload()
    return [e.value for e in events.Scalars("perf/images_per_s")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--n", type=int, default=600, help="dataset size (80%% train)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="Ray runs, each between two plain")
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        make_dataset("hetero_bg", data, n=args.n, size=args.size, seed=0)
        cfg = load_config(
            "configs/quickstart.yaml",
            [
                f"data.path={data}",
                f"train.epochs={args.epochs}",
                f"train.batch_size={args.batch}",
                "scaling.workers=1",
                f"logging.storage_path={tmp}/runs",
                "logging.name=bench",
                f"logging.image_every={args.epochs}",
            ],
        )
        plain = [statistics.mean(plain_loop(cfg, threads)[1:])]
        through_ray = []
        for i in range(args.rounds):
            round_cfg = replace(cfg, logging=replace(cfg.logging, name=f"bench{i}"))
            through_ray.append(statistics.mean(ray_loop(round_cfg)[1:]))
            plain.append(statistics.mean(plain_loop(cfg, threads)[1:]))
    ratios = [r / ((a + b) / 2) for r, a, b in zip(through_ray, plain, plain[1:], strict=False)]
    ratio = statistics.median(ratios)
    print()
    print(f"{'round':<8}{'plain before':>14}{'Ray':>10}{'plain after':>14}{'ratio':>8}")
    for i, r in enumerate(ratios):
        print(f"{i:<8}{plain[i]:>14.1f}{through_ray[i]:>10.1f}{plain[i + 1]:>14.1f}{r:>8.3f}")
    print(f"{'median ratio ray / plain':<46}{ratio:>8.3f}   (goal >= 0.97)")
    print(f"images/s over epochs 2-{args.epochs}; threads {threads}, batch {args.batch}, "
          f"{args.size}x{args.size}, {cfg.model.encoder}")  # fmt: skip
    sys.exit(report([check("median ratio ray / plain >= 0.97", ratio, 0.97, digits=3)]))


if __name__ == "__main__":
    main()
