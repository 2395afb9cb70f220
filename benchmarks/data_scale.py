"""Data at scale: memory per training worker and loader throughput as the dataset grows.

Datasets of 1k, 10k and 50k images of 256 px: the 1k set is generated (`hetero_bg`), the
bigger ones repeat its training rows under new ids (same PNG sizes and decoding work, written
through the dataset format's own shard writer, so the row groups are what `data make` writes).
Each measurement is a fresh process that reads `--steps` batches of `--batch` augmented 224 px
crops of the training split, as a training worker's loader does, with 0, 2 and 4 background
processes (`data.workers`). Memory is the peak of the process tree's proportional set size
(PSS: pages shared between the loader and its forked helpers counted once), sampled every
20 ms. The consumption rate is that of a ResNet-18 U-Net training step (batch `--batch`,
224 px, AdamW) on this machine's CPU.

Goals (exit 1 if missed): with `data.reader=stream`, peak memory at 50k within 20 % of that at
1k for every number of background processes; the loader (0 background processes, the
default) at least 5 x the consumption rate at every size.

`--ray-data` adds the alternative the loader was chosen against: Ray Data streaming the same
shards (`read_parquet` -> `map_batches` decoding and augmenting -> `iter_torch_batches` with a
local shuffle buffer), background processes being Ray's own.

    python benchmarks/data_scale.py [--sizes 1000,10000,50000] [--steps 60] [--batch 8]
                                    [--ray-data]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import check, report

CROP = 224


def make_sets(root: Path, sizes: list[int]) -> dict[int, Path]:
    from raysegbg.data import format as fmt
    from raysegbg.data.synthetic import make_dataset

    base = root / f"n{sizes[0]}"
    start = time.perf_counter()
    make_dataset("hetero_bg", base, n=sizes[0], size=256, seed=0)
    print(f"generated {sizes[0]} images of 256 px in {time.perf_counter() - start:.0f} s")
    meta = fmt.read_meta(base)
    train = fmt.read_split(base, "train")
    rows = list(
        zip(
            train["id"].to_pylist(),
            train["image"].to_pylist(),
            train["mask"].to_pylist(),
            train["image_labels"].to_pylist(),
            strict=True,
        )
    )
    out = {sizes[0]: base}
    for n in sizes[1:]:
        folder = root / f"n{n}"
        folder.mkdir()
        copies = [
            fmt._Row(f"{image_id}_c{k}", "train", image, mask, labels, (256, 256))
            for k in range(-(-n // len(rows)))
            for image_id, image, mask, labels in rows
        ]
        shards = fmt._write_shards(copies[:n], folder, 512)
        for name in meta.shards:
            if not name.startswith("train-"):
                (folder / name).write_bytes((base / name).read_bytes())
        shards += [s for s in meta.shards if not s.startswith("train-")]
        splits = {**meta.splits, "train": n}
        new = dataclasses.replace(meta, shards=tuple(shards), splits=splits,
                                  labeled={**meta.labeled, "train": n})  # fmt: skip
        new.to_json(folder / fmt.META_FILE)
        out[n] = folder
        print(f"wrote {n} training rows to {folder}")
    return out


def _pss(pid: int) -> int:
    """Proportional set size of a process in bytes (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _tree(pid: int) -> list[int]:
    out = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return out
    for child in children:
        out += _tree(int(child))
    return out


def measure(path: Path, reader: str, workers: int, steps: int, batch: int) -> dict:
    """In this (fresh) process: the loader's images/s and the tree's peak PSS."""
    import torch

    from raysegbg.config import load_config
    from raysegbg.data.loader import SegDataset, StreamLoader, TrainLoader

    torch.set_num_threads(1)
    peak, done = _sampler()
    cfg = load_config(None, [f"data.path={path}", "data.augment=true", f"data.crop_size={CROP}",
                             f"data.reader={reader}", f"data.workers={workers}"])  # fmt: skip
    data = SegDataset(path, "train", reader=reader, cache=cfg.data.cache)
    train = TrainLoader(data, cfg.data, batch, steps + 10, seed=0)
    loader = StreamLoader(train, None, workers, cfg.data.prefetch)
    rate = _rate(iter(loader.epoch(0)), steps, batch)
    done.set()
    time.sleep(0.05)
    return {"images_per_s": rate, "peak_mb": peak[0] / 2**20}


def _rate(batches, steps: int, batch: int) -> float:
    """Images/s over `steps` batches, after 10 of warm-up (helpers start, first reads)."""
    for _ in range(10):
        next(batches)
    start = time.perf_counter()
    for _ in range(steps):
        next(batches)
    return steps * batch / (time.perf_counter() - start)


def measure_ray_data(path: Path, steps: int, batch: int) -> dict:
    """The alternative: Ray Data streaming the same shards (decode and the same augmentation
    in `map_batches` tasks, a local shuffle buffer), on a private local Ray of 2 CPUs. The
    process tree's PSS then includes Ray's own processes and its object store."""
    import numpy as np
    import ray
    import torch

    from raysegbg.config import load_config
    from raysegbg.data.augment import augment
    from raysegbg.data.format import decode_png, split_shards
    from raysegbg.data.loader import PIXEL_SCALE

    cfg = load_config(None, ["data.augment=true", f"data.crop_size={CROP}"])
    peak, done = _sampler()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)

    def prepare(rows: dict) -> dict:
        images, masks = [], []
        for k, (image, mask) in enumerate(zip(rows["image"], rows["mask"], strict=True)):
            pixels = torch.from_numpy(np.array(decode_png(image))).permute(2, 0, 1).float()
            target = torch.from_numpy(np.array(decode_png(mask))).long()
            gen = torch.Generator().manual_seed(k)
            pixels, target = augment(pixels / PIXEL_SCALE - 1, target, cfg.data, gen, 255)
            images.append(pixels.numpy())
            masks.append(target.numpy())
        return {"image": np.stack(images), "mask": np.stack(masks)}

    files = [str(f) for f in split_shards(path, "train")]
    data = ray.data.read_parquet(files, columns=["image", "mask"]).map_batches(prepare)
    batches = iter(data.iter_torch_batches(batch_size=batch, local_shuffle_buffer_size=64))
    rate = _rate(batches, steps, batch)
    done.set()
    ray.shutdown()
    return {"images_per_s": rate, "peak_mb": peak[0] / 2**20}


def _sampler() -> tuple[list[int], threading.Event]:
    """Samples the PSS of this process and its descendants every 20 ms: (peak, stop)."""
    peak = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], sum(_pss(p) for p in _tree(os.getpid())))
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    return peak, done


def consumption(batch: int) -> float:
    """Images/s of a ResNet-18 U-Net training step (AdamW) on this machine's CPU."""
    import torch

    from raysegbg.config import load_config
    from raysegbg.methods.losses import cross_entropy
    from raysegbg.models import build_model

    cfg = load_config(None, [])
    model = build_model(cfg.model, 3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images, masks = torch.randn(batch, 3, CROP, CROP), torch.randint(0, 2, (batch, CROP, CROP))
    times = []
    for _ in range(6):
        start = time.perf_counter()
        loss = cross_entropy(model(images), masks, 255)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return batch / min(times[2:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,50000")
    parser.add_argument("--workers", default="0,2,4")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--ray-data", action="store_true", help="also measure Ray Data")
    parser.add_argument("--measure", nargs=3, help=argparse.SUPPRESS)  # path reader workers
    args = parser.parse_args()
    if args.measure:
        path, reader, workers = args.measure
        if reader == "ray_data":
            result = measure_ray_data(Path(path), args.steps, args.batch)
        else:
            result = measure(Path(path), reader, int(workers), args.steps, args.batch)
        print(json.dumps(result))
        return 0

    sizes = [int(s) for s in args.sizes.split(",")]
    workers = [int(w) for w in args.workers.split(",")]
    eat = consumption(args.batch)
    print(f"ResNet-18 U-Net training step: {eat:.1f} images/s (batch {args.batch}, {CROP} px)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="data_scale_") as tmp:
        sets = make_sets(Path(tmp), sizes)
        cases = [("stream", n, w) for n in sizes for w in workers]
        cases += [("memory", n, 0) for n in sizes[:2]]  # what holding the split in memory costs
        if args.ray_data:
            cases += [("ray_data", n, 0) for n in (sizes[0], sizes[-1])]
        for reader, n, w in cases:
            cmd = [sys.executable, __file__, "--steps", str(args.steps), "--batch",
                   str(args.batch), "--measure", str(sets[n]), reader, str(w)]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append((reader, n, w, result))
            print(f"{reader:6} {n:>6} images, {w} background: {result['images_per_s']:7.1f} "
                  f"images/s, peak {result['peak_mb']:6.0f} MB", flush=True)  # fmt: skip

    print("\n| reader | images | background processes | loader images/s | x consumption "
          "| peak PSS MB |\n|---|---:|---:|---:|---:|---:|")  # fmt: skip
    for reader, n, w, r in rows:
        print(f"| {reader} | {n} | {w} | {r['images_per_s']:.1f} | "
              f"{r['images_per_s'] / eat:.1f} | {r['peak_mb']:.0f} |")  # fmt: skip
    stream = {(n, w): r for reader, n, w, r in rows if reader == "stream"}
    goals = []
    for w in workers:
        small, big = stream[(sizes[0], w)]["peak_mb"], stream[(sizes[-1], w)]["peak_mb"]
        goals.append(check(f"stream, {w} background: peak memory {sizes[-1]} / {sizes[0]} "
                           "images <= 1.2", big / small, 1.2, lower=True))  # fmt: skip
    for n in sizes:
        goals.append(check(f"stream, no background, {n} images: loader / consumption >= 5",
                           stream[(n, 0)]["images_per_s"] / eat, 5.0))  # fmt: skip
    return report(goals, [f"consumption: {eat:.1f} images/s"])


if __name__ == "__main__":
    sys.exit(main())
