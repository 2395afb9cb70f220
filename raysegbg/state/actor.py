"""The shared-state actor: one per run, named from the run id, owned by the driver.

It holds the latest snapshot of every feature memory and the pseudo-label store, persists
both under the run folder, and reloads them when Ray restarts it after a crash. Workers
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
from raysegbg.data.format import replace_directory
from raysegbg.state.store import PseudoLabelStore

NAMESPACE = "raysegbg"


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
    """Actor body (plain class: `ray.remote` is applied in `create`, testable without Ray)."""

    def __init__(self, state_dir: str):
        self.state_dir = storage.location(state_dir)  # a URI for a run in an object store
        self.memories: dict[str, tuple[int, dict[str, np.ndarray]]] = {}
        self.store = PseudoLabelStore()
        self.restored = self._load(self.state_dir / "latest")

    # -- memories -------------------------------------------------------------------------
    def put_memory(self, name: str, version: int, arrays: dict[str, np.ndarray]) -> int:
        """Keep the newest snapshot of `name` (older, out-of-order versions are ignored)."""
        if name not in self.memories or version >= self.memories[name][0]:
            self.memories[name] = (version, arrays)
        return self.memories[name][0]

    def get_memory(self, name: str) -> tuple[int, dict[str, np.ndarray]]:
        if name not in self.memories:
            known = ", ".join(sorted(self.memories)) or "none yet"
            raise KeyError(f"no memory '{name}' in the shared state (known: {known})")
        return self.memories[name]

    # -- pseudo-labels --------------------------------------------------------------------
    def put_labels(self, ids, masks, confidences=None, step: int = 0) -> int:
        self.store.put(ids, masks, confidences, step)
        return len(self.store)

    def get_labels(self, ids) -> list[tuple[np.ndarray, np.ndarray | None, int]]:
        return [(x.mask, x.confidence, x.step) for x in self.store.get(ids)]

    # -- persistence ----------------------------------------------------------------------
    def export(self) -> dict[str, bytes]:
        """Everything, as bytes that a checkpoint can hold (the actor may be on another node)."""
        with tempfile.TemporaryDirectory() as tmp:
            self._write(Path(tmp) / "s")
            return {p.name: p.read_bytes() for p in (Path(tmp) / "s").iterdir()}

    def load_export(self, files: dict[str, bytes]) -> dict[str, Any]:
        """Replace the state with a checkpoint's (on restore), and persist it as latest."""
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in files.items():
                (Path(tmp) / name).write_bytes(data)
            self.memories, self.store = {}, PseudoLabelStore()
            self._load(Path(tmp))
        self.persist()
        return self.info()

    def persist(self) -> str:
        """Write the current state to <run>/state/latest (atomic replace)."""
        latest = self.state_dir / "latest"
        if storage.is_uri(latest):  # staged locally, then published all at once
            with tempfile.TemporaryDirectory() as tmp:
                return storage.publish_dir(self._write(Path(tmp) / "s"), latest)
        return str(self._write(latest))

    def info(self) -> dict[str, Any]:
        return {
            "memories": {k: v[0] for k, v in self.memories.items()},
            "labels": len(self.store),
            "restored": self.restored,
            "pid": os.getpid(),
        }

    def _write(self, target: Path) -> Path:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        versions = {name: v for name, (v, _) in self.memories.items()}
        for name, (_, arrays) in self.memories.items():
            (tmp / f"memory-{name}.npz").write_bytes(_npz_bytes(arrays))
        (tmp / "memories.json").write_text(json.dumps(versions))
        if len(self.store):
            self.store.write_shards(tmp)
        replace_directory(tmp, target)
        return target

    def _load(self, directory: Path | str) -> bool:
        if storage.is_uri(directory):  # the version that persist last published
            with tempfile.TemporaryDirectory() as tmp:
                return storage.fetch_published(directory, Path(tmp)) and self._load(Path(tmp))
        if not (directory / "memories.json").is_file():
            return False
        for name, version in json.loads((directory / "memories.json").read_text()).items():
            arrays = _npz_load((directory / f"memory-{name}.npz").read_bytes())
            self.memories[name] = (version, arrays)
        if any(directory.glob("labels-*.parquet")):
            self.store = PseudoLabelStore.load(directory)
        return True


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
