"""`raysegbg compare` (issue #20): every method and its control at every seed on Ray, the test
split scored once per final run, a report; a second call resumes without retraining."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from raysegbg.compare import CompareOptions, cells, run_compare
from raysegbg.config import load_config
from raysegbg.errors import RaysegbgError
from tests.conftest import tiny_overrides
from tests.tb_read import sessions, tags


def test_cells_pair_each_method_and_its_control_over_the_seeds():
    got = cells(CompareOptions(data="d", methods=["baseline", "mcibi", "colab"], seeds=2))
    names = [c.name for c in got]
    assert names == ["baseline-seed0", "baseline-seed1", "mcibi-seed0", "mcibi-seed1",
                     "mcibi-control-seed0", "mcibi-control-seed1", "colab-seed0",
                     "colab-seed1", "colab-control-seed0", "colab-control-seed1"]  # fmt: skip


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        (dict(methods=["mcibi"]), "include baseline"),
        (dict(methods=["baseline", "baseline"]), "twice"),
        (dict(seeds=1), "at least 2 seeds"),
        (dict(methods=["baseline", "nosuch"]), "nosuch"),
    ],
)
def test_bad_comparisons_fail_in_one_line_before_ray(opts, message, tiny_data, tmp_path,
                                                     monkeypatch):  # fmt: skip
    import raysegbg.ray_train as ray_train

    monkeypatch.setattr(ray_train, "init_ray", lambda *a: pytest.fail("Ray started"))
    base = dict(data=str(tiny_data), overrides=tiny_overrides(tiny_data, tmp_path))
    with pytest.raises(RaysegbgError, match=message) as err:
        run_compare(CompareOptions(**{**base, **opts}))
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_compare_runs_every_cell_reports_and_resumes(ray_local, tiny_data, tmp_path):
    """With --tune: each method's search (its own machinery is tested in test_tune, stood in
    for here) runs on validation at the tuning seed, and the method and its control both run
    with what it chose."""
    spaces = tmp_path / "spaces"
    spaces.mkdir()
    for method in ("baseline", "mcibi"):
        (spaces / f"{method}.yaml").write_text("params:\n  optim.lr: {type: float, low: 0.001, "
                                               "high: 0.1}\n")  # fmt: skip
    opts = CompareOptions(
        data=str(tiny_data), methods=["baseline", "mcibi"], seeds=2, budget=2,
        overrides=tiny_overrides(tiny_data, tmp_path, **{"scaling.workers": 1}), name="cmp",
        tune=3, spaces=str(spaces),
    )  # fmt: skip
    import raysegbg.inference as inference
    import raysegbg.tune as tune
    from raysegbg.compare import TUNE_SEED

    searches = []
    chosen = {"baseline": {"optim.lr": 0.003},
              "mcibi": {"optim.lr": 0.0025, "method.mcibi.momentum": 0.5}}  # fmt: skip

    def search(search_opts):
        cfg = load_config(search_opts.config, search_opts.overrides)
        searches.append((cfg.method.name, search_opts.samples, cfg.train.seed,
                         search_opts.metric, Path(search_opts.space).name))  # fmt: skip
        best = SimpleNamespace(params={"method.name": cfg.method.name, **chosen[cfg.method.name]})
        return SimpleNamespace(best=best)

    scored = []  # every split the driver scores a run on
    evaluate_run = inference.evaluate_run

    def recording(run_dir, split="test", which="best", *args, **kwargs):
        scored.append((Path(run_dir).name, split, which))
        return evaluate_run(run_dir, split, which, *args, **kwargs)

    lines = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inference, "evaluate_run", recording)
        mp.setattr(tune, "run_search", search)
        folder = run_compare(opts, log=lines.append)
    assert searches == [("baseline", 3, TUNE_SEED, "val/miou", "baseline.yaml"),
                        ("mcibi", 3, TUNE_SEED, "val/miou", "mcibi.yaml")]  # fmt: skip
    for cell in cells(opts):  # the method and its control run with the chosen settings
        cfg = load_config(folder / cell.name / "config.yaml")
        assert cfg.optim.lr == chosen[cell.method]["optim.lr"], cell.name
    assert load_config(folder / "mcibi-control-seed1" / "config.yaml").method.mcibi.momentum == 0.5
    # the test split: read once per final run, after training, by this report only
    assert sorted(scored) == sorted((c.name, "test", "best") for c in cells(opts))
    runs = sorted(p.name for p in folder.iterdir() if (p / "epoch_0002" / "meta.json").is_file())
    assert runs == sorted(c.name for c in cells(opts))  # 2 baseline + 2 mcibi + 2 controls
    with (folder / "compare.csv").open() as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"baseline", "mcibi"} and rows["mcibi"]["seeds"] == "2"
    assert rows["mcibi"]["verdict"] in {"helps", "hurts", "no evidence"}
    assert rows["mcibi"]["mechanism"] and rows["baseline"]["verdict"] == ""
    for method, variant in (("baseline", "method"), ("mcibi", "method")):
        own = [evaluate_run(folder / c.name, "test", "best") for c in cells(opts)
               if (c.method, c.variant) == (method, variant)]  # fmt: skip
        for metric in ("miou", "fg_dice", "precision", "fpr"):  # the table is the runs' own
            defined = [m[metric] for m in own if math.isfinite(m[metric])]  # (no fg: no precision)
            mean = sum(defined) / len(defined)
            assert float(rows[method][f"{metric}_mean"]) == pytest.approx(mean, abs=1e-9)
    for cell in cells(opts):  # training validated on val only; no run logged a test metric
        cfg = (folder / cell.name / "config.yaml").read_text()
        assert "val_split: val" in cfg
        assert not any("test" in t for t in tags(folder / cell.name / "tb")["scalars"])
    md = (folder / "compare.md").read_text()
    assert "test split, read once" in md and "| mcibi |" in md
    assert "3-trial search per method" in md and "- mcibi: method.mcibi.momentum=0.5" in md
    assert (folder / "compare.png").stat().st_size > 1000
    # TensorBoard: one HParams session per method holding the table's numbers, and the chart
    found = sessions(folder / "tb")
    assert {run: [s["method"] for s in ss] for run, ss in found.items()} == {
        "baseline": ["baseline"], "mcibi": ["mcibi"]}  # fmt: skip
    assert found["mcibi"][0]["verdict"] == rows["mcibi"]["verdict"]
    for method in ("baseline", "mcibi"):
        acc = EventAccumulator(str(folder / "tb" / method))
        acc.Reload()
        logged = acc.Scalars("hparams/test/miou")[0].value
        assert logged == pytest.approx(float(rows[method]["miou_mean"]), abs=1e-6)
    diff = EventAccumulator(str(folder / "tb" / "mcibi"))
    diff.Reload()
    points = diff.Scalars("hparams/vs_baseline/miou_points")[0].value
    assert points == pytest.approx(100 * float(rows["mcibi"]["diff_baseline"]), abs=1e-4)
    assert "compare" in tags(folder / "tb")["images"]
    # the control really ran with the memory frozen
    control = (folder / "mcibi-control-seed0" / "config.yaml").read_text()
    assert "update: false" in control
    before = (folder / "compare.csv").read_text()
    again = []
    with pytest.MonkeyPatch.context() as mp:  # resumes: no search, nothing left to train
        mp.setattr(tune, "run_search", lambda o: pytest.fail("searched again"))
        run_compare(opts, log=again.append)
    assert "(6 already done)" in again[0]
    assert (folder / "compare.csv").read_text() == before
