"""Faults a run survives (issue #19): a Ray Train worker killed with SIGKILL mid-epoch, and the
driver killed with SIGTERM while it writes a checkpoint.

Elsewhere: the shared-state actor killed mid-run (tests/test_state_actor.py, crash test), a
search stopped with Ctrl+C and resumed (tests/test_tune.py), a node removed mid-run
(tests/test_multinode.py); benchmarks/faults.py measures all of them, plus four runs at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raysegbg import storage
from raysegbg.checkpoint import (
    UnreadableCheckpoint,
    list_checkpoints,
    load_checkpoint,
    load_state,
)
from raysegbg.config import load_config
from raysegbg.local import LocalHost, train_local
from raysegbg.state.actor import SharedState
from raysegbg.state.store import PseudoLabelStore
from raysegbg.train import LOG_EVERY, train_worker
from tests.conftest import tiny_overrides
from tests.multiproc import run_ranks

REPO = Path(__file__).resolve().parents[2]
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Train writes it once it has a checkpoint
STEPS = 12  # steps per epoch: epoch 2 lasts seconds, so the kill lands inside it


def _train_rank(rank: int, world: int, overrides: list[str], run_dir: str) -> dict[str, float]:
    """One rank of a run in a plain process (tests/multiproc), checkpoints as Ray lays them."""
    host = LocalHost(Path(run_dir))
    ctx = host.context(rank=rank, world_size=world, log=lambda line: None)
    return train_worker(load_config(None, overrides), ctx)


def _alive_worker_pids() -> list[int]:
    from ray.util.state import list_actors

    filters = [("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
    return sorted(actor.pid for actor in list_actors(filters=filters, detail=True))


def _kill_a_worker_in_epoch_2(run_dir: Path, seen: dict, deadline: float) -> None:
    """SIGKILL one of the run's two workers once Train has recorded epoch 1's checkpoint."""
    stale: set[int] = set()  # none, unless an earlier test's workers linger
    with contextlib.suppress(Exception):
        stale = set(_alive_worker_pids())
    while len(seen.setdefault("pids", [])) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
        with contextlib.suppress(Exception):  # the State API may not answer at once
            seen["pids"] = [pid for pid in _alive_worker_pids() if pid not in stale]
    while not (run_dir / SNAPSHOT).exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(seen["pids"][0], signal.SIGKILL)
    seen["checkpoints"] = sorted(p.name for p in run_dir.glob("epoch_*"))


def first_logged_steps(tb_dir: Path) -> list[int]:
    """Per event file of the run's TensorBoard, oldest first (rank 0 opens one per attempt),
    the first step it logged a training loss at."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    firsts = []
    for path in sorted(tb_dir.glob("events.out.tfevents.*")):
        steps = [
            event.step
            for event in EventFileLoader(str(path)).Load()
            if any(value.tag == "train/loss" for value in event.summary.value)
        ]
        firsts += [min(steps)] if steps else []
    return firsts


@pytest.mark.slow
def test_a_worker_killed_mid_epoch_redoes_at_most_that_epoch(ray_local, tiny_data, tmp_path):
    from raysegbg.ray_train import fit

    # one thread per worker, as in the reference below: thread counts change float sums
    overrides = tiny_overrides(
        tiny_data, tmp_path,
        **{"scaling.workers": 2, "scaling.cpus_per_worker": 1, "train.steps_per_epoch": STEPS,
           "logging.max_failures": 1, "logging.image_every": 100},
    )  # fmt: skip
    # meanwhile, the same run uninterrupted: two plain processes over gloo, as Ray's workers
    # are (it fills the CPU time the Ray run spends starting and restarting its processes)
    reference, ranks = tmp_path / "reference", []
    reference.mkdir()
    uninterrupted = threading.Thread(
        target=lambda: ranks.extend(run_ranks(_train_rank, 2, overrides, str(reference))),
        daemon=True,
    )
    uninterrupted.start()
    run_dir, seen = tmp_path / "killed", {}
    killer = threading.Thread(
        target=_kill_a_worker_in_epoch_2,
        args=(run_dir, seen, time.monotonic() + 300),
        daemon=True,
    )
    killer.start()
    result = fit(load_config(None, [*overrides, "logging.name=killed"]))
    killer.join(timeout=10)
    assert result.metrics["epoch"] == 2 and result.metrics["step"] == 2 * STEPS
    assert seen["checkpoints"] == ["epoch_0001"], seen  # killed after epoch 1, inside epoch 2
    assert seen["pids"][0] not in _alive_worker_pids()
    # the restarted workers went on from epoch 1's checkpoint (its last step), not from
    # scratch: the work redone is the part of epoch 2 trained before the kill, under an epoch
    first, resumed = first_logged_steps(run_dir / "tb")
    assert first == 1 and STEPS < resumed <= STEPS + LOG_EVERY, (first, resumed)
    assert [m["epoch"] for _, m in list_checkpoints(run_dir)] == [1, 2]

    uninterrupted.join(timeout=300)
    assert ranks, "the uninterrupted run failed (its error is in the output above)"
    expected = ranks[0]  # rank 0's metrics
    for key in ("train/loss", "val/miou", "val/fg_dice", "val/fpr"):
        assert result.metrics[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), key
    got = load_state(run_dir / "epoch_0002")["method"]
    want = load_state(reference / "epoch_0002")["method"]
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, msg=name)  # float32: rtol 1.3e-6


# -- the driver killed while it writes a checkpoint (no Ray) ---------------------------------
# Trains a run in-process, with one write into the run folder made to stop half-way: it writes
# the first half of the file, names it in the `ready` file and waits to be killed.
STALLED_RUN = r"""
import json, os, shutil, sys, time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from raysegbg.config import load_config
from raysegbg.local import train_local

overrides, run_dir, ready, where = json.loads(sys.argv[1])
run_dir = Path(run_dir)
torch.set_num_threads(1)


def stall(path, data):
    Path(path).write_bytes(data[: len(data) // 2])
    Path(ready + ".tmp").write_text(str(path))
    os.replace(ready + ".tmp", ready)  # the test polls for `ready`: never seen empty
    time.sleep(600)


if where == "parquet":  # the store's snapshot under <run>/state, epoch 2's checkpoint
    write_table, calls = pq.write_table, []

    def slow_write_table(table, path, **kwargs):
        if run_dir in Path(str(path)).parents:
            calls.append(path)
            if len(calls) == 2:
                out = pa.BufferOutputStream()
                write_table(table, out, **kwargs)
                stall(path, out.getvalue().to_pybytes())
        return write_table(table, path, **kwargs)

    pq.write_table = slow_write_table
else:  # the model file, copied into the run folder as epoch 2's checkpoint
    copytree = shutil.copytree

    def slow_copy(src, dst, **kwargs):
        if Path(dst).name == "state.pt" and "epoch_0002" in str(dst):
            stall(dst, Path(src).read_bytes())
        return shutil.copy2(src, dst, **kwargs)

    def slow_copytree(src, dst, *args, **kwargs):
        if not args:  # the top call (the recursion passes copy_function on by position)
            kwargs["copy_function"] = slow_copy
        return copytree(src, dst, *args, **kwargs)

    shutil.copytree = slow_copytree
train_local(load_config(None, overrides), run_dir, log=lambda line: None)
"""


def rrn_overrides(data: Path, root: Path) -> list[str]:
    """rrn: a run with a pseudo-label store (Parquet) in its shared state and checkpoints."""
    values = {"method.name": "rrn", "method.rrn.labeled_fraction": 0.5, "logging.image_every": 100}
    return tiny_overrides(data, root, **values)


@pytest.fixture
def one_thread():
    """Float sums depend on torch's thread count: the killed process runs on one thread, so
    the resume and the reference do too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def uninterrupted(tiny_data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("uninterrupted")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_local(load_config(None, rrn_overrides(tiny_data, root)), root / "run",
                    log=lambda line: None)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return root / "run"


def sigterm_mid_write(overrides: list[str], run_dir: Path, where: str) -> Path:
    """Run STALLED_RUN, SIGTERM it once it is inside the slowed write; the half-written file."""
    ready = run_dir.parent / "ready"
    args = json.dumps([overrides, str(run_dir), str(ready), where])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", STALLED_RUN, args], cwd=REPO, env=env)
    try:
        deadline = time.monotonic() + 240
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), f"the run never reached the slowed write (exit {proc.poll()})"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == -signal.SIGTERM
    finally:
        proc.kill()
    return Path(ready.read_text())


@pytest.mark.parametrize("where", ["checkpoint", "parquet"])
def test_sigterm_mid_checkpoint_leaves_nothing_half_written_to_read(
    tiny_data, tmp_path, capsys, one_thread, uninterrupted, where
):
    overrides = rrn_overrides(tiny_data, tmp_path)
    run_dir = tmp_path / "run"
    half = sigterm_mid_write(overrides, run_dir, where)
    assert run_dir in half.parents and half.is_file()
    with pytest.raises((pa.ArrowInvalid, UnreadableCheckpoint)):  # it really is cut short
        pq.read_table(half) if where == "parquet" else load_state(half.parent)

    # what raysegbg reads back is complete: epoch 1's checkpoint, and the store's last snapshot
    listed = [folder for folder, _ in list_checkpoints(run_dir)]
    assert listed == [run_dir / "epoch_0001"]
    folder, state = load_checkpoint(run_dir, "last")
    assert folder == listed[0] and state["epoch"] == 0
    assert len(PseudoLabelStore.load(folder / "shared")) > 0
    shared = SharedState(str(run_dir / "state"))
    assert shared.restored and len(shared.store) == len(PseudoLabelStore.load(folder / "shared"))
    stored = storage.published(run_dir / "state" / "labels")
    assert all(half not in p.parents for p in (stored, *listed))
    assert "warning" not in capsys.readouterr().err  # nothing unreadable was even tried

    # resumed, it trains epoch 2 again and ends as the uninterrupted run did, store included
    _, host = train_local(load_config(None, overrides), run_dir, log=lambda line: None)
    assert [r["epoch"] for r in host.reports] == [2]
    assert not any(p.name.startswith(".epoch") for p in run_dir.iterdir())  # debris cleared
    got, want = (run / "epoch_0002" for run in (run_dir, uninterrupted))
    assert scores(got) == pytest.approx(scores(want), nan_ok=True)
    weights = [load_state(folder)["method"] for folder in (got, want)]
    for name, tensor in weights[1].items():
        torch.testing.assert_close(weights[0][name], tensor, msg=name)
    stores = [PseudoLabelStore.load(folder / "shared") for folder in (got, want)]
    ids = sorted(stores[1].ids())
    assert sorted(stores[0].ids()) == ids
    for a, b in zip(stores[0].get(ids), stores[1].get(ids), strict=True):
        assert a.mask.tobytes() == b.mask.tobytes() and a.step == b.step


def scores(checkpoint: Path) -> dict[str, float]:
    """A checkpoint's metrics, less the timings."""
    metrics = json.loads((checkpoint / "meta.json").read_text())["metrics"]
    return {k: v for k, v in metrics.items() if not k.startswith("perf/")}


def test_a_checkpoint_whose_store_was_cut_is_skipped(uninterrupted, tmp_path, capsys):
    """With Ray, a checkpoint is copied into the run folder in place (Train's own copy): a
    worker killed meanwhile can leave its store cut short beside a whole model file. The
    checkpoint before it is used, with a warning naming the file."""
    run = Path(shutil.copytree(uninterrupted, tmp_path / "run"))
    shard = run / "epoch_0002" / "shared" / "labels-00000.parquet"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    folder, state = load_checkpoint(run, "last")
    assert folder == run / "epoch_0001" and state["epoch"] == 0
    warning = capsys.readouterr().err
    assert str(shard) in warning and "truncated or corrupt" in warning
