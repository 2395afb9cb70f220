"""A run's side of shared stage results (`results.py`): reuse a stage another run or trial
computed, or compute it and publish it.

At the first epoch of a stage the method declares shareable (`Method.shared_stage`), rank 0
claims the stage's key from the service. `ready`: every rank loads the result (the stage's
parameters and buffers, and the best score the stage reached) and the run goes on at the next
stage, as if it had trained the stage itself. `wait`: another run or trial is computing it;
rank 0 polls until it is published (or its claim lapses and this run takes it over).
`compute`: the run trains the stage, renewing its claim meanwhile, and publishes the result at
the stage's end. Results are identical to computing them here: the key holds everything that
determines them and each stage starts from its own seed (`Trainer.enter_stage`).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

from raysegbg import dist, storage
from raysegbg.checkpoint import load_state, save_checkpoint
from raysegbg.data.format import META_FILE, DatasetMeta
from raysegbg.methods.base import SharedStage
from raysegbg.state.results import (
    RESULTS_DIR,
    StageResults,
    caller,
    keep_claim,
    settle,
    stage_key,
    write_data,
)

POLL_S = 1.0


def dataset_fingerprint(path: str | Path) -> str:
    """What identifies a dataset's contents cheaply: its dataset.json and every shard's size
    (a dataset made again differently at the same path gets another fingerprint)."""
    text = storage.read_text(storage.join(path, META_FILE))
    sizes = []
    for name in DatasetMeta.from_dict(json.loads(text)).shards:
        fs, fs_path = storage.resolve(storage.join(path, name))
        sizes.append((name, fs.get_file_info(fs_path).size))
    return hashlib.sha256(json.dumps([text, sizes]).encode()).hexdigest()[:20]


def local_service(storage_path: str) -> StageResults:
    """A run's own service (no search around it): claims in this process, results shared
    through storage with every later run."""
    return StageResults(str(storage.join(storage_path, RESULTS_DIR)))


class Sharing:
    """Stage results for one worker. `service` is a StageResults or an actor handle of one
    (rank 0 only talks to it); `owner` names this run (its claims survive a restart)."""

    def __init__(self, service: Any, owner: str, rank: int, log=print, poll_s: float = POLL_S):
        self.ask = caller(service, _ray_get) if rank == 0 else None
        self.owner, self.rank, self.log, self.poll_s = owner, rank, log, poll_s
        self.held: str | None = None  # the key whose claim this run holds while computing
        self._renewing: threading.Event | None = None  # set: stop renewing the claim

    def key(self, share: SharedStage, data_path: str, seed: int) -> str:
        return stage_key(share.name, dataset_fingerprint(data_path), share.settings, seed,
                         share.version)  # fmt: skip

    def begin(self, key: str) -> dict[str, Any] | None:
        """At the stage's first epoch: the published result's state (every rank), or None
        when this run computes it."""
        path = None
        if self.rank == 0:
            path = self._claim(key)
        path = dist.broadcast_object(path)
        if path is None:
            return None
        state = load_state(storage.location(path))
        if self.rank == 0:
            self.ask("used_by", key, self.owner)
        return state

    def _claim(self, key: str) -> str | None:
        def waiting(holder: str) -> None:
            self.log(f"waiting for stage result {key}: {holder} computes it")

        answer = settle(self.ask, key, self.owner, self.poll_s, waiting)
        if answer["state"] == "ready":
            return answer["path"]
        self.held = key
        self._renewing = keep_claim(self.ask, key, self.owner, answer["lease_s"])
        return None

    def _stop_renewing(self) -> None:
        if self._renewing is not None:
            self._renewing.set()
            self._renewing = None

    def publish(self, key: str, state: dict[str, Any], meta: dict[str, Any]) -> bool:
        """At the stage's end (rank 0): write and publish the result; False when it was not
        (another producer published it first: the same result)."""
        if self.rank != 0:
            return False
        answer = self.ask("claim", key, self.owner)  # held, taken back after a restart, or done
        self._stop_renewing()
        self.held = None
        if answer["state"] != "compute":
            return False
        with tempfile.TemporaryDirectory(prefix="stage-") as tmp:
            save_checkpoint(Path(tmp), state, meta)
            write_data(Path(tmp), storage.location(answer["path"]))
        return bool(self.ask("publish", key, self.owner, meta))

    def abandon(self) -> None:
        """The run failed or stopped while computing: another run or trial may take over."""
        self._stop_renewing()
        if self.held is not None and self.rank == 0:
            self.ask("release", self.held, self.owner)
        self.held = None


def _ray_get(ref: Any) -> Any:
    import ray

    return ray.get(ref)


def stage_state(method: torch.nn.Module, share: SharedStage) -> dict[str, torch.Tensor]:
    """The parameters and buffers of `method` the stage produced."""
    return {k: v for k, v in method.state_dict().items() if k.startswith(share.prefixes)}
