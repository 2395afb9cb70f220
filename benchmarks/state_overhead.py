"""Shared-state overhead: training-step time with the actor-backed memory versus the same
memory kept in-process only, and pseudo-label store throughput through the actor.

    python benchmarks/state_overhead.py [--steps 60] [--every 10]

The model is the quickstart U-Net; each step also updates a class memory from the decoder's
pooled features (what MCIBI does). "actor-backed" additionally sends a snapshot to the run's
state actor every `--every` steps (fire and forget). The two variants alternate in rounds
(A B A B ...) so drift of the machine affects both alike.

Goal: the actor-backed step at most 3 % slower (ratio actor / in-process <= 1.03); exit 1 if
missed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import check, report

from raysegbg.config import load_config
from raysegbg.models import build_model
from raysegbg.state.client import StateClient
from raysegbg.state.memory import ClassMemory


class Step:
    def __init__(self, batch: int, size: int):
        cfg = load_config("configs/quickstart.yaml")
        torch.manual_seed(0)
        self.model = build_model(cfg.model, 3, 2)
        self.holder = torch.nn.Module()
        self.holder.memory = ClassMemory(2, 16)
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad])
        self.x = torch.randn(batch, 3, size, size)
        self.y = torch.randint(0, 2, (batch, size, size))

    def __call__(self) -> None:
        features = self.model.decoder(self.model.encoder(self.x))
        logits = self.model.segmentation_head(features)
        loss = torch.nn.functional.cross_entropy(logits, self.y)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        flat = features.detach().permute(0, 2, 3, 1).reshape(-1, features.shape[1])
        self.holder.memory.update_from(flat, self.y.reshape(-1), momentum=0.1)


def time_steps(step: Step, steps: int, client: StateClient | None, offset: int) -> float:
    start = time.perf_counter()
    for k in range(steps):
        step()
        if client is not None:
            client.after_step(offset + k + 1, step.holder)
    return (time.perf_counter() - start) / steps


def label_throughput(client: StateClient, n: int, batch: int, size: int) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    ids = [f"id{i}" for i in range(n)]
    masks = [rng.integers(0, 2, (size, size), dtype=np.uint8) for _ in range(n)]
    start = time.perf_counter()
    for i in range(0, n, batch):
        client.put_labels(ids[i : i + batch], masks[i : i + batch])
    client.flush()
    put = n / (time.perf_counter() - start)
    start = time.perf_counter()
    for i in range(0, n, batch):
        client.get_labels(ids[i : i + batch])
    return put, n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--every", type=int, default=10, help="snapshot interval (steps)")
    parser.add_argument("--labels", type=int, default=4000)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    from raysegbg.ray_train import init_ray
    from raysegbg.state import actor as state_actor

    init_ray(None)
    with tempfile.TemporaryDirectory() as tmp:
        actor = state_actor.create("bench", Path(tmp) / "state")
        client = StateClient(actor, every=args.every)
        step = Step(batch=16, size=64)
        time_steps(step, 5, None, 0)  # warm-up
        local, backed = [], []
        for r in range(args.rounds):
            local.append(time_steps(step, args.steps, None, 0))
            backed.append(time_steps(step, args.steps, client, r * args.steps))
        client.checkpoint(step.holder)
        put, get = label_throughput(client, args.labels, 100, 64)
        state_actor.destroy("bench")
    a, b = statistics.mean(local) * 1e3, statistics.mean(backed) * 1e3
    print()
    print(f"{'variant':<40}{'ms/step':>10}")
    print(f"{'in-process memory':<40}{a:>10.1f}")
    print(f"{f'actor-backed memory (snapshot every {args.every})':<40}{b:>10.1f}")
    print(f"{'ratio actor / in-process':<40}{b / a:>10.3f}   (goal <= 1.03)")
    print(f"{'snapshots skipped (previous in flight)':<40}{client.skipped:>10}")
    print(f"{'pseudo-label put, 64x64 masks/s':<40}{put:>10.0f}")
    print(f"{'pseudo-label get, 64x64 masks/s':<40}{get:>10.0f}")
    goal = check("ratio actor / in-process <= 1.03", b / a, 1.03, lower=True, digits=3)
    sys.exit(report([goal]))


if __name__ == "__main__":
    main()
