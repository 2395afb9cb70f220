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
import time
from pathlib import Path
from typing import Any

import torch

from raysegbg import dist, storage
from raysegbg.checkpoint import load_state, save_checkpoint
from raysegbg.data.format import META_FILE, read_meta, split_shards
from raysegbg.methods.base import SharedStage
from raysegbg.state.results import RESULTS_DIR, StageResults, _caller, _write_data, stage_key

POLL_S = 1.0


def dataset_fingerprint(path: str | Path) -> str:
    """What identifies a dataset's contents cheaply: its dataset.json and every shard's size
    (a dataset made again differently at the same path gets another fingerprint)."""
    text = storage.read_text(storage.join(path, META_FILE))
    meta = read_meta(path)
    sizes = []
    for split in meta.splits:
        if meta.splits[split]:
            for shard in split_shards(path, split):
                fs, fs_path = storage.resolve(shard)
                sizes.append((shard.name, fs.get_file_info(fs_path).size))
    return hashlib.sha256(json.dumps([text, sizes]).encode()).hexdigest()[:20]


def local_service(storage_path: str) -> StageResults:
    """A run's own service (no search around it): claims in this process, results shared
    through storage with every later run."""
    return StageResults(str(storage.join(storage_path, RESULTS_DIR)))


class Sharing:
    """Stage results for one worker. `service` is a StageResults or an actor handle of one
    (rank 0 only talks to it); `owner` names this run (its claims survive a restart)."""

    def __init__(self, service: Any, owner: str, rank: int, log=print, poll_s: float = POLL_S):
        self.ask = _caller(service, _ray_get) if rank == 0 else None
        self.owner, self.rank, self.log, self.poll_s = owner, rank, log, poll_s
        self.held: dict[str, Any] | None = None  # the claim being computed: key, path
        self._stop = threading.Event()

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
        waited = False
        while True:
            answer = self.ask("claim", key, self.owner)
            if answer["state"] == "ready":
                return answer["path"]
            if answer["state"] == "compute":
                self.held = {"key": key, "path": answer["path"]}
                self._renew(key, answer["lease_s"])
                return None
            if not waited:
                self.log(f"waiting for stage result {key}: {answer['holder']} computes it")
                waited = True
            time.sleep(self.poll_s)

    def _renew(self, key: str, lease_s: float) -> None:
        self._stop.clear()

        def keep() -> None:
            while not self._stop.wait(lease_s / 4):
                self.ask("renew", key, self.owner)

        threading.Thread(target=keep, daemon=True).start()

    def publish(self, key: str, state: dict[str, Any], meta: dict[str, Any]) -> bool:
        """At the stage's end (rank 0): write and publish the result; False when it was not
        (another producer published it first: the same result)."""
        if self.rank != 0:
            return False
        answer = self.ask("claim", key, self.owner)  # held, taken back after a restart, or done
        self._stop.set()
        self.held = None
        if answer["state"] != "compute":
            return False
        with tempfile.TemporaryDirectory(prefix="stage-") as tmp:
            save_checkpoint(Path(tmp), state, meta)
            _write_data(Path(tmp), storage.location(answer["path"]))
        return bool(self.ask("publish", key, self.owner, meta))

    def abandon(self) -> None:
        """The run failed or stopped while computing: another run or trial may take over."""
        self._stop.set()
        if self.held is not None and self.rank == 0:
            self.ask("release", self.held["key"], self.owner)
        self.held = None


def _ray_get(ref: Any) -> Any:
    import ray

    return ray.get(ref)


def stage_state(method: torch.nn.Module, share: SharedStage) -> dict[str, torch.Tensor]:
    """The parameters and buffers of `method` the stage produced."""
    return {k: v for k, v in method.state_dict().items() if k.startswith(share.prefixes)}
