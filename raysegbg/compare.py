"""`raysegbg compare`: which background method helps this dataset, and is it the mechanism?

Every method runs at every seed, and so does its mechanism-off control (the settings the
method declares in `Method.control`), all with the same architecture, budget and augmentation,
as parallel trials on Ray (a Tune grid over the cells). Each run keeps its best checkpoint by
`logging.score` on the validation split; when all have finished, each final run is scored once
on the test split, and `raysegbg.compare_stats` pairs them by seed against the baseline and
against their control. Re-running the same command resumes: a finished cell is not retrained.

With `--tune N`, each method's settings are first chosen by an N-trial search of its space
(`search_spaces/<method>.yaml`) on the validation split, at a seed none of the final runs uses;
the method and its control then run with the chosen settings (the control switching only its
mechanism off).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raysegbg import storage
from raysegbg.compare_stats import BASELINE, METRICS, Row, summarize, write_report
from raysegbg.config import Config, from_dict, load_config, to_dict
from raysegbg.errors import RaysegbgError
from raysegbg.registry import method_class, section_name
from raysegbg.search_space import apply_params

CONTROL = "control"
TUNE_SEED = 1_000  # the tuning searches' train.seed: none of the final runs' seeds
TUNED_FILE = "tuned.json"  # method -> the settings its search chose (a resumed compare reads it)


@dataclass(frozen=True)
class Cell:
    """One run of the comparison: a method (or its control) at a seed."""

    method: str
    variant: str  # "method" or CONTROL
    seed: int

    @property
    def name(self) -> str:
        label = self.method if self.variant == "method" else f"{self.method}-{CONTROL}"
        # a plug-in's name (pkg.module:Class) becomes a folder name
        return f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', label)}-seed{self.seed}"


@dataclass
class CompareOptions:
    data: str
    methods: list[str] = field(default_factory=lambda: [BASELINE, "colab", "prn", "mcibi"])
    seeds: int = 3
    budget: int = 0  # epochs; 0: the config's train.epochs
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    address: str | None = None
    name: str = "compare"
    max_concurrent: int = 0
    tune: int = 0  # trials of each method's search before the final runs; 0: no search
    spaces: str = "search_spaces"  # where <method>.yaml is


def cells(opts: CompareOptions) -> list[Cell]:
    out = []
    for method in opts.methods:
        variants = ["method"] + ([CONTROL] if method_class(method).control else [])
        out += [Cell(method, v, seed) for v in variants for seed in range(opts.seeds)]
    return out


def method_overrides(opts: CompareOptions, method: str, seed: int, folder: str) -> list[str]:
    """The user's settings, then the data, the method, the seed, the budget and the folder."""
    values = [*opts.overrides, f"data.path={opts.data}", f"method.name={method}",
              f"train.seed={seed}", f"logging.storage_path={folder}"]  # fmt: skip
    return values + ([f"train.epochs={opts.budget}"] if opts.budget else [])


def cell_config(opts: CompareOptions, cell: Cell, folder: str,
                tuned: dict[str, Any] | None = None) -> Config:  # fmt: skip
    """The run config of a cell: the user's config, the data, the method (with the settings
    its search chose, if any; its control's settings for a control), the seed and the budget;
    the run named after the cell."""
    values = [*method_overrides(opts, cell.method, cell.seed, folder), f"logging.name={cell.name}"]
    cfg = load_config(opts.config, values)
    params = dict(tuned or {})
    if cell.variant == CONTROL:
        section = f"method.{section_name(cell.method)}"
        params.update({f"{section}.{k}": v for k, v in method_class(cell.method).control.items()})
    return from_dict(apply_params(to_dict(cfg), params)) if params else cfg


def check_options(opts: CompareOptions) -> None:
    if BASELINE not in opts.methods:
        raise RaysegbgError(f"--methods {','.join(opts.methods)}: include {BASELINE}, the "
                            "reference every method is paired with")  # fmt: skip
    if len(set(opts.methods)) != len(opts.methods):
        raise RaysegbgError(f"--methods {','.join(opts.methods)} lists a method twice")
    if opts.seeds < 2:
        raise RaysegbgError(
            f"--seeds {opts.seeds}: a paired comparison needs at least 2 seeds (3 or more for "
            "an interval worth reading)"
        )
    if opts.budget < 0:
        raise RaysegbgError(f"--budget {opts.budget}: use a number of epochs >= 1 (0: config's)")
    if opts.tune < 0:
        raise RaysegbgError(f"--tune {opts.tune}: use a number of trials >= 1 (0: no search)")
    for method in opts.methods if opts.tune else []:
        if not space_file(opts, method).is_file():
            raise RaysegbgError(
                f"--tune: no search space for {method} in {opts.spaces}/ (expected "
                f"{space_file(opts, method)}): pass --spaces DIR, or leave {method} out"
            )


def space_file(opts: CompareOptions, method: str) -> Path:
    return Path(opts.spaces) / f"{section_name(method)}.yaml"


def finished(cfg: Config) -> bool:
    """The run has ended (its last epoch of every stage, or stopped early), as its newest
    checkpoint records: a resumed comparison does not train it again."""
    from raysegbg.checkpoint import list_checkpoints

    run_dir = Path(cfg.logging.storage_path) / cfg.logging.name
    found = list_checkpoints(run_dir) if run_dir.is_dir() else []
    return bool(found) and bool(found[-1][1].get("complete"))


def run_compare(opts: CompareOptions, log=print) -> Path:
    """Train every cell (the missing ones), score the final runs on the test split once,
    write compare.md, compare.csv and compare.png. Returns the comparison's folder."""
    from raysegbg.ray_train import init_ray, preflight

    check_options(opts)
    base = load_config(opts.config, opts.overrides)
    folder = Path(base.logging.storage_path).resolve() / opts.name
    for cell in cells(opts):  # every cell's input checked before Ray starts
        preflight(cell_config(opts, cell, str(folder)), opts.address)
    tuned = tune_methods(opts, folder, base.logging.score, log) if opts.tune else {}
    configs = {c: cell_config(opts, c, str(folder), tuned.get(c.method)) for c in cells(opts)}
    todo = {c: cfg for c, cfg in configs.items() if not finished(cfg)}
    log(f"compare {opts.name}: {len(configs)} runs ({len(configs) - len(todo)} already done) "
        f"in {folder}")  # fmt: skip
    if todo:
        init_ray(opts.address)
        _train_cells(todo, opts.max_concurrent, folder)
    missing = [c.name for c, cfg in configs.items() if not finished(cfg)]
    if missing:
        raise RaysegbgError(
            f"{len(missing)} run(s) did not finish ({', '.join(missing[:3])}): see their logs "
            f"under {folder}, then run the same command again to resume"
        )
    return report(configs, folder, base.logging.score, log, tuned, opts.tune)


def tune_methods(opts: CompareOptions, folder: Path, score: str, log=print) -> dict[str, dict]:
    """`--tune N`: each method's settings chosen by an N-trial search (Optuna + ASHA) of its
    space, scored by `score` on the validation split at seed `TUNE_SEED`, with the comparison's
    budget. The choices are kept in `tuned.json`: a resumed comparison does not search again
    (an interrupted search is resumed)."""
    from raysegbg.tune import SEARCH_FILE, SearchOptions, run_search

    record = folder / TUNED_FILE
    chosen: dict[str, dict] = json.loads(record.read_text()) if record.is_file() else {}
    for method in opts.methods:
        if method in chosen:
            continue
        name = f"tune-{section_name(method)}"
        root = folder / "tune"
        search = SearchOptions(
            space=str(space_file(opts, method)), config=opts.config,
            overrides=method_overrides(opts, method, TUNE_SEED, str(root)), samples=opts.tune,
            name=name, address=opts.address, metric=score, max_concurrent=opts.max_concurrent,
            resume=name if (root / name / SEARCH_FILE).is_file() else "",
        )  # fmt: skip
        log(f"compare: choosing {method}'s settings: {opts.tune} trials on validation")
        best = run_search(search).best
        if best is None:
            raise RaysegbgError(
                f"the search of {method}'s settings ended with no scored trial: see "
                f"{root / name}, then run the same command again"
            )
        chosen[method] = {k: v for k, v in best.params.items() if k != "method.name"}
        storage.write_text(record, json.dumps(chosen, indent=1, default=str) + "\n")
    return chosen


def _train_cells(todo: dict[Cell, Config], max_concurrent: int, folder: Path) -> None:
    import ray.tune

    from raysegbg.state.results import service_name, start_service
    from raysegbg.tune import DRIVER_RESOURCES, plan_resources

    by_name = {c.name: to_dict(cfg) for c, cfg in todo.items()}
    first = next(iter(by_name.values()))
    _, concurrent = plan_resources(first, max_concurrent, len(by_name))
    # a method and its control at one seed share what their settings share (prn's base)
    service_id = f"compare-{folder.name}-{uuid.uuid4().hex[:8]}"
    service = start_service(service_id, str(folder.parent))  # noqa: F841 (kept alive)
    driver = ray.tune.with_parameters(_cell_driver, configs=by_name,
                                      results=service_name(service_id))  # fmt: skip
    tuner = ray.tune.Tuner(
        ray.tune.with_resources(driver, DRIVER_RESOURCES),
        param_space={"cell": ray.tune.grid_search(sorted(by_name))},
        tune_config=ray.tune.TuneConfig(max_concurrent_trials=concurrent),
        run_config=ray.tune.RunConfig(
            name="_trials", storage_path=str(folder), verbose=0, callbacks=[_progress(len(todo))]
        ),
    )
    tuner.fit()


def _progress(total: int) -> Any:
    """A Tune callback printing one line per finished run (Tune's own tables are off: every
    run prints its epoch lines already)."""
    import ray.tune

    class Progress(ray.tune.Callback):
        done = 0

        def report(self, trial: Any, how: str) -> None:
            self.done += 1
            print(f"compare: {trial.config['cell']} {how} ({self.done}/{total})", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.report(trial, "finished")

        def on_trial_error(self, iteration, trials, trial, **info):
            self.report(trial, "FAILED")

    return Progress()


def _cell_driver(
    params: dict[str, Any], configs: dict[str, dict[str, Any]], results: str | None = None
) -> None:
    from raysegbg.ray_train import run_trainer
    from raysegbg.tune import TRIAL_POLL_S

    cfg = from_dict(configs[params["cell"]])
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = TRIAL_POLL_S  # as a search's trials
    result = run_trainer(cfg, results=results)
    if result.error:
        raise result.error


def report(configs: dict[Cell, Config], folder: Path, score: str, log=print,
           tuned: dict[str, dict] | None = None, trials: int = 0) -> Path:  # fmt: skip
    """Score each final run on the test split (read once here, by these runs only; each
    run's checkpoint was chosen by `score` on validation) and write the report."""
    from raysegbg.inference import evaluate_run

    rows = []
    for cell, cfg in configs.items():
        metrics = evaluate_run(Path(cfg.logging.storage_path) / cfg.logging.name, "test", "best")
        rows.append(Row(cell.method, cell.variant, cell.seed, {m: metrics[m] for m in METRICS}))
    lines = summarize(rows)
    for line in lines:
        line["supervision"] = method_class(str(line["method"])).supervision
    write_report(lines, folder)
    _chart(lines, folder / "compare.png")
    _tensorboard(lines, folder / TB_DIR, folder / "compare.png")
    text = (folder / "compare.md").read_text()
    seeds = max(c.seed for c in configs) + 1
    note = (f"\ntest split, read once by each final run; checkpoints chosen by {score} on the "
            f"validation split; {seeds} seeds, paired by seed; differences in mIoU points with "
            "a 95 % t interval")  # fmt: skip
    if tuned:
        note += (f"\nsettings chosen on the validation split by a {trials}-trial search per "
                 f"method (train.seed={TUNE_SEED}, not a final seed; {TUNED_FILE}):")  # fmt: skip
        for method, params in tuned.items():
            shown = ", ".join(f"{k}={_short(v)}" for k, v in sorted(params.items()))
            note += f"\n- {method}: {shown or 'its defaults (an empty space)'}"
    log(text + note)
    (folder / "compare.md").write_text(text + note + "\n")
    return folder


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


TB_DIR = "tb"  # the comparison's TensorBoard folder: one HParams session per method, the chart


def _tensorboard(lines: list[dict[str, Any]], logdir: Path, chart: Path) -> None:
    """The report in TensorBoard: one HParams session per method (its test-split means and
    differences, in percentage points for the differences) and the chart as an image.
    Rewritten whole each time the comparison ends."""
    import numpy as np
    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter

    from raysegbg.hparams import METRIC_PREFIX
    from raysegbg.tb import write_experiment, write_session

    shutil.rmtree(logdir, ignore_errors=True)
    sessions = []
    for line in lines:
        hparams = {"method": str(line["method"]), "supervision": str(line["supervision"]),
                   "seeds": int(line["seeds"]), "verdict": str(line.get("verdict", "-")),
                   "mechanism": str(line.get("mechanism", "-"))}  # fmt: skip
        metrics = {f"{METRIC_PREFIX}test/{m}": float(line[m][0]) for m in METRICS}
        for name, diff in (("vs_baseline", line.get("vs_baseline")),
                           ("vs_control", line.get("vs_control"))):  # fmt: skip
            if diff is not None:
                metrics[f"{METRIC_PREFIX}{name}/miou_points"] = 100 * diff.mean
        write_session(logdir / str(line["method"]), hparams, metrics, experiment=False)
        sessions.append((hparams, metrics))
    tags = sorted({tag for _, metrics in sessions for tag in metrics})
    write_experiment(logdir, [h for h, _ in sessions], tags)
    with SummaryWriter(str(logdir)) as writer:
        writer.add_image("compare", np.asarray(Image.open(chart).convert("RGB")), 0,
                         dataformats="HWC")  # fmt: skip


def _chart(lines: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 * len(lines) + 2, 3.5))
    names = [str(line["method"]) for line in lines]
    means = [100 * line["miou"][0] for line in lines]
    errors = [100 * line["miou"][1] for line in lines]
    ax.bar(names, means, yerr=errors, capsize=4, color="#4c72b0")
    ax.set_ylabel("test mIoU (mean ± std over seeds)")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


# -- command line -------------------------------------------------------------------------------
def add_compare_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("compare", help="every method and its control, over seeds")
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument("--methods", default="baseline,colab,prn,mcibi",
                   help="comma-separated; must include baseline")  # fmt: skip
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--budget", type=int, default=0, help="epochs per run (0: the config's)")
    p.add_argument("--config", help="base config YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--address", help="a Ray cluster to join (default: a private local Ray)")
    p.add_argument("--name", default="compare", help="folder under logging.storage_path")
    p.add_argument("--max-concurrent", type=int, default=0)
    p.add_argument("--tune", type=int, default=0, metavar="N",
                   help="choose each method's settings first: an N-trial search of "
                   "<spaces>/<method>.yaml on the validation split (0: defaults)")  # fmt: skip
    p.add_argument("--spaces", default="search_spaces", help="folder of the search spaces")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    from raysegbg.config import check_name

    check_name("--name", args.name)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        method_class(m)  # an unknown method: one line, before anything else
    opts = CompareOptions(
        data=args.data, methods=methods, seeds=args.seeds, budget=args.budget,
        config=args.config, overrides=args.set, address=args.address, name=args.name,
        max_concurrent=args.max_concurrent, tune=args.tune, spaces=args.spaces,
    )  # fmt: skip
    run_compare(opts, log=lambda line: print(line, file=sys.stdout, flush=True))
    return 0
