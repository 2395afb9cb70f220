"""Checkpoint folders: `epoch_NNNN/` holding `state.pt` (tensors) and `meta.json` (metrics).

Ray Train keeps the best checkpoint by the run's score plus the latest one; `eval` and
`predict` find them again by reading the small `meta.json` files, so nothing depends on Ray's
private bookkeeping.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from raysegbg.errors import RaysegbgError

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


def load_state(directory: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The training state of a checkpoint, plus its shared-state files under "shared"."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise RaysegbgError(f"{directory} is not a raysegbg checkpoint (no {STATE_FILE})")
    state = torch.load(path, map_location=map_location, weights_only=False)
    shared = Path(directory) / SHARED_DIR
    if shared.is_dir():
        state["shared"] = {p.name: p.read_bytes() for p in shared.iterdir() if p.is_file()}
    return state


def list_checkpoints(run_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    """(folder, meta) of every complete checkpoint of a run, oldest first."""
    found = []
    for meta_path in sorted(Path(run_dir).glob(f"epoch_*/{META_FILE}")):
        if (meta_path.parent / STATE_FILE).is_file():
            found.append((meta_path.parent, json.loads(meta_path.read_text())))
    return found


def pick_checkpoint(run_dir: Path, which: str = "best", score: str = "val/miou") -> Path:
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
