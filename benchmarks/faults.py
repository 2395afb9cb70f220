"""Faults a run survives: each one injected into a tiny seeded run, whose end is compared with
the same run uninterrupted.

  worker kill -9    one of a run's two Ray Train workers SIGKILLed inside epoch 2
  state actor kill  the run's shared-state actor (mcibi's class memory) killed inside epoch 2
  driver SIGTERM    `raysegbg train` sent SIGTERM inside epoch 2, then started again (same name)
  4 runs at once    four `raysegbg train` started together on this machine, each with its own
                    Ray, ports and run folder

For each: recovered (the run reached its last epoch), the work redone (from the run's
TensorBoard: the step a restarted attempt went on from), and the final val mIoU against the
uninterrupted run's. Every worker trains on one thread, so nothing lost means equal to the last
bit. Goals: every fault recovered, its final val mIoU within 1e-6 of the uninterrupted run's;
exit 1 if one is missed.

    python benchmarks/faults.py [--steps 12] [--epochs 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from common import check, report

from raysegbg.config import load_config
from raysegbg.data.synthetic import make_dataset
from raysegbg.local import train_local

# a report waits for the controller's next poll of its workers (2 s by default)
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Train writes it once it has a checkpoint
TOLERANCE = 1e-6


@dataclass
class Row:
    fault: str
    recovered: bool
    redone: str
    miou: float
    reference: float
    seconds: float

    @property
    def delta(self) -> float:
        return abs(self.miou - self.reference)


def overrides(data: Path, root: Path, steps: int, epochs: int, **extra: object) -> list[str]:
    values = {
        "data.path": data, "data.crop_size": 32, "model.encoder_depth": 3,
        "model.decoder_channels": "[32,16,8]", "train.epochs": epochs, "train.batch_size": 8,
        "train.steps_per_epoch": steps, "scaling.workers": 2, "scaling.cpus_per_worker": 1,
        "logging.storage_path": root, "logging.image_every": 100, "logging.max_failures": 1,
        **extra,
    }  # fmt: skip
    return [f"{k}={v}" for k, v in values.items()]


def final_miou(run_dir: Path, epochs: int) -> float:
    """The last checkpoint's val mIoU (NaN when the run did not reach its last epoch)."""
    meta = run_dir / f"epoch_{epochs:04d}" / "meta.json"
    return json.loads(meta.read_text())["metrics"]["val/miou"] if meta.exists() else float("nan")


def attempts(tb_dir: Path) -> list[int]:
    """Per event file (rank 0 opens one per attempt), oldest first: its first training step."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    firsts = []
    for path in sorted(tb_dir.glob("events.out.tfevents.*")):
        steps = [
            e.step
            for e in EventFileLoader(str(path)).Load()
            if any(v.tag == "train/loss" for v in e.summary.value)
        ]
        firsts += [min(steps)] if steps else []
    return firsts


def redone(tb_dir: Path, steps: int) -> str:
    """What the restarted attempt trained again: the rest of the epoch it was stopped in."""
    firsts = attempts(tb_dir)
    if len(firsts) == 1:
        return "none (no restart)"
    at = max(s for s in range(0, firsts[-1]) if s % steps == 0)  # its checkpoint's step
    return f"< {steps} steps (went on from step {at})"


def after_first_checkpoint(run_dir: Path, action, deadline: float = 600) -> threading.Thread:
    """Call `action()` in a thread once Train has recorded the run's first checkpoint."""

    def wait_then_act() -> None:
        end = time.monotonic() + deadline
        while not (run_dir / SNAPSHOT).exists() and time.monotonic() < end:
            time.sleep(0.02)
        action()

    thread = threading.Thread(target=wait_then_act, daemon=True)
    thread.start()
    return thread


def fit_run(ovr: list[str], name: str) -> bool:
    from raysegbg.ray_train import fit

    try:
        fit(load_config(None, [*ovr, f"logging.name={name}"]))
        return True
    except Exception as exc:  # a fault not recovered: reported in the table
        print(f"{name} failed: {exc}", file=sys.stderr)
        return False


# -- the faults ---------------------------------------------------------------------------------
def worker_kill(ovr: list[str], root: Path, args) -> Row:
    from ray.util.state import list_actors

    filters = [("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
    pids: list[int] = []

    def find_then_kill() -> None:  # the workers are listed early: the kill follows at once
        while len(pids) < 2:
            time.sleep(0.2)
            with contextlib.suppress(Exception):  # the State API may not answer at once
                pids[:] = [a.pid for a in list_actors(filters=filters, detail=True)]
        after_first_checkpoint(root / "kill", lambda: os.kill(pids[0], signal.SIGKILL)).join()

    threading.Thread(target=find_then_kill, daemon=True).start()
    start = time.perf_counter()
    ok = fit_run(ovr, "kill")
    return Row(
        "worker kill -9",
        ok,
        redone(root / "kill" / "tb", args.steps),
        final_miou(root / "kill", args.epochs),
        final_miou(root / "reference", args.epochs),
        time.perf_counter() - start,
    )


def actor_kill(ovr: list[str], root: Path, args) -> Row:
    import ray

    from raysegbg.state import actor as state_actor

    ovr = [
        *ovr,
        "method.name=mcibi",
        "method.mcibi.dims=8",
        "method.mcibi.attention_dims=4",
        "train.snapshot_every=2",
    ]
    fit_run(ovr, "mcibi-reference")
    seen: dict = {}

    def kill() -> None:
        (name,) = state_actor.alive("mcibi-actor-kill")  # this driver's actor of the run
        actor = ray.get_actor(name, namespace=state_actor.NAMESPACE)
        pid = ray.get(actor.info.remote())["pid"]
        ray.kill(actor, no_restart=False)  # Ray restarts it; it reloads its last snapshot
        for _ in range(60):  # back within a minute, from its snapshot
            info = ray.get(actor.info.remote(), timeout=30)
            if info["pid"] != pid:
                seen["restored"] = info["restored"]
                return
            time.sleep(0.5)

    start = time.perf_counter()
    killer = after_first_checkpoint(root / "mcibi-actor-kill", kill)
    ok = fit_run(ovr, "mcibi-actor-kill")
    killer.join(timeout=60)
    print(f"state actor kill: restarted and restored from its snapshot: {seen.get('restored')}")
    run_dir = root / "mcibi-actor-kill"
    return Row(
        "state actor kill",
        ok and seen.get("restored") is True,
        redone(run_dir / "tb", args.steps),
        final_miou(run_dir, args.epochs),
        final_miou(root / "mcibi-reference", args.epochs),
        time.perf_counter() - start,
    )


def cli_train(ovr: list[str], name: str) -> subprocess.Popen:
    sets = [word for o in ovr for word in ("--set", o)]
    command = [sys.executable, "-m", "raysegbg.cli", "train", *sets, "--name", name]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def driver_sigterm(ovr: list[str], root: Path, args) -> Row:
    start = time.perf_counter()
    proc = cli_train(ovr, "driver")
    after_first_checkpoint(root / "driver", lambda: proc.send_signal(signal.SIGTERM)).join()
    stopped = proc.wait()
    again = cli_train(ovr, "driver").wait()  # the same command again: it resumes
    print(f"driver SIGTERM: the driver's exit {stopped}, then the same command's {again}")
    return Row(
        "driver SIGTERM + resume",
        again == 0 and stopped != 0,
        redone(root / "driver" / "tb", args.steps),
        final_miou(root / "driver", args.epochs),
        final_miou(root / "reference", args.epochs),
        time.perf_counter() - start,
    )


def four_at_once(data: Path, root: Path, args) -> Row:
    """Four one-worker runs at once (each starts a Ray), against the same run in-process."""
    runs = [root / f"load{k}" for k in range(4)]
    one = {"scaling.workers": 1, "train.epochs": 2}
    reference = load_config(None, overrides(data, root / "load-ref", args.steps, 2, **one))
    torch.set_num_threads(1)  # as a one-CPU worker
    train_local(reference, root / "load-ref" / "run", log=lambda line: None)
    start = time.perf_counter()
    procs = [cli_train(overrides(data, run, args.steps, 2, **one), "run") for run in runs]
    codes = [proc.wait() for proc in procs]
    seconds = time.perf_counter() - start
    mious = [final_miou(run / "run", 2) for run in runs]
    alone = final_miou(root / "load-ref" / "run", 2)
    # the run furthest from the one trained alone (NaN: one did not finish)
    worst = max(mious, key=lambda m: abs(m - alone)) if all(m == m for m in mious) else math.nan
    print(f"4 runs at once: exits {codes}, val mIoU {[round(m, 6) for m in mious]}")
    finished = sum(c == 0 and m == m for c, m in zip(codes, mious, strict=True))
    return Row(
        "4 runs at once (own Rays)",
        finished == 4,
        f"none ({finished}/4 finished)",
        worst,
        alone,
        seconds,
    )


# -- report -------------------------------------------------------------------------------------
def table(rows: list[Row]) -> str:
    head = (
        f"{'fault':<26}{'recovered':<11}{'work redone':<36}{'val mIoU':>10}"
        f"{'uninterrupted':>15}{'|diff|':>10}{'wall s':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.fault:<26}{'yes' if r.recovered else 'NO':<11}{r.redone:<36}"
            f"{r.miou:>10.6f}{r.reference:>15.6f}{r.delta:>10.1e}{r.seconds:>8.0f}"
        )
    return "\n".join(lines)


def run(root: Path, args) -> int:
    import ray

    from raysegbg.ray_train import init_ray

    data = root / "data"
    make_dataset("hetero_bg", data, n=60, size=32, seed=0)
    ovr = overrides(data, root, args.steps, args.epochs)
    init_ray(None)
    fit_run(ovr, "reference")
    rows = [worker_kill(ovr, root, args), actor_kill(ovr, root, args)]
    ray.shutdown()  # the runs below start Rays of their own
    rows += [driver_sigterm(ovr, root, args), four_at_once(data, root, args)]
    print()
    print(table(rows))
    print(
        f"{args.epochs} epochs of {args.steps} steps, 2 workers of 1 thread (load test: 1 "
        "worker, 2 epochs), 60 images of 32 px"
    )
    goals = []
    for r in rows:
        goals.append(check(f"{r.fault}: recovered", float(r.recovered), 1.0, digits=0))
        goals.append(
            check(
                f"{r.fault}: final val mIoU within {TOLERANCE:g} of uninterrupted",
                r.delta,
                TOLERANCE,
                lower=True,
                digits=7,
            )
        )
    return report(goals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="steps per epoch")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="faults-") as tmp:
        code = run(Path(tmp), args)
    sys.exit(code)


if __name__ == "__main__":
    main()
