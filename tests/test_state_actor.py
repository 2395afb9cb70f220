"""The shared-state actor on a real local Ray: snapshots, crash and restart, checkpoints."""

import io
import json
import time

import numpy as np
import pytest
import torch

from raysegbg import storage
from raysegbg.state import actor as state_actor
from raysegbg.state.client import StateClient
from raysegbg.state.memory import ClassMemory
from raysegbg.state.store import PseudoLabelStore
from tests.test_state_store import make_labels

pytestmark = pytest.mark.slow


class Holder(torch.nn.Module):
    """Stands in for a method: one class memory updated every step."""

    def __init__(self):
        super().__init__()
        self.memory = ClassMemory(4, 8)

    def step(self, step: int) -> None:
        gen = torch.Generator().manual_seed(step)
        self.memory.update_from(
            torch.randn(64, 8, generator=gen), torch.randint(0, 4, (64,), generator=gen), 0.2
        )


def exported_memory(files: dict[str, bytes]) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(files["memory-memory.npz"])) as f:
        return {k: f[k] for k in f.files}


def wait_until(predicate, timeout=30.0):
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if predicate():
                return
        except Exception:  # the actor is restarting
            pass
        time.sleep(0.2)
    raise AssertionError("timed out")


def test_actor_crash_mid_run(ray_local, tmp_path):
    ray = ray_local
    actor = state_actor.create("crash-test", tmp_path / "state")
    client = StateClient(actor, every=5)
    holder = Holder()
    ids, masks, confs = make_labels(1000)
    client.put_labels(ids, masks, confs, step=0)
    client.flush()
    for step in range(1, 21):
        holder.step(step)
        client.after_step(step, holder)
    client.checkpoint(holder)  # flush: the snapshot of step 20 is persisted
    first_pid = ray.get(actor.info.remote())["pid"]

    ray.kill(actor, no_restart=False)  # the actor crashes mid-run
    for step in range(21, 41):  # training goes on; the step never waits for the actor
        holder.step(step)
        started = time.perf_counter()
        client.after_step(step, holder)
        assert time.perf_counter() - started < 0.5

    wait_until(lambda: ray.get(actor.info.remote(), timeout=5)["pid"] != first_pid)
    info = ray.get(actor.info.remote())
    assert info["restored"] and info["labels"] == 1000  # back from the last snapshot
    assert info["memories"]["memory"] >= 20

    files = client.checkpoint(holder)  # the next checkpoint holds the current state
    snap = exported_memory(files)
    assert int(snap["version"]) == int(holder.memory.version) == 40
    np.testing.assert_array_equal(snap["memory"], holder.memory.memory.numpy())
    got = client.get_labels(ids[:10] + ids[-10:])
    for (mask, conf, step), k in zip(got, list(range(10)) + list(range(990, 1000)), strict=True):
        assert mask.tobytes() == masks[k].tobytes() and step == 0
        assert (conf is None) == (confs[k] is None)
        assert conf is None or conf.tobytes() == confs[k].tobytes()
    # and what a second crash would restore from is current again: the steps after the crash
    # are on disk, not only in the restarted actor
    memories = storage.published(tmp_path / "state" / "memories")
    assert json.loads((memories / "memories.json").read_text()) == {"memory": 40}
    assert len(PseudoLabelStore.load(tmp_path / "state" / "labels")) == 1000
    state_actor.destroy("crash-test")


def test_restore_puts_a_checkpoint_back(ray_local, tmp_path):
    ray = ray_local
    actor = state_actor.create("restore-test", tmp_path / "state")
    client = StateClient(actor, every=1)
    holder = Holder()
    holder.step(1)
    saved = client.checkpoint(holder)
    holder.step(2)
    client.checkpoint(holder)
    client.restore(saved)  # e.g. the worker group restarted from the older checkpoint
    version, arrays = ray.get(actor.get_memory.remote("memory"))
    assert version == 1 and int(arrays["version"]) == 1
    state_actor.destroy("restore-test")
    with pytest.raises(ValueError):
        state_actor.lookup("restore-test")
