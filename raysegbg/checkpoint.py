"""Checkpoint folders: `epoch_NNNN/` holding `state.pt` (tensors) and `meta.json` (metrics).

Ray Train keeps the best checkpoint by the run's score plus the latest one; `eval` and
`predict` find them again by reading the small `meta.json` files, so nothing depends on Ray's
private bookkeeping.
"""

from __future__ import annotations

import io
import json
import math
import pickle
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from raysegbg import storage
from raysegbg.config import Config, load_config, to_dict
from raysegbg.data.format import DatasetMeta
from raysegbg.data.loader import PAD_MULTIPLE, PIXEL_SCALE
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


class UnreadableCheckpoint(RaysegbgError):
    """A checkpoint that is truncated or corrupt; an older one of the run may still be good."""


def load_state(directory: Location, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The training state of a checkpoint, plus its shared-state files under "shared".

    A checkpoint in an object store is downloaded to a temporary folder first.
    """
    if not storage.is_file(storage.join(directory, STATE_FILE)):
        raise RaysegbgError(f"{directory} is not a raysegbg checkpoint (no {STATE_FILE})")
    if storage.is_uri(directory):
        with tempfile.TemporaryDirectory(prefix="raysegbg-ckpt-") as tmp:
            local = storage.download_dir(directory, Path(tmp))
            try:
                return load_state(local, map_location)
            except RaysegbgError as exc:  # name the checkpoint, not the temporary copy
                raise type(exc)(str(exc).replace(str(local), str(directory))) from None
    state = _load_tensors(Path(directory) / STATE_FILE, map_location)
    shared = Path(directory) / SHARED_DIR
    if shared.is_dir():
        state["shared"] = {p.name: p.read_bytes() for p in shared.iterdir() if p.is_file()}
        for name, data in state["shared"].items():
            if not _whole(name, data):
                raise UnreadableCheckpoint(f"{shared / name} is truncated or corrupt")
    return state


def _whole(name: str, data: bytes) -> bool:
    """Whether a shared-state file is complete. Ray copies a checkpoint into its run folder in
    place, so a worker killed meanwhile can leave any file of it cut short."""
    if name.endswith(".parquet"):  # the magic bytes open and close a Parquet file
        return len(data) >= 8 and data[:4] == data[-4:] == b"PAR1"
    if name.endswith(".npz"):
        return zipfile.is_zipfile(io.BytesIO(data))
    if name.endswith(".json"):
        try:
            json.loads(data)
        except ValueError:
            return False
    return True


def _load_tensors(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    """torch.load that never runs code: a checkpoint holds only tensors, dicts, lists, numbers
    and strings, which `weights_only` reads without importing anything."""
    if not zipfile.is_zipfile(path):  # torch.save writes a zip; a cut one has lost its index
        raise UnreadableCheckpoint(f"{path} is truncated or corrupt (not a torch zip archive)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise RaysegbgError(
            f"{path} is not a raysegbg checkpoint (it holds code or objects other than tensors, "
            f"refused): {_reason(exc)}; pass a checkpoint written by `raysegbg train`"
        ) from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as exc:
        raise UnreadableCheckpoint(f"{path} is truncated or corrupt ({_reason(exc)})") from None
    if not isinstance(state, dict) or "method" not in state:
        raise RaysegbgError(
            f"{path} is not a raysegbg checkpoint (a torch file without the method's weights): "
            "pass a checkpoint written by `raysegbg train`"
        )
    return state


def _reason(exc: Exception) -> str:
    """The line of torch's long load error that says what is wrong."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in str(exc).splitlines()]
    lines = [line for line in lines if line and not line.startswith(boilerplate)]
    line = lines[0].split(". This is an internal")[0] if lines else ""
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def list_checkpoints(run_dir: Location) -> list[tuple[Location, dict[str, Any]]]:
    """(folder, meta) of every complete checkpoint of a run, oldest first; a run in an object
    store gives URIs. A folder whose meta.json is cut short is skipped with a warning."""
    found = []
    for entry in storage.listdir(run_dir):
        folder = storage.join(run_dir, entry)
        meta = storage.join(folder, META_FILE)
        if not entry.startswith("epoch_") or not storage.is_file(meta):
            continue
        if not storage.is_file(storage.join(folder, STATE_FILE)):
            continue
        try:
            found.append((folder, json.loads(storage.read_text(meta))))
        except ValueError:
            _warn(f"skipping checkpoint {folder}: its {META_FILE} is truncated or corrupt")
    return found


KEEP_BEST = 2  # checkpoints kept by score, besides the newest (Ray's `num_to_keep`)


def prune_checkpoints(run_dir: Path, score: str, keep: int = KEEP_BEST) -> None:
    """Remove a local run's checkpoints as Ray Train does: the `keep` best by `score` and the
    newest stay. An in-process run (`local.train_local`) would otherwise keep every epoch."""
    kept = set(ranked_checkpoints(run_dir, "best", score)[:keep])
    kept |= set(ranked_checkpoints(run_dir, "last", score)[:1])
    for folder, _ in list_checkpoints(run_dir):
        if folder not in kept:
            shutil.rmtree(folder)


def ranked_checkpoints(
    run_dir: Location, which: str = "best", score: str = "val/miou"
) -> list[Location]:
    """A run's checkpoint folders, the one to use first: by `score` (then epoch) for "best",
    by epoch for "last"."""
    found = list_checkpoints(run_dir)
    if not found:
        raise RaysegbgError(
            f"no checkpoint in {run_dir}: pass the run folder printed by `raysegbg train` "
            "(<storage_path>/<run name>)"
        )

    def value(meta: dict[str, Any]) -> float:
        v = meta.get("metrics", {}).get(score, float("nan"))
        return -math.inf if v != v else v

    if which == "last":
        found.sort(key=lambda f: f[1]["epoch"], reverse=True)
    else:
        found.sort(key=lambda f: (value(f[1]), f[1]["epoch"]), reverse=True)
    return [folder for folder, _ in found]


def pick_checkpoint(run_dir: Location, which: str = "best", score: str = "val/miou") -> Location:
    """The best (highest `score`) or the last checkpoint of a finished or running run."""
    return ranked_checkpoints(run_dir, which, score)[0]


def load_checkpoint(
    run_dir: Location, which: str = "best", score: str = "val/miou"
) -> tuple[Location, dict[str, Any]]:
    """The folder and state of the checkpoint `pick_checkpoint` names; if that one is
    truncated or corrupt (a crash while it was written), the next in line, with a warning.
    Ray keeps at least two checkpoints of a run for this (see `ray_train.run_trainer`)."""
    folders = ranked_checkpoints(run_dir, which, score)
    unreadable: list[str] = []
    for folder in folders:
        try:
            state = load_state(folder)
        except UnreadableCheckpoint as exc:
            unreadable.append(str(exc))
            continue
        for reason in unreadable:  # warned only now: a run with none readable gets one error
            _warn(f"{reason}: falling back to {folder}")
        return folder, state
    others = f" ({len(unreadable) - 1} more unreadable)" if len(unreadable) > 1 else ""
    raise RaysegbgError(
        f"no readable checkpoint in {run_dir}: {unreadable[0]}{others}; restore the run "
        "folder from a copy, or train the run again"
    )


def run_config(run_dir: Location) -> Config:
    """The config a run was trained with (its config.yaml, local or in an object store)."""
    if not storage.is_uri(run_dir):
        return load_config(Path(run_dir) / "config.yaml")
    with tempfile.TemporaryDirectory(prefix="raysegbg-run-") as tmp:
        local = Path(tmp) / "config.yaml"
        local.write_bytes(storage.read_bytes(storage.join(run_dir, "config.yaml")))
        return load_config(local)


INFERENCE_KEY = "inference"  # the checkpoint entry `inference_record` writes


def inference_record(cfg: Config, meta: DatasetMeta) -> dict[str, Any]:
    """What applying the weights needs besides the run's config: saved in every checkpoint, so
    `predict` and `export` work after the dataset is gone. Plain data only (`weights_only`
    reads it). Pixels are fed as (value - mean) / std on 0..255 values, the loader's
    `value / PIXEL_SCALE - 1`, padded right and below to a multiple of `pad_multiple`."""
    return {
        "version": 1,
        "method": cfg.method.name,
        "model": to_dict(cfg.model),
        "dataset": meta.name,
        "classes": list(meta.classes),
        "channels": meta.channels,
        "ignore_index": meta.ignore_index,
        "normalize": {"mean": [PIXEL_SCALE] * meta.channels, "std": [PIXEL_SCALE] * meta.channels},
        "pad_multiple": PAD_MULTIPLE,
    }


def recorded_meta(state: dict[str, Any]) -> DatasetMeta | None:
    """The dataset facts a checkpoint recorded (None for checkpoints written before they
    were): enough of a `DatasetMeta` to build and apply the method."""
    record = state.get(INFERENCE_KEY)
    if not isinstance(record, dict):
        return None
    return DatasetMeta(
        name=record.get("dataset", ""), classes=tuple(record["classes"]),
        ignore_index=record["ignore_index"], channels=record["channels"], image_size=None,
        splits={}, labeled={}, shards=(),
    )  # fmt: skip
