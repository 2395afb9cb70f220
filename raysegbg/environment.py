"""`<run>/environment.json`: what software a run was started with, so it can be reproduced.

Package versions come from the installed distributions' metadata (no import of Ray); the git
commit is that of the checkout raysegbg runs from, when it runs from one (an installed wheel,
or a Ray job's copy of the project, has none: `git` is then null).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from raysegbg import storage
from raysegbg.storage import Location

FILE = "environment.json"
PACKAGES = {  # key in the record -> distribution name
    "torch": "torch",
    "ray": "ray",
    "smp": "segmentation-models-pytorch",
    "raysegbg": "raysegbg",
}
# what may differ between two starts of one environment
VOLATILE = ("started", "earlier", "ray_address")


@contextlib.contextmanager
def environ(**values: str | None) -> Iterator[None]:
    """Set these environment variables (None: remove one) for the block, then put back what
    was there before."""
    saved = {name: os.environ.get(name) for name in values}

    def apply(changes: dict[str, str | None]) -> None:
        for name, value in changes.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    apply(values)
    try:
        yield
    finally:
        apply(saved)


def environment() -> dict[str, Any]:
    """Versions, platform and git state of this process."""
    record: dict[str, Any] = {"python": platform.python_version()}
    record.update({key: _version(dist) for key, dist in PACKAGES.items()})
    import torch  # already imported by whoever trains

    record["cuda"] = torch.version.cuda
    record["platform"] = platform.platform()
    record["git"] = git_state(Path(__file__).resolve().parent.parent)
    record["started"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    record["ray_address"] = _ray_address()
    return record


def _ray_address() -> str | None:
    """The GCS address of the Ray this process is connected to (which cluster ran the run)."""
    ray = sys.modules.get("ray")  # never imports Ray
    if ray is None or not ray.is_initialized():
        return None
    return ray.get_runtime_context().gcs_address


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def git_state(root: Path) -> dict[str, Any] | None:
    """{"commit", "dirty"} of the git checkout whose top folder is `root`; None when `root`
    is no checkout's top (e.g. site-packages inside some other repository) or git is missing.
    Dirty: tracked changes or untracked files that are not ignored."""
    top = _git(root, "rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != root.resolve():
        return None
    commit = _git(root, "rev-parse", "HEAD")
    status = _git(root, "status", "--porcelain")
    if commit is None or status is None:
        return None
    return {"commit": commit, "dirty": bool(status)}


def _git(root: Path, *args: str) -> str | None:
    # no optional locks: `git status` must not touch the index of a checkout someone works in
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                             timeout=10, env=env, check=False)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def write_environment(run_dir: Location) -> dict[str, Any]:
    """Write this process's environment to the run folder (whole: temp file and rename, or
    one object-store write). A resumed run started in a different environment keeps the
    earlier record(s) under `earlier`. Returns what was written."""
    target = storage.join(run_dir, FILE)
    record = environment()
    previous = read_environment(run_dir)
    if previous is not None:
        earlier = previous.pop("earlier", [])
        if _core(previous) != _core(record):
            earlier = [*earlier, previous]
        if earlier:
            record["earlier"] = earlier
    storage.write_text(target, json.dumps(record, indent=1) + "\n")
    return record


def read_environment(run_dir: Location) -> dict[str, Any] | None:
    """A run's environment record; None when it has none (or an unreadable one)."""
    target = storage.join(run_dir, FILE)
    try:
        if not storage.is_file(target):
            return None
        record = json.loads(storage.read_text(target))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _core(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in VOLATILE}
