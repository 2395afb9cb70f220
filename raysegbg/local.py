"""Run the training loop in this process, without Ray (tests, benchmarks, debugging).

Checkpoints land in the run folder exactly where Ray Train would put them, so `eval`,
`predict` and resuming work the same way.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from raysegbg.checkpoint import list_checkpoints, load_checkpoint, prune_checkpoints
from raysegbg.config import Config, save_config
from raysegbg.environment import write_environment
from raysegbg.ray_train import resolve_run
from raysegbg.registry import method_class
from raysegbg.state.actor import SharedState
from raysegbg.state.client import LocalStateClient
from raysegbg.state.sharing import Sharing, local_service
from raysegbg.train import WorkerContext, train_worker


class LocalHost:
    """The host side of a WorkerContext for a single local process."""

    def __init__(self, run_dir: Path, score: str = "val/miou"):
        self.run_dir = Path(run_dir)
        self.score = score  # which checkpoints are kept, as Ray's CheckpointConfig keeps them
        self.reports: list[dict[str, float]] = []

    def report(self, metrics: dict[str, float], checkpoint: Path | None, name: str) -> None:
        self.reports.append(dict(metrics))
        if checkpoint is not None:
            target = self.run_dir / name
            tmp = self.run_dir / f".{name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(checkpoint, tmp)
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
            prune_checkpoints(self.run_dir, self.score)

    def restore(self) -> dict[str, Any] | None:
        """The newest readable checkpoint's state (a truncated newest one falls back)."""
        if not list_checkpoints(self.run_dir):
            return None
        return load_checkpoint(self.run_dir, "last")[1]

    def context(self, **kwargs: Any) -> WorkerContext:
        return WorkerContext(
            run_dir=self.run_dir, report=self.report, restore=self.restore, **kwargs
        )


def train_local(
    cfg: Config, run_dir: Path | None = None, **kwargs: Any
) -> tuple[dict[str, float], LocalHost]:
    """Train (or resume) a run in-process; returns the last metrics and the host (whose
    `run_dir` is the run folder). `run_dir` defaults to `<logging.storage_path>/<name>`, the
    folder `raysegbg train` would use (a name is made up when the config has none)."""
    if run_dir is None:
        cfg = resolve_run(cfg)
        run_dir = Path(cfg.logging.storage_path) / cfg.logging.name
    host = LocalHost(run_dir, cfg.logging.score)
    host.run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, host.run_dir / "config.yaml")
    write_environment(host.run_dir)
    if cfg.train.reuse_stages and "sharing" not in kwargs:
        service = local_service(cfg.logging.storage_path or str(host.run_dir.parent))
        kwargs["sharing"] = Sharing(service, host.run_dir.name, 0, kwargs.get("log", print))
    if method_class(cfg.method.name).needs_shared_state and "state" not in kwargs:
        # the shared state in-process: same snapshots, store and checkpoints as the actor's
        state = SharedState(str(host.run_dir / "state"))
        kwargs["state"] = LocalStateClient(state, cfg.train.snapshot_every)
    return train_worker(cfg, host.context(**kwargs)), host
