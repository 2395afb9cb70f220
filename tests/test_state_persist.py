"""The shared state's persistence (in-process, no Ray): only what changed is written, a
published part is never absent, and a replaced worker group's late sends are refused."""

import threading

import numpy as np

from raysegbg import storage
from raysegbg.state.actor import SharedState
from raysegbg.state.store import PseudoLabelStore


def memory(value: float) -> dict[str, np.ndarray]:
    return {"memory": np.full((2, 3), value)}


def labels(n: int, value: int = 1):
    ids = [f"img{i}" for i in range(n)]
    return ids, [np.full((4, 4), value, np.uint8) for _ in ids]


def versions(state_dir) -> dict[str, str]:
    return {part: storage.published(state_dir / part).name for part in ("memories", "labels")}


def test_only_the_parts_that_changed_are_written(tmp_path):
    state = SharedState(str(tmp_path))
    assert state.persist() == []  # nothing yet: nothing written
    state.put_memory("memory", 1, memory(1.0))
    state.put_labels(*labels(3), step=1)
    assert state.persist() == ["memories", "labels"]
    first = versions(tmp_path)
    assert state.persist() == []  # unchanged: not rewritten
    state.put_memory("memory", 2, memory(2.0))
    assert state.persist() == ["memories"]
    second = versions(tmp_path)
    assert second["labels"] == first["labels"] and second["memories"] != first["memories"]
    state.put_labels(*labels(3, value=2), step=2)
    assert state.persist() == ["labels"]
    # on disk: the pointer, the current version and the one before (for a reader of it)
    for part in ("memories", "labels"):
        names = sorted(p.name for p in (tmp_path / part).iterdir())
        assert names[0] == storage.CURRENT and len(names) == 3, names
    again = SharedState(str(tmp_path))  # what a restarted actor reads
    assert again.restored and again.get_memory("memory")[0] == 2
    assert again.get_labels(["img0"])[0][0].max() == 2 and again.persist() == []


def test_a_reader_always_finds_a_complete_store(tmp_path):
    """While the actor publishes new versions back to back, a reader polling the folder
    never finds it missing or partial."""
    state = SharedState(str(tmp_path))
    state.put_labels(*labels(50), step=0)
    state.persist()
    done, seen, errors = threading.Event(), [], []

    def read() -> None:
        while not done.is_set():
            try:
                store = PseudoLabelStore.load(tmp_path / "labels")
                seen.append(len(store))
            except Exception as error:  # noqa: BLE001 — any failure to read is the finding
                errors.append(repr(error))

    reader = threading.Thread(target=read)
    reader.start()
    for step in range(1, 60):
        state.put_labels(*labels(50, value=step % 7), step=step)
        state.persist()
    done.set()
    reader.join()
    assert not errors, errors[:3]
    assert len(seen) > 10 and set(seen) == {50}


def test_a_late_send_from_a_replaced_worker_group_is_refused(tmp_path):
    state = SharedState(str(tmp_path))
    old = state.attach()
    assert state.put_memory("memory", 10, memory(10.0), old) == 10
    new = state.attach()  # the worker group restarted from an older checkpoint
    assert new > old
    assert state.put_memory("memory", 3, memory(3.0), new) == 3
    # the replaced group's rank 0 was still sending: a higher version, but refused
    assert state.put_memory("memory", 11, memory(11.0), old) == -1
    state.put_labels(*labels(2, value=9), step=11, incarnation=old)
    version, arrays = state.get_memory("memory")
    assert version == 3 and arrays["memory"][0, 0] == 3.0
    assert len(state.store) == 0 and state.info()["refused"] == 2
    state.put_labels(*labels(2, value=4), step=4, incarnation=new)
    assert len(state.store) == 2
    # the numbers outlive the actor: a restarted one never hands out `new` again
    state.persist()
    restarted = SharedState(str(tmp_path))
    assert restarted.attach() > new
    assert restarted.put_memory("memory", 12, memory(12.0), new) == -1
