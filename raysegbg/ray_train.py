"""Ray glue for training: start/join Ray, run `train_worker` in a TorchTrainer, collect results.

The only training module that imports Ray, so a Ray API change touches this file (and `tune`).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from raysegbg import failures, ray_logs, storage
from raysegbg.checkpoint import KEEP_BEST
from raysegbg.config import Config, from_dict, replace, save_config, to_dict
from raysegbg.environment import write_environment
from raysegbg.errors import RaysegbgError
from raysegbg.registry import method_class
from raysegbg.state import actor as state_actor
from raysegbg.storage import Location

if TYPE_CHECKING:
    from raysegbg.data.format import DatasetMeta


@dataclass
class RunResult:
    run_dir: Location  # a Path, or a URI when the storage path is one
    metrics: dict[str, float]  # last epoch's
    best_checkpoint: Location | None
    seconds: float


def resolve_run(cfg: Config, method_tag: str | None = None) -> Config:
    """Absolute storage path and a concrete run name, decided once on the driver."""
    name = cfg.logging.name or f"{method_tag or cfg.method.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    # workers run in another directory: every local path becomes absolute here
    changes = {
        "logging": {"name": name, "storage_path": _absolute(cfg.logging.storage_path)},
        "data": {"path": _absolute(cfg.data.path)},
    }
    if cfg.model.weights_path:
        changes["model"] = {"weights_path": _absolute(cfg.model.weights_path)}
    return replace(cfg, **changes)


def _absolute(path: str) -> str:
    return path if "://" in path else str(Path(path).expanduser().resolve())


def preflight(cfg: Config, address: str | None) -> DatasetMeta:
    """Everything that can be checked without Ray, so bad input fails in a second; returns
    the dataset's metadata."""
    from raysegbg.config import check_score
    from raysegbg.data.format import read_meta, read_split
    from raysegbg.models import check_model_builds, check_model_config

    check_model_config(cfg.model)
    for where in (cfg.logging.storage_path, cfg.data.path):
        if storage.is_uri(where):
            storage.check(where)
    meta = read_meta(cfg.data.path)
    check_score(cfg.logging.score, meta.classes)
    check_model_builds(cfg.model, meta.channels, meta.num_classes)
    method_class(cfg.method.name).check_data(cfg, meta.num_classes)
    for split in ("train", cfg.data.val_split):
        read_split(cfg.data.path, split, columns=["id"])
    if address:
        check_address(address)
    return meta


def check_address(address: str, timeout: float = 3.0) -> None:
    """Fail fast (one line) when a cluster address does not answer."""
    if address in ("auto", "local"):
        return
    url = urlparse(address if "://" in address else f"ray://{address}")
    host, port = url.hostname, url.port or (10001 if url.scheme == "ray" else 6379)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise RaysegbgError(
            f"cannot reach a Ray cluster at {address} ({exc.strerror or exc}): start one with "
            "`ray start --head` or leave out --address to train on a local Ray"
        ) from None


def init_ray(address: str | None = None) -> None:
    """Join `address`, or start a private local Ray (dashboard on 127.0.0.1)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    kwargs: dict[str, Any] = {"log_to_driver": True, "configure_logging": False}
    if address:
        ray.init(address=address, **kwargs)
        return
    port = _free_port()
    # Train's placement-group cleaner (a detached actor) asks the State API whether a run's
    # controller is still alive; without this variable it auto-detects the cluster, which fails
    # when several Ray instances share the machine, and the placement group of a killed run
    # (a trial stopped by ASHA) is never freed: the next trial waits forever. Workers inherit
    # the environment of the Ray started here, so set it before starting.
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    # Nothing preempts this machine the way a cloud provider drains a spot node, so Train V2's
    # preemption watcher has nothing to watch here. Off, it costs no actor process polling in
    # the background (benchmarks/train_overhead.py measures that work on a small node) and no
    # error line on every run's console (Ray's own warning about the watcher's constructor
    # arguments, ray-project/ray#53727). Train's health check keeps its default: a worker's
    # report waits for the controller's next poll, so a longer interval would stretch every
    # short epoch.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    ray.init(
        address="local", include_dashboard=True, dashboard_host="127.0.0.1",
        dashboard_port=port, runtime_env={"worker_process_setup_hook": ray_logs.SETUP_HOOK},
        **kwargs,
    )  # fmt: skip
    failures.watch_local_head()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_entry(loop_config: dict[str, Any]) -> None:
    """Runs inside every Ray Train worker."""
    import ray.train
    import torch

    from raysegbg.train import WorkerContext, train_worker

    _quiet_report_log()
    cfg = from_dict(loop_config["config"])
    torch.set_num_threads(loop_config["threads"])
    context = ray.train.get_context()
    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
    ctx = WorkerContext(
        run_dir=storage.location(loop_config["run_dir"]),
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        device=device,
        report=_ray_report,
        restore=_ray_restore,
        # Train V2 tees print() to its log file and the console (printed twice): log instead
        log=logging.getLogger("raysegbg").info,
    )
    if loop_config.get("state_actor"):
        from raysegbg.state.actor import lookup
        from raysegbg.state.client import StateClient

        actor = lookup(loop_config["state_actor"])
        ctx.state = StateClient(actor, cfg.train.snapshot_every, ctx.rank)
    if cfg.train.reuse_stages:
        from raysegbg.state.sharing import Sharing, local_service

        name = loop_config.get("results_actor")  # a search's service, else the run's own
        if name:
            service = ray.get_actor(name, namespace=state_actor.NAMESPACE)
        else:
            service = local_service(cfg.logging.storage_path)
        ctx.sharing = Sharing(service, cfg.logging.name, ctx.rank, ctx.log)
    train_worker(cfg, ctx)


def _quiet_report_log() -> None:
    """Train V2 logs every report, metrics dict included, at INFO through a logger named by
    its file path (so LoggingConfig does not reach it): keep one progress line per epoch."""
    try:
        from ray.train.v2._internal.execution import context as train_context

        train_context.logger.setLevel(logging.WARNING)
    except (ImportError, AttributeError):  # a Ray version without that module: stay verbose
        pass


def _ray_report(metrics: dict[str, float], checkpoint_dir: Path | None, name: str) -> None:
    import ray.train

    from raysegbg.tb import sync_all

    sync_all()  # a run in an object store: this epoch's TensorBoard files go up with it
    checkpoint = (
        ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
    )
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)


def _ray_restore() -> dict[str, Any] | None:
    import ray.train

    from raysegbg.checkpoint import load_state

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        return load_state(Path(directory))


def fit(cfg: Config, address: str | None = None) -> RunResult:
    """Train one run on Ray; re-running the same run name resumes it at the next epoch."""
    cfg = resolve_run(cfg)
    preflight(cfg, address)
    init_ray(address)
    start = time.perf_counter()
    try:
        with failures.on_sigterm(_interrupt):
            result = run_trainer(cfg)
        if result.error:
            raise result.error
    except Exception as exc:  # a known cause (memory pressure) in one line, else as Ray gave it
        known = failures.explain(exc, f"run {cfg.logging.name!r}")
        if known is None:
            raise
        raise known from exc
    best = result.get_best_checkpoint(cfg.logging.score, "max") if result.best_checkpoints else None
    run_dir = storage.join(cfg.logging.storage_path, cfg.logging.name)
    if best and storage.is_uri(run_dir):  # Ray gives the path on the store, without the scheme
        best_path = run_dir / PurePosixPath(best.path).name
    else:
        best_path = Path(best.path) if best else None
    return RunResult(
        run_dir=run_dir,
        metrics=dict(result.metrics or {}),
        best_checkpoint=best_path,
        seconds=time.perf_counter() - start,
    )


def _interrupt(previous: Any) -> None:
    """SIGTERM stops a run as Ctrl+C does (KeyboardInterrupt): Ray's handler, installed by
    `ray.init`, would abort the driver (exit -6, a C++ stack dump). The checkpoints already
    written stay; the same command resumes."""
    raise KeyboardInterrupt


def run_trainer(cfg: Config, callbacks: list[Any] | None = None, results: str | None = None) -> Any:
    """Run a resolved config on the connected Ray: run folder, config.yaml, environment.json,
    the shared-state actor if the method needs one, and TorchTrainer.fit. Returns Ray Train's
    Result. `results`: the name of a search's stage-results actor (`state/results.py`).

    `fit` and every Tune trial (`raysegbg.tune`, which adds its report callback) call this.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    run_dir = storage.join(cfg.logging.storage_path, cfg.logging.name)
    save_run_config(cfg, run_dir)
    write_environment(run_dir)
    workers = cfg.scaling.workers
    cpus = cfg.scaling.cpus_per_worker or max(
        1, int(ray.cluster_resources().get("CPU", 1)) // workers
    )
    loop_config = {"config": to_dict(cfg), "run_dir": str(run_dir), "threads": cpus,
                   "results_actor": results}  # fmt: skip
    needs_state = method_class(cfg.method.name).needs_shared_state
    if needs_state:  # one actor per run, owned by this driver, killed when the run ends
        # keep the handle: an unreferenced (non-detached) actor is destroyed right away
        state_name = state_actor.unique_name(cfg.logging.name)
        actor = state_actor.create(state_name, run_dir / "state")  # noqa: F841
        loop_config["state_actor"] = state_name
    trainer = TorchTrainer(
        _worker_entry,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=_num_workers(cfg),
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cpus},
        ),
        run_config=ray.train.RunConfig(
            name=cfg.logging.name,
            storage_path=cfg.logging.storage_path,
            checkpoint_config=ray.train.CheckpointConfig(
                # Ray keeps the top `num_to_keep` by score plus always the latest. With 1, a run
                # whose latest is also its best has a single checkpoint, and nothing to fall
                # back to if that one is cut short; with 2 there are always at least two
                # (`checkpoint.load_checkpoint` skips an unreadable one).
                num_to_keep=KEEP_BEST,
                checkpoint_score_attribute=cfg.logging.score,
                checkpoint_score_order="max",
            ),
            failure_config=ray.train.FailureConfig(max_failures=cfg.logging.max_failures),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            callbacks=callbacks,
        ),
    )
    try:
        return trainer.fit()
    finally:
        if needs_state:
            state_actor.destroy(state_name)


def _num_workers(cfg: Config) -> int | tuple[int, int]:
    """Ray Train's worker count: `workers`, or with `min_workers` the elastic (min, max) range.

    A fixed group that loses a node waits (retrying every 60 s) until a node with room comes
    back; an elastic one restarts from the last checkpoint on the workers that fit."""
    low, high = cfg.scaling.min_workers, cfg.scaling.workers
    return (low, high) if 0 < low < high else high


def save_run_config(cfg: Config, run_dir: Location) -> None:
    """`<run>/config.yaml` (what `eval` reads back), in a local folder or an object store."""
    with tempfile.TemporaryDirectory(prefix="raysegbg-config-") as tmp:
        save_config(cfg, Path(tmp) / "config.yaml")
        storage.upload_file(Path(tmp) / "config.yaml", run_dir / "config.yaml")


def print_summary(result: RunResult, file=sys.stdout) -> None:
    """The end-of-run table, plus where to look next."""
    m = result.metrics
    rows = [
        ("run", str(result.run_dir)),
        ("epochs", f"{int(m.get('epoch', 0))}"),
        ("val mIoU", f"{m.get('val/miou', float('nan')):.4f}"),
        ("val fg Dice", f"{m.get('val/fg_dice', float('nan')):.4f}"),
        ("val precision", f"{m.get('val/precision', float('nan')):.4f}"),
        ("val recall", f"{m.get('val/recall', float('nan')):.4f}"),
        ("val FPR", f"{m.get('val/fpr', float('nan')):.5f}"),
        ("best score", f"{m.get('best_score', float('nan')):.4f}"),
        ("best checkpoint", str(result.best_checkpoint or "-")),
        ("throughput", f"{m.get('perf/images_per_s', float('nan')):.0f} img/s"),
        ("wall time", f"{result.seconds:.0f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n" + "-" * 60, file=file)
    for key, value in rows:
        print(f"{key:<{width}}  {value}", file=file)
    print("-" * 60, file=file)
    tb = result.run_dir / "tb"
    if storage.is_uri(tb):  # TensorBoard does not speak pyarrow's URI options: copy it first
        print(f"TensorBoard: event files in {tb} (copy them, then tensorboard --logdir)", file=file)
    else:
        print(f"TensorBoard: tensorboard --logdir {tb}", file=file)
