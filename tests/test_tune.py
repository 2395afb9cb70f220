"""`raysegbg tune` on the shared local Ray: Optuna + ASHA over tiny Train runs, interrupted and
resumed, with its TensorBoard, reports and best config checked afterwards.

One search serves every test (trials cost ~25 s each on 2 CPUs): 3 trials one at a time,
interrupted with SIGTERM when the first trial ends (`kill`'s signal, which raysegbg turns into
Tune's own stop, the one Ctrl+C sends), then resumed with `--resume`. With the seeded sampler
the second trial is stopped by ASHA at epoch 1 and the third starts after it, so a placement
group leaked by a stopped trial would show up as an error (Train gives up waiting for workers
after 60 s) instead of passing.

What a user reads is checked on the same search: the trials' names, Ray's status table (the
console, captured), the event files, and TensorBoard's HParams table through the HTTP API a
browser uses (and, where Playwright and Debian's chromium are installed, in the browser).
"""

import argparse
import contextlib
import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
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
from tests.tb_read import scalar_steps, sessions, tags

pytestmark = pytest.mark.slow
SPACES = Path(__file__).resolve().parents[1] / "search_spaces"
SAMPLES = 3
# another method's settings in the base config: no trial's HParams session may hold them
OTHER_METHOD = "method.mcibi.dims=48"
CHROMIUM = Path("/usr/bin/chromium")  # Debian's (`apt-get install chromium`)


class InterruptOnce(ray.tune.Callback):
    """Sends the driver SIGTERM when a trial first ends. Once only: a resumed search restores
    its callbacks, this one included."""

    def __init__(self, flag: Path):
        self.flag = flag

    def on_trial_complete(self, iteration, trials, trial, **info):
        if not self.flag.exists():
            self.flag.touch()
            os.kill(os.getpid(), signal.SIGTERM)  # as Ctrl+C: Tune saves its state, stops


@pytest.fixture(scope="module")
def search(ray_local, tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    overrides = tiny_overrides(tiny_data, root, **{"train.epochs": 3, "scaling.workers": 1})
    overrides.append(OTHER_METHOD)
    opts = SearchOptions(
        space=str(SPACES / "baseline.yaml"), overrides=overrides, samples=SAMPLES,
        max_concurrent=1, name="search", seed=0,
    )  # fmt: skip
    console = io.StringIO()  # Ray's status tables (printed on this process's stdout)
    with contextlib.redirect_stdout(console):
        first = run_search(opts, callbacks=[InterruptOnce(root / "interrupted")])
        resumed = run_search(SearchOptions(resume="search", overrides=overrides))
    print(console.getvalue())  # still in the test's output
    return first, resumed, console.getvalue()


def test_interrupted_search_resumes_to_exactly_n_trials(search):
    first, resumed, _ = search
    assert first.interrupted and [r.status for r in first.rows].count("finished") == 1
    assert not resumed.interrupted and len(resumed.rows) == SAMPLES
    assert len({r.trial_id for r in resumed.rows}) == SAMPLES
    assert len({tuple(sorted(r.params.items())) for r in resumed.rows}) == SAMPLES  # no repeat
    done_first = next(r for r in first.rows if r.status == "finished")
    again = next(r for r in resumed.rows if r.trial_id == done_first.trial_id)
    assert again.params == done_first.params and again.status == "finished"


def test_every_trial_ends_and_the_trial_after_a_stopped_one_runs(search):
    _, resumed, _ = search
    assert {r.status for r in resumed.rows} <= {"finished", "stopped"}
    stopped = [r for r in resumed.rows if r.status == "stopped"]
    assert stopped and all(r.epochs < 3 for r in stopped)
    spans = {r.name: report_times(resumed.search_dir / r.name) for r in resumed.rows}
    later = [t for s in stopped for t, (start, _) in spans.items() if start > spans[s.name][1]]
    assert later, f"no trial started after a stopped one: {spans}"


def test_trials_are_named_by_search_index_and_values(search):
    _, resumed, _ = search
    names = sorted(r.name for r in resumed.rows)
    assert [n.split("_")[:2] for n in names] == [["search", f"{i:03d}"] for i in (1, 2, 3)]
    for row in resumed.rows:
        assert f"lr={row.params['optim.lr']:.3g}" in row.name, row.name
        assert f"arch={row.params['model.arch']}" in row.name, row.name
        trial_dir = resumed.search_dir / row.name  # Tune's trial files and the Train run
        assert (trial_dir / "progress.csv").is_file() and (trial_dir / "tb").is_dir()
        assert load_config(trial_dir / "config.yaml").logging.name == row.name
        assert row.trial_id and row.trial_id not in row.name


def test_trials_write_curves_images_and_one_hparams_session_each(search):
    _, resumed, _ = search
    found = sessions(resumed.search_dir)  # every session in every event file of the search
    assert sorted(found) == sorted(f"{r.name}/tb" for r in resumed.rows)
    for row in resumed.rows:
        run_tb = resumed.search_dir / row.name / "tb"
        assert not list(run_tb.parent.glob("events.out.tfevents*"))  # no Tune TBX duplicates
        logged = tags(run_tb)
        assert {"train/loss", "train_epoch/loss", "val/miou", "val/fg_dice"} <= set(
            logged["scalars"]
        )
        assert "val/images" in logged["images"]
        assert scalar_steps(run_tb, "val/miou")[: row.epochs] == list(range(1, row.epochs + 1))
        (recorded,) = found[f"{row.name}/tb"]  # exactly one: the run's own was replaced
        assert recorded.pop("status") == row.status
        methods = {k.split(".")[1] for k in recorded if k.startswith("method.")}
        assert methods == {"name", "baseline"} and recorded["method.name"] == "baseline"
        assert not {"data.path", "logging.storage_path", "logging.name"} & recorded.keys()
        assert recorded["logging.score"] == "val/miou" and recorded["train.epochs"] == 3
        for name, value in row.params.items():
            assert recorded[name] == (pytest.approx(value) if isinstance(value, float) else value)


def test_status_table_shows_epoch_and_searched_metric(search):
    *_, console = search
    tables = [t for t in console.split("== Status ==") if "| Trial name" in t]
    assert tables, console[-3000:]
    last = tables[-1]  # the resumed search's final table
    header = next(line for line in last.splitlines() if "| Trial name" in line)
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns[-2:] == ["epoch", "val/miou"], columns
    assert {"lr", "dice_weight", "weight_decay", "arch"} <= set(columns)
    assert not any(c.startswith(("train/", "perf/")) for c in columns)
    _, resumed, _ = search
    for row in resumed.rows:
        assert row.name in last


def test_tensorboard_hparams_table_lists_one_session_per_trial(search):
    _, resumed, _ = search
    expected = sorted(f"{r.name}/tb" for r in resumed.rows)
    with tensorboard(resumed.search_dir) as url:
        groups = wait_for_session_groups(url, len(expected))
        experiment = hparams_api(url, "experiment", {"experimentName": "", "includeMetrics": True})
    metrics = {m["name"]["tag"]: m["displayName"] for m in experiment["metricInfos"]}
    assert list(metrics)[0] == "hparams/val/miou" and metrics["hparams/val/miou"] == "val/miou"
    assert metrics["hparams/best_score"] == "best_score"  # the searched metric first, then these
    columns = [h["name"] for h in experiment["hparamInfos"]]
    assert not any(c.startswith("method.mcibi") or c == "data.path" for c in columns)
    differ = [h["name"] for h in experiment["hparamInfos"] if h.get("differs")]
    assert {"optim.lr", "optim.weight_decay", "method.baseline.dice_weight"} <= set(differ)
    assert columns[: len(differ)] == differ and "status" in columns  # shown first by default
    assert sorted(g["name"] for g in groups) == expected  # one row per trial, no other
    for row in resumed.rows:
        (group,) = [g for g in groups if g["name"] == f"{row.name}/tb"]
        assert len(group["sessions"]) == 1
        values = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
        assert values["hparams/val/miou"] == pytest.approx(row.metric)
        assert group["hparams"]["status"] == row.status


def test_hparams_dashboard_shows_every_trial_in_a_browser(search):
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="Playwright not installed (pip install playwright)"
    )
    if not CHROMIUM.exists():
        pytest.skip(f"no {CHROMIUM} (apt-get install chromium)")
    _, resumed, _ = search
    with tensorboard(resumed.search_dir) as url, sync_api.sync_playwright() as pw:
        wait_for_session_groups(url, len(resumed.rows))
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(f"{url}/#hparams")
            table = page.locator("#sessionGroupsTable")  # the table view (the first tab)
            for row in resumed.rows:  # one row per trial, named by its run
                table.get_by_text(f"{row.name}/tb", exact=True).wait_for(timeout=60_000)
            for column in ("optim.lr", "status", "val/miou"):  # shown without ticking anything
                table.get_by_text(column, exact=True).wait_for(timeout=10_000)
        finally:
            browser.close()


def test_reports_and_the_best_config_trains_as_is(search, tmp_path):
    _, resumed, _ = search
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


@contextlib.contextmanager
def tensorboard(logdir: Path):
    """A TensorBoard server over `logdir` on a free local port; yields its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [str(Path(sys.executable).with_name("tensorboard")), "--logdir", str(logdir),
               "--host", "127.0.0.1", "--port", str(port), "--reload_interval", "1"]  # fmt: skip
    log = tempfile.TemporaryFile()
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/data/plugins_listing", timeout=5).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise AssertionError(f"tensorboard did not start: {log.read()}") from None
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def hparams_api(url: str, route: str, request: dict) -> dict:
    """POST a request to the HParams plugin, as its dashboard does; the JSON answer."""
    data = json.dumps(request).encode()
    req = urllib.request.Request(f"{url}/data/plugin/hparams/{route}", data=data,
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=30) as answer:
        return json.loads(answer.read())


def wait_for_session_groups(url: str, count: int, timeout: float = 60) -> list[dict]:
    """The HParams table's rows, once TensorBoard has read at least `count` of them."""
    request = {"experimentName": "", "startIndex": 0, "sliceSize": 1000, "includeMetrics": True,
               "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE",
                                   "STATUS_RUNNING"]}  # fmt: skip
    deadline = time.monotonic() + timeout
    while True:
        groups = hparams_api(url, "session_groups", request).get("sessionGroups", [])
        if len(groups) >= count or time.monotonic() > deadline:
            return groups
        time.sleep(1)
