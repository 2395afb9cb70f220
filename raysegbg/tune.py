"""Hyperparameter search on Ray Tune: Optuna (TPE) proposes, ASHA stops, Train trains.

Every trial is a small driver function that runs the same Train entry point as `raysegbg train`
(`ray_train.run_trainer`) with the sampled values, named by the trial id, and forwards each
epoch's metrics to Tune. Everything lands in one folder, `<storage>/<search name>/`: the
trials' runs (`<trial id>/`: config, checkpoints, `tb/`), one HParams session per trial
(`hparams/<trial id>`), `summary.csv`, `best_config.yaml`, a plot, and Tune's own state so an
interrupted search can be resumed. The only module besides `ray_train` that imports Ray Tune.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
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

from raysegbg.config import Config, from_dict, load_config, replace, to_dict
from raysegbg.errors import RaysegbgError
from raysegbg.ray_train import init_ray, preflight, resolve_run, run_trainer
from raysegbg.search_space import SearchSpace, apply_params, load_space, parse_space
from raysegbg.tune_commands import TrialRow, write_reports

SEARCH_FILE = "search.yaml"  # what a resume needs: base config, space, options
STATUS_FILE = "trial_status.json"
DRIVER_RESOURCES = {"node:__internal_head__": 0.01}  # drivers take no CPU, live on the head
ASHA_GRACE, ASHA_REDUCTION = 1, 3  # rungs at epochs 1, 3, 9, 27, ...


@dataclass
class SearchOptions:
    """`raysegbg tune` arguments (see `tune_commands`)."""

    space: str | None = None  # search-space YAML; not needed with `resume`
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    samples: int = 20
    max_concurrent: int = 0  # 0 = as many as the cluster's CPUs/GPUs hold
    scheduler: str = "asha"  # asha | none
    name: str = ""
    resume: str = ""
    address: str | None = None
    metric: str = "val/miou"
    mode: str = "max"
    seed: int = 0
    grid: bool = False  # every combination of categorical choices instead of Optuna


@dataclass
class SearchResult:
    search_dir: Path
    rows: list[TrialRow]
    best: TrialRow | None
    interrupted: bool  # fewer than `samples` trials ended: continue with --resume
    samples: int
    metric: str


def run_search(opts: SearchOptions, callbacks: list[Any] | None = None) -> SearchResult:
    """Run (or resume) a search and write its reports; `callbacks` are extra Tune callbacks."""
    plan = _resume_plan(opts) if opts.resume else _new_plan(opts)
    init_ray(opts.address)
    search_dir = Path(plan["search_dir"])
    trainable = _trainable(plan)
    if opts.resume:
        tuner = ray.tune.Tuner.restore(str(search_dir), trainable, resume_errored=False)
    else:
        tuner = _new_tuner(plan, trainable, list(callbacks or []))
    results = tuner.fit()
    return _finish(plan, results)


# -- before Ray: everything that can be wrong in the input fails here --------------------------
def _new_plan(opts: SearchOptions) -> dict[str, Any]:
    _check_options(opts)
    base = load_config(opts.config, opts.overrides)
    space = load_space(opts.space, base)
    name = opts.name or f"tune-{Path(opts.space).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    resolved = resolve_run(replace(base, logging={"name": name}))
    _preflight(resolved, space, opts.address)
    search_dir = Path(resolved.logging.storage_path) / name
    if (search_dir / SEARCH_FILE).exists():
        raise RaysegbgError(
            f"search {name} already exists in {search_dir.parent}: continue it with "
            f"--resume {name}, or pick another --name"
        )
    search_dir.mkdir(parents=True, exist_ok=True)
    plan = {
        "search_dir": str(search_dir), "name": name, "space": _space_data(space),
        "base": to_dict(base), "trial_base": to_dict(resolved), "metric": opts.metric,
        "mode": opts.mode, "samples": opts.samples, "scheduler": opts.scheduler,
        "max_concurrent": opts.max_concurrent, "seed": opts.seed, "grid": opts.grid,
    }  # fmt: skip
    if opts.grid:
        plan["samples"] = len(space.grid())
    return plan


def _check_options(opts: SearchOptions) -> None:
    if not opts.space:
        raise RaysegbgError("tune needs --space FILE (e.g. search_spaces/baseline.yaml)")
    checks = [
        (opts.samples >= 1, f"--samples must be >= 1, got {opts.samples}"),
        (opts.max_concurrent >= 0, "--max-concurrent must be >= 0 (0 = from the resources)"),
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
    from raysegbg.search_space import probe_configs

    preflight(cfg, address)
    for _, _, probe in probe_configs(space, cfg):
        check_model_config(probe.model)


def _space_data(space: SearchSpace) -> dict[str, Any]:
    """The compiled space as plain data (stored in search.yaml, re-parsed on resume)."""
    params = {}
    for p in space.params:
        spec: dict[str, Any] = {"type": p.kind}
        if p.kind == "categorical":
            spec["choices"] = list(p.choices)
        else:
            spec.update(low=p.low, high=p.high)
            spec.update({"step": p.step} if p.step is not None and p.kind != "log_float" else {})
            spec.update({"log": True} if p.log else {})
        if p.when:
            spec["when"] = {name: list(values) for name, values in p.when}
        params[p.name] = spec
    return {"params": params}


def _resume_plan(opts: SearchOptions) -> dict[str, Any]:
    storage = Path(load_config(opts.config, opts.overrides).logging.storage_path)
    search_dir = (storage / opts.resume).expanduser().resolve()
    if not (search_dir / SEARCH_FILE).is_file():
        found = sorted(p.parent.name for p in storage.glob(f"*/{SEARCH_FILE}"))
        listed = f": searches there are {', '.join(found)}" if found else ""
        raise RaysegbgError(
            f"no search named {opts.resume} in {storage}{listed} (pass the same --config / "
            "logging.storage_path as the search)"
        )
    if not ray.tune.Tuner.can_restore(str(search_dir)):
        raise RaysegbgError(
            f"search {opts.resume} stopped before Tune saved its state: start it again "
            f"without --resume (delete {search_dir} first)"
        )
    return yaml.safe_load((search_dir / SEARCH_FILE).read_text())


# -- Ray: resources, the tuner, the per-trial driver --------------------------------------------
def plan_resources(cfg: dict[str, Any], max_concurrent: int, samples: int) -> tuple[dict, int]:
    """CPUs per worker and concurrent trials that fit the cluster: a Train run starts only
    when all its workers fit at once, so more trials than that would wait forever."""
    total = ray.cluster_resources()
    cpus, gpus = int(total.get("CPU", 0)), int(total.get("GPU", 0))
    scaling = cfg["scaling"]
    workers = scaling["workers"]
    per_worker = scaling["cpus_per_worker"] or max(1, cpus // (max(1, max_concurrent) * workers))
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
    concurrent = min(max_concurrent or fits, fits, samples)
    if max_concurrent > fits:
        print(f"--max-concurrent {max_concurrent}: only {fits} trials fit; running {fits}")
    return apply_params(cfg, {"scaling.cpus_per_worker": per_worker}), concurrent


def _trainable(plan: dict[str, Any]) -> Any:
    base, concurrent = plan_resources(plan["trial_base"], plan["max_concurrent"], plan["samples"])
    plan["concurrent"] = concurrent
    driver = ray.tune.with_parameters(_trial_driver, base=base, search_dir=plan["search_dir"])
    return ray.tune.with_resources(driver, DRIVER_RESOURCES)


def _new_tuner(plan: dict[str, Any], trainable: Any, callbacks: list[Any]) -> ray.tune.Tuner:
    (Path(plan["search_dir"]) / SEARCH_FILE).write_text(yaml.safe_dump(plan, sort_keys=False))
    space = parse_space(plan["space"], SEARCH_FILE)
    if plan["grid"]:
        param_space = {k: ray.tune.grid_search(list(space.param(k).choices)) for k in space.names}
        searcher, samples = BasicVariantGenerator(), 1
    else:
        param_space, samples = {}, plan["samples"]
        searcher = OptunaSearch(
            space, metric=plan["metric"], mode=plan["mode"], sampler=_sampler(plan["seed"], samples)
        )
    scheduler: Any = FIFOScheduler()
    if plan["scheduler"] == "asha":
        epochs = plan["trial_base"]["train"]["epochs"]
        scheduler = ASHAScheduler(
            time_attr="epoch",
            max_t=epochs,
            grace_period=ASHA_GRACE,
            reduction_factor=ASHA_REDUCTION,
        )
    # our writers own TensorBoard (one session per trial); keep Tune's CSV/JSON results only
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    return ray.tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=ray.tune.TuneConfig(
            metric=plan["metric"], mode=plan["mode"], search_alg=searcher, scheduler=scheduler,
            num_samples=samples, max_concurrent_trials=plan["concurrent"],
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=ray.tune.RunConfig(
            name=plan["name"], storage_path=str(Path(plan["search_dir"]).parent),
            callbacks=[CSVLoggerCallback(), JsonLoggerCallback(), _StatusCallback(plan)]
            + callbacks,
            verbose=1,
        ),
    )  # fmt: skip


def _sampler(seed: int, samples: int) -> optuna.samplers.BaseSampler:
    """Seeded TPE; random start scaled to the budget; `constant_liar` for concurrent trials."""
    startup = min(10, max(2, samples // 3))
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, constant_liar=True)


def _trial_dirname(trial: Any) -> str:
    return trial.trial_id  # the trial's Tune files and its Train run share <search>/<trial id>


def _trial_driver(params: dict[str, Any], base: dict[str, Any], search_dir: str) -> None:
    """Runs in each trial's Tune actor: the sampled config as a Train run named by trial id."""
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(base, params, search_dir, trial_id)
    run_trainer(cfg, callbacks=[_StampedReport()])  # raises (trial error) if the run fails


def trial_config(base: dict[str, Any], params: dict[str, Any], storage: str, name: str) -> Config:
    """The config of one trial: base + sampled values, its run under `<storage>/<name>`."""
    values = apply_params(base, {**params, "logging.storage_path": storage, "logging.name": name})
    return from_dict(values)


class _StampedReport(TuneReportCallback):
    """Forwards rank 0's metrics of every epoch to Tune, stamped with the wall time (the
    benchmark orders epochs across concurrent trials by it)."""

    def after_report(self, run_context: Any, metrics: list[dict], checkpoint: Any) -> None:
        metrics = [{**metrics[0], "wall_time": time.time()}, *metrics[1:]]
        super().after_report(run_context, metrics, checkpoint)


class _StatusCallback(ray.tune.Callback):
    """Records how each trial ended (finished / stopped by ASHA / error) in the search folder,
    and prints one line per ended trial."""

    def __init__(self, plan: dict[str, Any]):
        self.path = Path(plan["search_dir"]) / STATUS_FILE
        self.epochs, self.metric = plan["trial_base"]["train"]["epochs"], plan["metric"]

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        epoch = (trial.last_result or {}).get("epoch", 0)
        self._record(trial, "finished" if epoch >= self.epochs else "stopped")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._record(trial, "error")

    def _record(self, trial: Any, status: str) -> None:
        found = json.loads(self.path.read_text()) if self.path.is_file() else {}
        found[trial.trial_id] = status
        self.path.write_text(json.dumps(found, indent=1))
        last = trial.last_result or {}
        value = last.get(self.metric, float("nan"))
        print(f"trial {trial.trial_id} {status} at epoch {last.get('epoch', 0)}: "
              f"{self.metric} {value:.4f}")  # fmt: skip


# -- after: rows, reports ---------------------------------------------------------------------
def _finish(plan: dict[str, Any], results: Any) -> SearchResult:
    search_dir = Path(plan["search_dir"])
    statuses = json.loads((search_dir / STATUS_FILE).read_text()) if (
        search_dir / STATUS_FILE).is_file() else {}  # fmt: skip
    rows = [_row(r, statuses, plan["metric"]) for r in results]
    space = parse_space(plan["space"], SEARCH_FILE)
    best = write_reports(search_dir, rows, space, plan["base"], plan["metric"], plan["mode"])
    done = sum(r.status != "unfinished" for r in rows)
    return SearchResult(
        search_dir, rows, best, done < plan["samples"], plan["samples"], plan["metric"]
    )


def _row(result: Any, statuses: dict[str, str], metric: str) -> TrialRow:
    trial_id = Path(result.path).name
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    status = "error" if result.error else statuses.get(trial_id, "unfinished")
    params = {k: v for k, v in (result.config or {}).items()}
    return TrialRow(
        trial_id, params, float(metrics.get(metric, float("nan"))), int(metrics.get("epoch", 0)),
        status, metrics, str(result.error or "").splitlines()[0] if result.error else "",
    )  # fmt: skip
