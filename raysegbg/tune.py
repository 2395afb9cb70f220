"""Hyperparameter search on Ray Tune: Optuna (TPE) proposes, ASHA stops, Train trains.

Every trial is a small driver function that runs the same Train entry point as `raysegbg train`
(`ray_train.run_trainer`) with the sampled values, named `<search>_<nnn>_<values>`
(`trial_name`), and forwards each epoch's metrics to Tune. Everything lands in one folder,
`<storage>/<search name>/`: the trials' runs (`<trial name>/`: config, checkpoints, `tb/` with
the trial's one HParams session), `hparams/` (the HParams table's columns), `summary.csv`,
`best_config.yaml`, a plot (written by `tune_report`, uploaded when the storage is an object
store), and Tune's own state so an interrupted search can be resumed. Ray's status table shows
each trial's epoch and searched metric. The only module besides `ray_train` that imports Ray
Tune; the command line (`tune_commands`) imports this module, never the other way round.
"""

from __future__ import annotations

import os
import re
import signal
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import optuna
import ray.tune
import yaml
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch

from raysegbg import failures, storage
from raysegbg.config import Config, check_name, from_dict, load_config, replace, to_dict
from raysegbg.environment import environ
from raysegbg.errors import RaysegbgError
from raysegbg.ray_train import init_ray, preflight, resolve_run, run_trainer
from raysegbg.search_space import SearchSpace, apply_params, load_space, parse_space
from raysegbg.state.results import service_name, start_service
from raysegbg.storage import Location
from raysegbg.tb import clear_sessions
from raysegbg.tune_report import HPARAMS_DIR, TrialRow, write_reports

SEARCH_FILE = "search.yaml"  # what a resume needs: base config, space, options
ASHA_FILE = "asha_rungs.state"  # not .pkl/.json: Tune copies those back over ours on resume
DRIVER_RESOURCES = {"node:__internal_head__": 0.01}  # drivers take no CPU, live on the head
ASHA_REDUCTION = 3  # a third of the trials at a rung go on
TRIAL_POLL_S = "1"  # seconds between a trial's Train controller polls of its workers
STATUS_EVERY_S = 30  # seconds between Ray's status tables
NAME_VALUES_CHARS = 64  # the sampled values in a trial's name are cut to about this


@dataclass
class SearchOptions:
    """`raysegbg tune` arguments (see `tune_commands`)."""

    space: str | None = None  # search-space YAML; not needed with `resume`
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    samples: int = 20
    max_concurrent: int = 0  # 0 = as many as the cluster's CPUs/GPUs hold
    scheduler: str = "asha"  # asha | none
    grace: int = 0  # epochs before ASHA's first rung; 0 = a quarter of train.epochs (>= 1)
    name: str = ""
    resume: str = ""
    address: str | None = None
    metric: str = "val/miou"
    mode: str = "max"
    seed: int = 0
    grid: bool = False  # every combination of categorical choices instead of Optuna


@dataclass
class SearchResult:
    search_dir: Location  # a Path, or a storage.Uri when the storage path is a URI
    rows: list[TrialRow]
    best: TrialRow | None
    interrupted: bool  # fewer than `samples` trials ended: continue with --resume
    samples: int
    metric: str


def run_search(opts: SearchOptions, callbacks: list[Any] | None = None) -> SearchResult:
    """Run (or resume) a search and write its reports; `callbacks` are extra Tune callbacks."""
    plan = _resume_plan(opts) if opts.resume else _new_plan(opts)
    # a resumed trial restarts Tune's iteration count; Optuna then warns on every epoch
    warnings.filterwarnings("ignore", message="The reported value is ignored")
    # for this search only (a later Tuner in the process, e.g. compare's grid, keeps Tune's
    # defaults): our writers own TensorBoard (one session per trial), Tune keeps its CSV/JSON
    # results only; and Tune's newer console output picks its table's metrics itself (the
    # first few reported: train losses), the documented CLIReporter (`_status_table`) shows
    # the searched one
    with environ(TUNE_DISABLE_AUTO_CALLBACK_LOGGERS="1", RAY_AIR_NEW_OUTPUT="0"):
        init_ray(opts.address)
        search_dir = storage.location(plan["search_dir"])
        # trials that agree on a stage's settings share its result (prn's base): computed once
        service_id = f"{plan['name']}-{uuid.uuid4().hex[:8]}"  # unique: drivers never share one
        service = start_service(service_id, str(search_dir.parent))  # noqa: F841 (kept alive)
        trainable = _trainable(plan, service_name(service_id))
        if opts.resume:
            tuner = ray.tune.Tuner.restore(str(search_dir), trainable, resume_errored=False)
        else:
            tuner = _new_tuner(plan, trainable, list(callbacks or []))
        with failures.on_sigterm(_stop_search):
            results = tuner.fit()
        return _finish(plan, results)


def _stop_search(previous: Any) -> None:
    """SIGTERM (`kill`, a scheduler) stops the search as Ctrl+C does: Tune ends the trials,
    saves its state, and `--resume` goes on. Left to Ray, SIGTERM aborts the driver (exit -6),
    Tune's state only as fresh as its last periodic save. Tune stops on SIGUSR1 as on SIGINT
    (handlers it sets in `fit`); a second SIGTERM ends the driver as before."""
    signal.signal(signal.SIGTERM, previous)
    os.kill(os.getpid(), signal.SIGUSR1)


# -- before Ray: everything that can be wrong in the input fails here --------------------------
def _new_plan(opts: SearchOptions) -> dict[str, Any]:
    _check_options(opts)
    base = load_config(opts.config, opts.overrides)
    space = load_space(opts.space, base)
    name = opts.name or f"tune-{Path(opts.space).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    resolved = resolve_run(replace(base, logging={"name": name}))
    _preflight(resolved, space, opts.address)
    search_dir = storage.join(resolved.logging.storage_path, name)
    if storage.exists(search_dir / SEARCH_FILE):
        raise RaysegbgError(
            f"search {name} already exists in {search_dir.parent}: continue it with "
            f"--resume {name}, or pick another --name"
        )
    if not storage.is_uri(search_dir):  # an object store has no folders to make
        search_dir.mkdir(parents=True, exist_ok=True)
    samples = len(space.grid()) if opts.grid else opts.samples
    return {
        "search_dir": str(search_dir), "name": name, "base": to_dict(base),
        "trial_base": to_dict(resolved), "space": yaml.safe_load(Path(opts.space).read_text()),
        "metric": opts.metric, "mode": opts.mode, "samples": samples, "seed": opts.seed,
        "scheduler": opts.scheduler, "grace": opts.grace, "max_concurrent": opts.max_concurrent,
        "grid": opts.grid,
    }  # fmt: skip


def _check_options(opts: SearchOptions) -> None:
    if not opts.space:
        raise RaysegbgError("tune needs --space FILE (e.g. search_spaces/baseline.yaml)")
    checks = [
        (opts.samples >= 1, f"--samples must be >= 1, got {opts.samples}"),
        (opts.max_concurrent >= 0, "--max-concurrent must be >= 0 (0 = from the resources)"),
        (opts.grace >= 0, "--grace must be >= 0 epochs (0 = a quarter of train.epochs)"),
        (opts.scheduler in ("asha", "none"), f"--scheduler {opts.scheduler}: use asha or none"),
        (opts.mode in ("max", "min"), f"--mode {opts.mode}: use max or min"),
        (
            opts.metric.startswith(("val/", "train/")) or opts.metric == "best_score",
            f"--metric {opts.metric}: use a reported metric, e.g. val/miou or val/fg_dice",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise RaysegbgError(message)


def _preflight(cfg: Config, space: SearchSpace, address: str | None) -> None:
    """The run preflight on the base config, plus every model the space can build."""
    from raysegbg.models import check_model_config
    from raysegbg.registry import method_class
    from raysegbg.search_space import probe_configs

    num_classes = preflight(cfg, address).num_classes
    for _, _, probe in probe_configs(space, cfg):
        check_model_config(probe.model)
        try:
            method_class(probe.method.name).check_data(probe, num_classes)
        except RaysegbgError as exc:
            raise RaysegbgError(f"search space {space.source} can choose {exc}") from None


def _resume_plan(opts: SearchOptions) -> dict[str, Any]:
    check_name("--resume", opts.resume)  # it is joined to the storage path below
    root = storage.location(load_config(opts.config, opts.overrides).logging.storage_path)
    search_dir = root / opts.resume
    if storage.is_uri(search_dir):
        storage.check(root)
    else:
        search_dir = search_dir.expanduser().resolve()
    if not storage.is_file(search_dir / SEARCH_FILE):
        found = [n for n in storage.listdir(root) if storage.is_file(root / n / SEARCH_FILE)]
        listed = f": searches there are {', '.join(found)}" if found else ""
        raise RaysegbgError(
            f"no search named {opts.resume} in {root}{listed} (pass the same --config / "
            "logging.storage_path as the search)"
        )
    if not ray.tune.Tuner.can_restore(str(search_dir)):
        raise RaysegbgError(
            f"search {opts.resume} stopped before Tune saved its state: start it again "
            f"without --resume (delete {search_dir} first)"
        )
    plan = yaml.safe_load(storage.read_text(search_dir / SEARCH_FILE))
    preflight(from_dict(plan["trial_base"]), opts.address)  # the data may have moved since
    return plan


# -- Ray: resources, the tuner, the per-trial driver --------------------------------------------
def plan_resources(cfg: dict[str, Any], max_concurrent: int, samples: int) -> tuple[dict, int]:
    """CPUs per worker and concurrent trials that fit the cluster: a Train run starts only
    when all its workers fit at once, so more trials than that would wait forever.

    By default every worker gets one CPU (or the CPUs shared between the GPU trials) and as
    many trials run as fit; `max_concurrent` caps that and shares the CPUs between them.
    """
    total = ray.cluster_resources()
    cpus, gpus = int(total.get("CPU", 0)), int(total.get("GPU", 0))
    scaling = cfg["scaling"]
    workers = scaling["workers"]
    want = max_concurrent or (gpus // workers if scaling["use_gpu"] else cpus // workers)
    want = max(1, min(want, samples))
    per_worker = scaling["cpus_per_worker"] or max(1, cpus // (want * workers))
    fits = cpus // (workers * per_worker)
    if scaling["use_gpu"]:
        fits = min(fits, gpus // workers)
    if fits < 1:
        gpu_text = f" and {workers} GPUs" if scaling["use_gpu"] else ""
        raise RaysegbgError(
            f"one trial needs {workers * per_worker} CPUs{gpu_text} ({workers} workers) but the "
            f"cluster has {cpus} CPUs and {gpus} GPUs: lower scaling.workers or "
            "scaling.cpus_per_worker"
        )
    if want > fits:
        print(f"--max-concurrent {want}: only {fits} trials fit the cluster; running {fits}")
    return apply_params(cfg, {"scaling.cpus_per_worker": per_worker}), min(want, fits)


def _trainable(plan: dict[str, Any], results: str | None = None) -> Any:
    base, concurrent = plan_resources(plan["trial_base"], plan["max_concurrent"], plan["samples"])
    plan["concurrent"] = concurrent
    driver = ray.tune.with_parameters(_trial_driver, base=base, search_dir=plan["search_dir"],
                                      results=results)  # fmt: skip
    return ray.tune.with_resources(driver, DRIVER_RESOURCES)


def _new_tuner(plan: dict[str, Any], trainable: Any, callbacks: list[Any]) -> ray.tune.Tuner:
    search_dir = storage.location(plan["search_dir"])
    storage.write_text(search_dir / SEARCH_FILE, yaml.safe_dump(plan, sort_keys=False))
    space = parse_space(plan["space"], SEARCH_FILE)
    if plan["grid"]:
        param_space = {k: ray.tune.grid_search(list(space.param(k).choices)) for k in space.names}
        searcher, samples = BasicVariantGenerator(max_concurrent=plan["concurrent"]), 1
    else:
        param_space, samples = {}, plan["samples"]
        searcher = OptunaSearch(
            space,
            metric=plan["metric"],
            mode=plan["mode"],
            sampler=make_sampler(plan["seed"], samples),
        )
    scheduler = _scheduler(plan)
    # Grid trials are counted from 0, the searcher's from 1: both named from 001
    namer = partial(trial_name, plan["name"], int(plan["grid"]))
    return ray.tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=ray.tune.TuneConfig(
            metric=plan["metric"], mode=plan["mode"], search_alg=searcher, scheduler=scheduler,
            num_samples=samples, max_concurrent_trials=plan["concurrent"],
            trial_name_creator=namer, trial_dirname_creator=namer,
        ),
        run_config=ray.tune.RunConfig(
            name=plan["name"], storage_path=str(search_dir.parent),
            callbacks=[CSVLoggerCallback(), JsonLoggerCallback(), *callbacks],
            progress_reporter=_status_table(plan, space), verbose=1,
        ),
    )  # fmt: skip


def _status_table(plan: dict[str, Any], space: SearchSpace) -> ray.tune.CLIReporter:
    """Ray's periodic status table: each trial's epoch and searched metric (best first, by
    the TuneConfig's metric and mode) by its sampled values."""
    return ray.tune.CLIReporter(
        metric_columns={"epoch": "epoch", plan["metric"]: plan["metric"]},
        parameter_columns={name: name.rsplit(".", 1)[-1] for name in space.names},
        sort_by_metric=True, max_report_frequency=STATUS_EVERY_S, print_intermediate_tables=True,
    )  # fmt: skip


def _scheduler(plan: dict[str, Any]) -> Any:
    """ASHA on epochs: rungs at grace, grace x 3, ... before the last epoch, and no stop at
    the end, so a trial that survives every rung ends by itself and its run closes cleanly."""
    epochs = plan["trial_base"]["train"]["epochs"]
    grace = plan["grace"] or max(1, epochs // 4)
    if plan["scheduler"] != "asha" or grace >= epochs:
        return FIFOScheduler()
    return _ResumableASHA(
        str(storage.join(plan["search_dir"], ASHA_FILE)), time_attr="epoch", max_t=epochs - 1,
        grace_period=grace, reduction_factor=ASHA_REDUCTION, stop_last_trials=False,
    )  # fmt: skip


def make_sampler(seed: int, samples: int) -> optuna.samplers.BaseSampler:
    """Seeded TPE; random start scaled to the budget; `constant_liar` for concurrent trials."""
    startup = min(10, max(2, samples // 3))
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, constant_liar=True)


def trial_name(search: str, first: int, trial: Any) -> str:
    """`<search>_<nnn>_<values>`, e.g. `s1_003_lr=0.0012,arch=FPN`: the trial's name in Ray's
    table, its folder (its Tune files and its Train run share it) and its TensorBoard run.
    nnn is Tune's count of the trials made (a resumed search goes on counting), from 1."""
    count = trial.experiment_tag.split("_", 1)[0]
    index = f"{int(count) + first:03d}" if count.isdigit() else trial.trial_id
    return "_".join(filter(None, [search, index, _values_text(trial.config)]))


def _values_text(params: dict[str, Any]) -> str:
    """`lr=0.0012,arch=FPN`: the last part of each name, 3 digits, as many as fit."""
    parts: list[str] = []
    for key, value in params.items():
        shown = f"{value:.3g}" if isinstance(value, float) else str(value)
        part = f"{key.rsplit('.', 1)[-1]}={shown}"
        if parts and len(",".join([*parts, part])) > NAME_VALUES_CHARS:
            break
        parts.append(part)
    # a folder name: no separators, brackets or spaces (a list value), no `..`
    return re.sub(r"\.\.+", ".", re.sub(r"[^\w.=,+-]+", "-", ",".join(parts))).strip("-")


def _trial_driver(
    params: dict[str, Any], base: dict[str, Any], search_dir: str, results: str | None = None
) -> None:
    """Runs in each trial's Tune actor: the sampled config as a Train run named as the trial."""
    cfg = trial_config(base, params, search_dir, ray.tune.get_context().get_trial_name())
    # Train hands each report to its controller at a poll and a worker blocks on its next
    # report until then: poll often so short epochs are not stretched and ASHA's stop lands
    # within about an epoch (propagated from this process to the run's controller)
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = TRIAL_POLL_S
    run_trainer(cfg, callbacks=[_StampedReport()], results=results)  # raises if the run fails


def trial_config(base: dict[str, Any], params: dict[str, Any], storage: str, name: str) -> Config:
    """The config of one trial: base + sampled values, its run under `<storage>/<name>`."""
    values = apply_params(base, {**params, "logging.storage_path": storage, "logging.name": name})
    return from_dict(values)


class _ResumableASHA(ASHAScheduler):
    """ASHA whose rungs survive `--resume`: Tune 2.60 restores the searcher but not the
    scheduler, so a resumed search would judge new trials against an empty history."""

    def __init__(self, state_file: str, **kwargs: Any):
        super().__init__(**kwargs)
        self._state_file, self._loaded = state_file, False

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        if not self._loaded and storage.is_file(self._state_file):
            self._restore_rungs()  # the rungs recorded before the interruption
        self._loaded = True
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        self._save_rungs()
        return action

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        super().on_trial_complete(tune_controller, trial, result)
        self._save_rungs()

    # ASHA saves to and restores from a local file; a search in an object store keeps a copy
    def _save_rungs(self) -> None:
        if not storage.is_uri(self._state_file):
            self.save(self._state_file)
            return
        with tempfile.TemporaryDirectory(prefix="raysegbg-asha-") as tmp:
            self.save(os.path.join(tmp, ASHA_FILE))
            storage.upload_file(Path(tmp, ASHA_FILE), self._state_file)

    def _restore_rungs(self) -> None:
        if not storage.is_uri(self._state_file):
            self.restore(self._state_file)
            return
        with tempfile.TemporaryDirectory(prefix="raysegbg-asha-") as tmp:
            Path(tmp, ASHA_FILE).write_bytes(storage.read_bytes(self._state_file))
            self.restore(os.path.join(tmp, ASHA_FILE))


class _StampedReport(TuneReportCallback):
    """Forwards rank 0's metrics of every epoch to Tune, stamped with the wall time (the
    benchmark orders epochs across concurrent trials by it)."""

    def after_report(self, run_context: Any, metrics: list[dict], checkpoint: Any) -> None:
        metrics = [{**metrics[0], "wall_time": time.time()}, *metrics[1:]]
        super().after_report(run_context, metrics, checkpoint)


# -- after: rows, reports ---------------------------------------------------------------------
def _finish(plan: dict[str, Any], results: Any) -> SearchResult:
    search_dir = storage.location(plan["search_dir"])
    # Tune's own record of how each trial ended (the result grid does not say), by folder
    trials = {Path(t.path).name: t for t in ray.tune.ExperimentAnalysis(str(search_dir)).trials}
    epochs = plan["trial_base"]["train"]["epochs"]
    rows = [_row(r, trials, plan["metric"], epochs) for r in results]
    space = parse_space(plan["space"], SEARCH_FILE)
    best = _write_reports(search_dir, rows, space, plan)
    done = sum(r.status != "unfinished" for r in rows)
    return SearchResult(
        search_dir, rows, best, done < plan["samples"], plan["samples"], plan["metric"]
    )


def _write_reports(
    search_dir: Location, rows: list[TrialRow], space: SearchSpace, plan: dict[str, Any]
) -> TrialRow | None:
    """The reports go straight into a local search folder; for an object store they are
    written to a temporary folder and uploaded (the old HParams sessions replaced)."""
    args = (rows, space, plan["base"], plan["metric"], plan["mode"])
    if not storage.is_uri(search_dir):
        return write_reports(search_dir, *args)
    with tempfile.TemporaryDirectory(prefix="raysegbg-reports-") as tmp:
        best = write_reports(Path(tmp), *args)
        storage.delete_dir(search_dir / HPARAMS_DIR)
        for row in rows:  # the sessions the trials' runs wrote
            clear_sessions(search_dir / row.name / "tb")
        storage.upload_dir(Path(tmp), search_dir)
    return best


def _row(result: Any, trials: dict[str, Any], metric: str, epochs: int) -> TrialRow:
    name = Path(result.path).name  # the trial's folder (`trial_name`)
    trial = trials.get(name)
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    epoch = int(metrics.get("epoch", 0))
    status = {"ERROR": "error", "TERMINATED": "finished" if epoch >= epochs else "stopped"}
    error = ""
    if result.error:  # a known cause (memory pressure) in one line, else the error's last line
        known = failures.explain(result.error, "trial")
        error = str(known) if known else str(result.error).strip().splitlines()[-1][:200]
    return TrialRow(
        name, getattr(trial, "trial_id", ""), dict(result.config or {}),
        float(metrics.get(metric, float("nan"))), epoch,
        status.get(getattr(trial, "status", ""), "unfinished"), metrics, error,
    )  # fmt: skip
