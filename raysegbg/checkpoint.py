"""Checkpoint folders: `epoch_NNNN/` holding `state.pt` (tensors) and `meta.json` (metrics).

Ray Train keeps the best checkpoint by the run's score plus the latest one; `eval` and
`predict` find them again by reading the small `meta.json` files, so nothing depends on Ray's
private bookkeeping.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import torch

from raysegbg import storage
from raysegbg.config import Config, load_config
from raysegbg.errors import RaysegbgError
from raysegbg.storage import Location

STATE_FILE = "state.pt"
META_FILE = "meta.json"


def checkpoint_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}"


def save_checkpoint(directory: Path, state: dict[str, Any], meta: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / STATE_FILE)
    (directory / META_FILE).write_text(json.dumps(meta, indent=1, default=float))
    return directory


SHARED_DIR = "shared"  # the shared-state actor's export (memories, pseudo-labels)


def save_shared(directory: Path, files: dict[str, bytes]) -> None:
    (directory / SHARED_DIR).mkdir(exist_ok=True)
    for name, data in files.items():
        (directory / SHARED_DIR / name).write_bytes(data)


def load_state(directory: Location, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The training state of a checkpoint, plus its shared-state files under "shared".

    A checkpoint in an object store is downloaded to a temporary folder first.
    """
    if not storage.is_file(storage.join(directory, STATE_FILE)):
        raise RaysegbgError(f"{directory} is not a raysegbg checkpoint (no {STATE_FILE})")
    if storage.is_uri(directory):
        with tempfile.TemporaryDirectory(prefix="raysegbg-ckpt-") as tmp:
            return load_state(storage.download_dir(directory, Path(tmp)), map_location)
    state = torch.load(Path(directory) / STATE_FILE, map_location=map_location, weights_only=False)
    shared = Path(directory) / SHARED_DIR
    if shared.is_dir():
        state["shared"] = {p.name: p.read_bytes() for p in shared.iterdir() if p.is_file()}
    return state


def list_checkpoints(run_dir: Location) -> list[tuple[Location, dict[str, Any]]]:
    """(folder, meta) of every complete checkpoint of a run, oldest first; a run in an object
    store gives URIs."""
    found = []
    for entry in storage.listdir(run_dir):
        folder = storage.join(run_dir, entry)
        meta = storage.join(folder, META_FILE)
        if not entry.startswith("epoch_") or not storage.is_file(meta):
            continue
        if storage.is_file(storage.join(folder, STATE_FILE)):
            found.append((folder, json.loads(storage.read_text(meta))))
    return found


def pick_checkpoint(run_dir: Location, which: str = "best", score: str = "val/miou") -> Location:
    """The best (highest `score`) or the last checkpoint of a finished or running run."""
    found = list_checkpoints(run_dir)
    if not found:
        raise RaysegbgError(
            f"no checkpoint in {run_dir}: pass the run folder printed by `raysegbg train` "
            "(<storage_path>/<run name>)"
        )
    if which == "last":
        return max(found, key=lambda f: f[1]["epoch"])[0]

    def value(meta: dict[str, Any]) -> float:
        v = meta.get("metrics", {}).get(score, float("nan"))
        return -math.inf if v != v else v

    return max(found, key=lambda f: (value(f[1]), f[1]["epoch"]))[0]


def run_config(run_dir: Location) -> Config:
    """The config a run was trained with (its config.yaml, local or in an object store)."""
    if not storage.is_uri(run_dir):
        return load_config(Path(run_dir) / "config.yaml")
    with tempfile.TemporaryDirectory(prefix="raysegbg-run-") as tmp:
        local = Path(tmp) / "config.yaml"
        local.write_bytes(storage.read_bytes(storage.join(run_dir, "config.yaml")))
        return load_config(local)
