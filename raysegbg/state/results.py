"""Stage results computed once and shared: by every rank of a run, by later runs, and by every
trial of a search that agrees on what determines them.

A stage's output (a trained base, pseudo-labels, CAM masks) gets a key from everything that
determines it: the dataset's fingerprint, the config keys the stage reads, the seed and the
stage's code version (`stage_key`). Results live under `<storage>/stage_results/<key>/`:
`data/` (the stage's files) and `meta.json`, written last, so a folder without `meta.json` is
an unfinished one and never read.

Who computes is decided by the `StageResults` actor (one per search or run): the first caller
of `claim` gets the key and computes; a caller that finds the key claimed waits; a claim whose
producer stops renewing it (it crashed, or its trial was killed) lapses after `lease_s`, and
the next caller takes it over. `obtain` is that protocol on the caller's side.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raysegbg import storage
from raysegbg.state.actor import NAMESPACE
from raysegbg.storage import Location

RESULTS_DIR = "stage_results"
META = "meta.json"
LEASE_S = 30.0  # a claim not renewed for this long is taken to be dead


def stage_key(stage: str, dataset: str, config: dict[str, Any], seed: int, version: str) -> str:
    """The content key of a stage result (hex, 20 chars): equal inputs, equal key."""
    what = {"stage": stage, "dataset": dataset, "config": config, "seed": seed, "version": version}
    digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()
    return f"{stage}-{digest[:20]}"


class StageResults:
    """Actor body (a plain class: testable without Ray). Claims live in memory; results on
    storage, so a restarted actor forgets only claims, which lapse anyway."""

    def __init__(self, root: str, lease_s: float = LEASE_S):
        self.root = storage.location(root)
        self.lease_s = lease_s
        self.claims: dict[str, tuple[str, float]] = {}  # key -> (owner, last renewal)

    def claim(self, key: str, owner: str) -> dict[str, Any]:
        """{"state": "ready", "path"} when published; "compute" when `owner` now holds the
        claim; "wait" (with the holder) while another live owner computes it."""
        if storage.is_file(storage.join(self.root, key, META)):
            self.claims.pop(key, None)
            return {"state": "ready", "path": str(storage.join(self.root, key, "data"))}
        holder = self.claims.get(key)
        now = time.monotonic()
        if holder and holder[0] != owner and now - holder[1] < self.lease_s:
            return {"state": "wait", "holder": holder[0]}
        self.claims[key] = (owner, now)
        path = str(storage.join(self.root, key, "data"))
        return {"state": "compute", "path": path, "lease_s": self.lease_s}

    def renew(self, key: str, owner: str) -> bool:
        """Keep `owner`'s claim alive; False when it has lapsed to someone else."""
        holder = self.claims.get(key)
        if holder is None or holder[0] != owner:
            return False
        self.claims[key] = (owner, time.monotonic())
        return True

    def release(self, key: str, owner: str) -> None:
        """Drop `owner`'s claim (its computation failed): the next caller computes."""
        if self.claims.get(key, ("",))[0] == owner:
            del self.claims[key]

    def publish(self, key: str, owner: str, meta: dict[str, Any]) -> bool:
        """Mark the result `owner` wrote under `<key>/data` complete (meta.json last).
        False when `owner` no longer holds the claim."""
        target = storage.join(self.root, key, META)
        if self.claims.get(key, ("",))[0] != owner or storage.is_file(target):
            return False
        record = {**meta, "key": key, "producer": owner, "created": time.time(), "users": []}
        storage.write_text(target, json.dumps(record, indent=1, default=str) + "\n")
        self.claims.pop(key, None)
        return True

    def used_by(self, key: str, user: str) -> None:
        """Record that run/trial `user` used the result (`raysegbg state ls` shows them)."""
        target = storage.join(self.root, key, META)
        record = json.loads(storage.read_text(target))
        if user not in record["users"]:
            record["users"].append(user)
            storage.write_text(target, json.dumps(record, indent=1, default=str) + "\n")


def obtain(
    service: Any,
    key: str,
    compute: Callable[[Path], dict[str, Any]],
    owner: str | None = None,
    poll_s: float = 0.5,
    call: Callable[[Any], Any] = lambda result: result,
) -> tuple[Path | str, bool]:
    """The result of `key`: loaded when published, else computed here once.

    `compute(folder)` writes the result's files into a fresh local folder and returns what
    `meta.json` records of it (config, sizes). `service` is a `StageResults` or an actor handle
    of one; `call` turns a method call's return into its value (`ray.get` for an actor).
    Returns (where the result's files are, whether this caller computed them).
    """
    owner = owner or uuid.uuid4().hex[:12]
    ask = caller(service, call)
    while True:
        answer = settle(ask, key, owner, poll_s)
        if answer["state"] == "ready":
            return storage.location(answer["path"]), False
        dest = storage.location(answer["path"])
        if _compute(ask, key, owner, dest, compute, answer["lease_s"]):
            return dest, True
        # the claim lapsed while computing (this process stalled) and another producer took
        # it over: their result is the same; wait for it rather than write over it


def settle(
    ask, key: str, owner: str, poll_s: float, on_wait: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Claim `key` until it is published (`ready`) or `owner` holds it (`compute`); while
    another live owner computes it, wait (telling `on_wait` the holder, once)."""
    told = False
    while True:
        answer = ask("claim", key, owner)
        if answer["state"] != "wait":
            return answer
        if on_wait is not None and not told:
            on_wait(answer["holder"])
            told = True
        time.sleep(poll_s)


def keep_claim(ask, key: str, owner: str, lease_s: float) -> threading.Event:
    """Renew `owner`'s claim well inside the lease from a background thread, until the
    returned event is set."""
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(lease_s / 4):
            ask("renew", key, owner)

    threading.Thread(target=renew, daemon=True).start()
    return stop


def _compute(ask, key: str, owner: str, dest: Location, compute, lease_s: float) -> bool:
    """Compute, write and publish under `owner`'s claim; False when the claim was lost."""
    stop = keep_claim(ask, key, owner, lease_s)
    try:
        with tempfile.TemporaryDirectory(prefix="stage-") as tmp:
            meta = compute(Path(tmp))
            if not ask("renew", key, owner):
                return False
            write_data(Path(tmp), dest)
        return ask("publish", key, owner, meta)
    except BaseException:
        ask("release", key, owner)
        raise
    finally:
        stop.set()


def write_data(src: Path, dest: Location) -> None:
    """The result's files under `<key>/data`: a local folder appears whole (temp + rename);
    on an object store the files are uploaded and `meta.json`, written after, marks them."""
    if storage.is_uri(dest):
        storage.delete_dir(dest)  # what an earlier, dead producer may have left
        storage.upload_dir(src, dest)
        return
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=".data-", dir=dest.parent))
    try:
        shutil.copytree(src, staged, dirs_exist_ok=True)
        if dest.exists():  # left by a producer that died before publishing
            shutil.rmtree(dest)
        staged.rename(dest)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


def caller(service: Any, call: Callable[[Any], Any]) -> Callable[..., Any]:
    """`ask(method, *args)`: the call on a StageResults, or on an actor handle of one (its
    return passed through `call`, e.g. `ray.get`)."""

    def ask(method: str, *args: Any) -> Any:
        fn = getattr(service, method)
        remote = getattr(fn, "remote", None)
        return call(remote(*args)) if remote else fn(*args)

    return ask


# -- listing and removal (`raysegbg state ls|show|rm`) ---------------------------------------
def list_results(storage_path: str) -> list[dict[str, Any]]:
    """Every published result under the storage path, with its size in bytes."""
    root = storage.join(storage_path, RESULTS_DIR)
    if not storage.exists(root):
        return []
    out = []
    for key in sorted(storage.listdir(root)):
        meta = storage.join(root, key, META)
        if storage.is_file(meta):
            record = json.loads(storage.read_text(meta))
            record["bytes"] = _size(storage.join(root, key, "data"))
            out.append(record)
    return out


def remove_result(storage_path: str, key: str) -> None:
    storage.delete_dir(storage.join(storage_path, RESULTS_DIR, key))


def _size(loc: Location) -> int:
    fs, path = storage.resolve(loc)
    from pyarrow import fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sum(i.size or 0 for i in infos if i.type == pafs.FileType.File)


# -- the actor ---------------------------------------------------------------------------------
def start_service(name: str, storage_path: str, lease_s: float = LEASE_S):
    """Start the stage-results actor of a search or run. `name` must be unique to it (a
    search's or run's own id): two drivers never share one, nor kill each other's."""
    import ray

    remote = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(StageResults)
    root = str(storage.join(storage_path, RESULTS_DIR))
    return remote.options(name=service_name(name), namespace=NAMESPACE).remote(root, lease_s)


def service_name(name: str) -> str:
    """The actor name of `start_service(name, ...)` (namespace `NAMESPACE`)."""
    return f"results-{name}"
