"""The shared-state actor: one per run, named from the run id, owned by the driver.

It holds the latest snapshot of every feature memory and the pseudo-label store, persists
what changed under the run folder, and reloads them when Ray restarts it after a crash. Workers
reach it through `raysegbg.state.client.StateClient`.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from raysegbg import storage
from raysegbg.state.store import PseudoLabelStore

NAMESPACE = "raysegbg"
INCARNATION = "incarnation"  # the number of the last worker group that attached


def actor_name(run_name: str) -> str:
    return f"state-{run_name}"


def unique_name(run_name: str) -> str:
    """A name for one driver's actor of the run: two drivers started with the same run name
    never share an actor, nor kill each other's."""
    return f"{run_name}-{uuid.uuid4().hex[:8]}"


def alive(run_name: str) -> list[str]:
    """Names of the live state actors of drivers of this run (any of them)."""
    import ray

    prefix = actor_name(run_name) + "-"
    found = ray.util.list_named_actors(all_namespaces=True)
    return [
        a["name"] for a in found if a["namespace"] == NAMESPACE and a["name"].startswith(prefix)
    ]


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _npz_load(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data)) as f:
        return {k: f[k] for k in f.files}


class SharedState:
    """Actor body (plain class: `ray.remote` is applied in `create`, testable without Ray).

    Persisted under `state_dir` in two parts, each published whole (`storage.publish_dir`) and
    only when it changed: `memories/` (one npz per memory and their versions) and `labels/`
    (the pseudo-label store's Parquet shards). A worker group `attach`es first and tags what
    it sends with the number it got: a snapshot from a group that was replaced (a late one
    from before a restart) is refused, however high its version.
    """

    def __init__(self, state_dir: str):
        self.state_dir = storage.location(state_dir)  # a URI for a run in an object store
        self.memories: dict[str, tuple[int, dict[str, np.ndarray]]] = {}
        self.groups: dict[str, int] = {}  # memory name -> the worker group its snapshot is from
        self.store = PseudoLabelStore()
        self.incarnation = self._read_incarnation()
        self.refused = 0  # sends from a replaced worker group
        self.restored = self._load()
        self._persisted = self._marks()  # what is on storage now (see `persist`)

    # -- worker groups --------------------------------------------------------------------
    def attach(self) -> int:
        """A (re)started worker group's number: everything sent with an older one is refused
        from now on. Kept on storage, so a restarted actor never hands out a number twice."""
        self.incarnation += 1
        storage.write_text(self.state_dir / INCARNATION, str(self.incarnation))
        return self.incarnation

    def _current(self, incarnation: int | None) -> bool:
        if incarnation is not None and incarnation < self.incarnation:
            self.refused += 1
            return False
        return True

    def _read_incarnation(self) -> int:
        path = self.state_dir / INCARNATION
        return int(storage.read_text(path)) if storage.is_file(path) else 0

    # -- memories -------------------------------------------------------------------------
    def put_memory(self, name: str, version: int, arrays: dict[str, np.ndarray],
                   incarnation: int | None = None) -> int:  # fmt: skip
        """Keep the newest snapshot of `name` from the current worker group: older,
        out-of-order versions are ignored; the first from a new group replaces any earlier
        group's (it went back to a checkpoint, or started over)."""
        if not self._current(incarnation):
            return -1
        group = incarnation or 0
        newer_group = group > self.groups.get(name, 0)
        if name not in self.memories or newer_group or version >= self.memories[name][0]:
            self.memories[name] = (version, arrays)
            self.groups[name] = max(group, self.groups.get(name, 0))
        return self.memories[name][0]

    def get_memory(self, name: str) -> tuple[int, dict[str, np.ndarray]]:
        if name not in self.memories:
            known = ", ".join(sorted(self.memories)) or "none yet"
            raise KeyError(f"no memory '{name}' in the shared state (known: {known})")
        return self.memories[name]

    # -- pseudo-labels --------------------------------------------------------------------
    def put_labels(self, ids, masks, confidences=None, step: int = 0,
                   incarnation: int | None = None) -> int:  # fmt: skip
        if self._current(incarnation):
            self.store.put(ids, masks, confidences, step)
        return len(self.store)

    def get_labels(self, ids) -> list[tuple[np.ndarray, np.ndarray | None, int]]:
        return [(x.mask, x.confidence, x.step) for x in self.store.get(ids)]

    # -- persistence ----------------------------------------------------------------------
    def export(self) -> dict[str, bytes]:
        """Everything, as bytes that a checkpoint can hold (the actor may be on another node)."""
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            self._write_memories(folder)
            if len(self.store):
                self.store.write_shards(folder)
            return {p.name: p.read_bytes() for p in folder.iterdir()}

    def load_export(self, files: dict[str, bytes]) -> dict[str, Any]:
        """Replace the state with a checkpoint's (on restore), and persist it."""
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in files.items():
                (Path(tmp) / name).write_bytes(data)
            self.memories, self.store = {}, PseudoLabelStore()
            self._load_memories(Path(tmp))
            self._load_labels(Path(tmp))
        self._persisted = {}  # both parts differ from what is on storage
        self.persist()
        return self.info()

    def persist(self) -> list[str]:
        """Publish the parts that changed since they were last persisted; returns their names."""
        marks = self._marks()
        written = [part for part, mark in marks.items() if self._persisted.get(part) != mark]
        if "memories" in written:
            with storage.staging(self.state_dir / "memories") as tmp:
                self._write_memories(tmp)
                storage.publish_dir(tmp, self.state_dir / "memories")
        if "labels" in written:
            self.store.save(self.state_dir / "labels")
        self._persisted = marks
        return written

    def _marks(self) -> dict[str, Any]:
        """What tells each part's content apart: the memories' versions, the store's puts."""
        return {"memories": self._versions(), "labels": self.store.generation}

    def _versions(self) -> dict[str, int]:
        return {name: version for name, (version, _) in self.memories.items()}

    def info(self) -> dict[str, Any]:
        return {
            "memories": self._versions(),
            "labels": len(self.store),
            "restored": self.restored,
            "incarnation": self.incarnation,
            "refused": self.refused,
            "pid": os.getpid(),
        }

    def _write_memories(self, folder: Path) -> None:
        for name, (_, arrays) in self.memories.items():
            (folder / f"memory-{name}.npz").write_bytes(_npz_bytes(arrays))
        (folder / "memories.json").write_text(json.dumps(self._versions()))

    def _load_memories(self, folder: Path) -> bool:
        if not (folder / "memories.json").is_file():
            return False
        for name, version in json.loads((folder / "memories.json").read_text()).items():
            arrays = _npz_load((folder / f"memory-{name}.npz").read_bytes())
            self.memories[name] = (version, arrays)
        return True

    def _load_labels(self, folder: Path) -> bool:
        if not any(folder.glob("labels-*.parquet")):
            return False
        self.store = PseudoLabelStore.load(folder)
        return True

    def _load(self) -> bool:
        """The last persisted state (after a crash, Ray restarts the actor into this)."""
        found = False
        for part, load in (("memories", self._load_memories), ("labels", self._load_labels)):
            with tempfile.TemporaryDirectory() as tmp:
                current = storage.published(self.state_dir / part)
                if current is None:
                    continue
                if storage.is_uri(current):
                    current = storage.download_dir(current, Path(tmp))
                found = load(Path(current)) or found
        return found


def create(run_name: str, state_dir: Path):
    """Start (or find, after a driver restart) the run's actor. Ray restarts it on a crash;
    its constructor then reloads the last persisted snapshot."""
    import ray

    remote = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(SharedState)
    return remote.options(
        name=actor_name(run_name), namespace=NAMESPACE, get_if_exists=True
    ).remote(str(state_dir))


def lookup(run_name: str):
    import ray

    return ray.get_actor(actor_name(run_name), namespace=NAMESPACE)


def destroy(run_name: str) -> None:
    import ray

    try:
        ray.kill(lookup(run_name), no_restart=True)
    except ValueError:
        pass  # already gone
