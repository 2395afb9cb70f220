"""`raysegbg tune` on the shared local Ray: Optuna + ASHA over tiny Train runs, interrupted and
resumed, with its TensorBoard, reports and best config checked afterwards.

One search serves every test (trials cost ~25 s each on 2 CPUs): 3 trials one at a time,
interrupted (the stop signal Ctrl+C sends) when the first trial ends, then resumed with
`--resume`. With the seeded sampler the second trial is stopped by ASHA at epoch 1 and the
third starts after it, so a placement group leaked by a stopped trial would show up as an
error (Train gives up waiting for workers after 60 s) instead of passing.
"""

import argparse
import csv
import os
import signal
from pathlib import Path

import pytest
import ray.tune

from raysegbg import tune
from raysegbg.config import load_config
from raysegbg.errors import RaysegbgError
from raysegbg.local import train_local
from raysegbg.tune import SearchOptions, run_search
from raysegbg.tune_commands import add_tune_commands
from tests.conftest import tiny_overrides
from tests.tb_read import hparams_of, scalar_steps, tags

pytestmark = pytest.mark.slow
SPACES = Path(__file__).resolve().parents[1] / "search_spaces"
SAMPLES = 3


class InterruptOnce(ray.tune.Callback):
    """Sends Tune the stop signal when a trial first ends. Once only: a resumed search
    restores its callbacks, this one included."""

    def __init__(self, flag: Path):
        self.flag = flag

    def on_trial_complete(self, iteration, trials, trial, **info):
        if not self.flag.exists():
            self.flag.touch()
            os.kill(os.getpid(), signal.SIGUSR1)  # Tune's handler: save state, stop


@pytest.fixture(scope="module")
def search(ray_local, tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    overrides = tiny_overrides(tiny_data, root, **{"train.epochs": 3, "scaling.workers": 1})
    opts = SearchOptions(
        space=str(SPACES / "baseline.yaml"), overrides=overrides, samples=SAMPLES,
        max_concurrent=1, name="search", seed=0,
    )  # fmt: skip
    first = run_search(opts, callbacks=[InterruptOnce(root / "interrupted")])
    resumed = run_search(SearchOptions(resume="search", overrides=overrides))
    return first, resumed


def test_interrupted_search_resumes_to_exactly_n_trials(search):
    first, resumed = search
    assert first.interrupted and [r.status for r in first.rows].count("finished") == 1
    assert not resumed.interrupted and len(resumed.rows) == SAMPLES
    assert len({r.trial_id for r in resumed.rows}) == SAMPLES
    assert len({tuple(sorted(r.params.items())) for r in resumed.rows}) == SAMPLES  # no repeat
    done_first = next(r for r in first.rows if r.status == "finished")
    again = next(r for r in resumed.rows if r.trial_id == done_first.trial_id)
    assert again.params == done_first.params and again.status == "finished"


def test_every_trial_ends_and_the_trial_after_a_stopped_one_runs(search):
    _, resumed = search
    assert {r.status for r in resumed.rows} <= {"finished", "stopped"}
    stopped = [r for r in resumed.rows if r.status == "stopped"]
    assert stopped and all(r.epochs < 3 for r in stopped)
    spans = {r.trial_id: report_times(resumed.search_dir / r.trial_id) for r in resumed.rows}
    later = [t for s in stopped for t, (start, _) in spans.items() if start > spans[s.trial_id][1]]
    assert later, f"no trial started after a stopped one: {spans}"


def test_trials_write_curves_images_and_one_hparams_session_each(search):
    _, resumed = search
    for row in resumed.rows:
        run_tb = resumed.search_dir / row.trial_id / "tb"
        assert not list(run_tb.parent.glob("events.out.tfevents*"))  # no Tune TBX duplicates
        found = tags(run_tb)
        assert {"train/loss", "val/miou", "val/fg_dice"} <= set(found["scalars"])
        assert "val/images" in found["images"]
        assert scalar_steps(run_tb, "val/miou")[: row.epochs] == list(range(1, row.epochs + 1))
        recorded = hparams_of(resumed.search_dir / "hparams" / row.trial_id)
        assert recorded.pop("status") == row.status
        assert recorded.keys() == row.params.keys()
        for name, value in row.params.items():
            assert recorded[name] == (pytest.approx(value) if isinstance(value, float) else value)


def test_reports_and_the_best_config_trains_as_is(search, tmp_path):
    _, resumed = search
    out = resumed.search_dir
    with (out / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == SAMPLES and {r["status"] for r in rows} <= {"finished", "stopped"}
    assert (out / "metric_vs_params.png").stat().st_size > 1000
    best = max(resumed.rows, key=lambda r: r.metric)
    assert resumed.best == best
    cfg = load_config(out / "best_config.yaml")
    assert cfg.optim.lr == pytest.approx(best.params["optim.lr"])
    assert cfg.model.arch == best.params["model.arch"] and cfg.logging.name == ""
    metrics, _ = train_local(cfg, tmp_path / "best")
    assert metrics["epoch"] == cfg.train.epochs and 0 <= metrics["val/miou"] <= 1


def test_bad_space_fails_in_one_line_before_ray(tmp_path, tiny_data, monkeypatch):
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started before the space was checked")

    monkeypatch.setattr(tune, "init_ray", no_ray)
    space = tmp_path / "bad.yaml"
    space.write_text("params:\n  optim.lrr: {type: log_float, low: 1.0e-4, high: 1.0e-2}\n")
    parser = argparse.ArgumentParser()
    add_tune_commands(parser.add_subparsers())
    argv = ["tune", "--space", str(space), *sum((["--set", o] for o in tiny_overrides(
        tiny_data, tmp_path)), [])]  # fmt: skip
    args = parser.parse_args(argv)
    with pytest.raises(RaysegbgError, match="unknown config key 'optim.lrr'"):
        args.func(args)
    space.write_text("params:\n  model.arch: {type: categorical, choices: [Unet, NoSuchNet]}\n")
    with pytest.raises(RaysegbgError, match="unknown model.arch 'NoSuchNet'"):
        args.func(parser.parse_args(argv))

    from raysegbg.data.synthetic import make_dataset

    multi = tmp_path / "multi"
    make_dataset("ambiguous", multi, n=12, size=32, seed=0)
    argv = ["tune", "--space", "search_spaces/all.yaml", *sum((["--set", o] for o in tiny_overrides(
        multi, tmp_path)), [])]  # fmt: skip
    with pytest.raises(RaysegbgError, match="all.yaml can choose prn refines binary segmentation"):
        args.func(parser.parse_args(argv))


def report_times(trial_dir: Path) -> tuple[float, float]:
    """Wall times of a trial's first and last epoch reports (Tune's progress.csv)."""
    with (trial_dir / "progress.csv").open() as f:
        times = [float(row["wall_time"]) for row in csv.DictReader(f)]
    return min(times), max(times)
