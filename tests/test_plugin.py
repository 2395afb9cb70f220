"""A method from outside the package (tests/toy_method.py), added without editing `raysegbg/`:
its settings are checked like any method's and a search over its own setting runs on Ray
Tune."""

from pathlib import Path

import pytest

from raysegbg.config import load_config, to_dict
from raysegbg.errors import RaysegbgError
from raysegbg.tune import SearchOptions, run_search
from tests.conftest import tiny_overrides
from tests.tb_read import scalar_steps

TOY = "tests.toy_method:Toy"
SPACE = Path(__file__).with_name("toy_space.yaml")


def test_plugin_settings_are_typed_checked_and_saved():
    cfg = load_config(None, [f"method.name={TOY}", "method.toy.ema=0.5"])
    assert cfg.method.params.ema == 0.5 and to_dict(cfg)["method"]["toy"]["ema"] == 0.5
    with pytest.raises(RaysegbgError, match="method.toy.ema must be in"):
        load_config(None, [f"method.name={TOY}", "method.toy.ema=1.5"])
    with pytest.raises(RaysegbgError, match="unknown config key 'method.toy.emma'"):
        load_config(None, [f"method.name={TOY}", "method.toy.emma=0.5"])
    with pytest.raises(RaysegbgError, match="cannot import method"):
        load_config(None, ["method.name=tests.no_such_module:Toy"])


@pytest.mark.slow
def test_plugin_tunes_on_ray(ray_local, tiny_data, tmp_path):
    """Two trials, each a Ray Train run in its own worker process, which imports the plug-in
    by the path the config carries (training in-process: tests/test_method_gates.py)."""
    search = SearchOptions(
        space=str(SPACE), samples=2, max_concurrent=1, name="toy-search", seed=0,
        scheduler="none",
        overrides=tiny_overrides(tiny_data, tmp_path, **{"scaling.workers": 1, "train.epochs": 1}),
    )  # fmt: skip
    done = run_search(search)
    assert len(done.rows) == 2 and all(r.status == "finished" for r in done.rows)
    assert {r.params["method.toy.ema"] for r in done.rows} <= {0.5, 0.8}
    for row in done.rows:  # after_step's scalars reached the trial's TensorBoard
        assert scalar_steps(done.search_dir / row.trial_id / "tb", "train/teacher_gap") == [1]
    best = load_config(done.search_dir / "best_config.yaml")
    assert best.method.name == TOY and best.method.params.ema in (0.5, 0.8)
