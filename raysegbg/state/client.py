"""What workers use to reach the shared-state actor without blocking the training step.

Every rank has a client: each puts and gets its own share of the pseudo-labels. Memory
snapshots are sent fire-and-forget every `every` steps by rank 0; a snapshot is skipped
(never waited for) while the previous one is still in flight. Checkpoints flush and export.
What a client sends carries its worker group's number (`attach`), so the actor refuses a late
send from a group that was replaced. `LocalStateClient` is the same client over an in-process
`SharedState` (runs without Ray).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from raysegbg import dist
from raysegbg.state.memory import ClassMemory, RingBank


def memories_of(module: nn.Module) -> dict[str, nn.Module]:
    """Every feature memory inside a method, by its module path."""
    return {
        name or "memory": m
        for name, m in module.named_modules()
        if isinstance(m, (ClassMemory, RingBank))
    }


def _arrays(memory: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in memory.state_dict().items()}


class StateClient:
    def __init__(self, actor: Any, every: int = 50, rank: int = 0):
        self.actor = actor
        self.every = every
        self.rank = rank
        self.incarnation: int | None = None  # this worker group's number, from `attach`
        self._pending: list[Any] = []
        self.skipped = 0

    def attach(self) -> None:
        """Every rank, once at the start of a worker group (a collective): rank 0 asks the
        actor for the group's number and sends it to the others."""
        number = self._wait(self._call("attach")) if self.rank == 0 else None
        self.incarnation = dist.broadcast_object(number)

    def _call(self, name: str, *args: Any) -> Any:
        """Start an actor call; returns a reference (see `_wait`)."""
        return getattr(self.actor, name).remote(*args)

    def _wait(self, ref: Any) -> Any:
        import ray

        return ray.get(ref)

    def _in_flight(self) -> bool:
        import ray

        if self._pending:
            done, self._pending = ray.wait(self._pending, num_returns=len(self._pending), timeout=0)
        return bool(self._pending)

    def after_step(self, step: int, method: nn.Module) -> None:
        """Every step: rank 0 may send snapshots (never blocks on the actor)."""
        if self.rank != 0 or self.every <= 0 or step % self.every:
            return
        if self._in_flight():
            self.skipped += 1
            return
        self.push(method)

    def push(self, method: nn.Module) -> None:
        for name, memory in memories_of(method).items():
            version = int(memory.version)
            arrays = _arrays(memory)
            self._pending.append(self._call("put_memory", name, version, arrays, self.incarnation))
        self._pending.append(self._call("persist"))

    def put_labels(self, ids, masks, confidences=None, step: int = 0) -> None:
        """Queue pseudo-labels for the store (`flush` waits until they are in)."""
        confidences = None if confidences is None else list(confidences)
        self._pending.append(
            self._call("put_labels", list(ids), list(masks), confidences, step, self.incarnation)
        )

    def put_many(self, items, step: int = 0, chunk: int = 256) -> None:
        """(id, mask, confidence) items, sent `chunk` per call; returns once all are in."""
        for start in range(0, len(items), chunk):
            ids, masks, confidences = zip(*items[start : start + chunk], strict=True)
            self.put_labels(ids, masks, confidences, step)
        self.flush()

    def get_labels(self, ids) -> list[tuple[np.ndarray, np.ndarray | None, int]]:
        return self._wait(self._call("get_labels", list(ids)))

    def get_many(self, ids, chunk: int = 256) -> list[tuple[np.ndarray, np.ndarray | None, int]]:
        """`get_labels` of many ids, `chunk` per call."""
        out = []
        for start in range(0, len(ids), chunk):
            out += self.get_labels(ids[start : start + chunk])
        return out

    def flush(self) -> None:
        """Wait for every call still in flight."""
        pending, self._pending = self._pending, []
        for ref in pending:
            self._wait(ref)

    def checkpoint(self, method: nn.Module) -> dict[str, bytes]:
        """At a checkpoint: send the current memories, wait for them, export everything."""
        self.push(method)
        self.flush()
        return self._wait(self._call("export"))

    def restore(self, files: dict[str, bytes]) -> None:
        """Every rank (a collective): rank 0 puts a checkpoint's state back into the actor;
        no rank reads from it before that is done."""
        if self.rank == 0:
            self._wait(self._call("load_export", files))
        dist.barrier()


class LocalStateClient(StateClient):
    """The client over a `SharedState` living in this process (train_local, tests)."""

    def _call(self, name: str, *args: Any) -> Any:
        return getattr(self.actor, name)(*args)

    def _wait(self, ref: Any) -> Any:
        return ref

    def _in_flight(self) -> bool:
        self._pending = []
        return False


def load_memories(method: nn.Module, arrays: dict[str, dict[str, np.ndarray]]) -> None:
    """Put snapshots (name -> buffers) back into a method's memories (eval, predict)."""
    for name, memory in memories_of(method).items():
        if name in arrays:
            memory.load_state_dict({k: torch.from_numpy(v) for k, v in arrays[name].items()})
