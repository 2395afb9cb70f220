"""On Ray, a run whose newest checkpoint is also its best still keeps the one before it, so
a newest checkpoint cut short has something to fall back to."""

from __future__ import annotations

import pytest

from raysegbg.checkpoint import STATE_FILE, list_checkpoints
from raysegbg.cli import main
from raysegbg.config import load_config
from raysegbg.ray_train import fit
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.slow


def test_newest_and_previous_are_kept_when_the_newest_is_best(
    ray_local, tiny_data, tmp_path, capsys
):
    values = {
        "scaling.workers": 1,
        "train.epochs": 3,
        "train.steps_per_epoch": 1,
        "logging.name": "keep",
        "logging.score": "epoch",
        "logging.image_every": 100,
    }
    fit(load_config(None, tiny_overrides(tiny_data, tmp_path, **values)))  # fmt: skip
    run = tmp_path / "keep"
    assert [m["epoch"] for _, m in list_checkpoints(run)] == [2, 3]  # "epoch" grows: 3 is best

    state = run / "epoch_0003" / STATE_FILE
    state.write_bytes(state.read_bytes()[:100])
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--split", "val"]) == 0
    assert "falling back to" in capsys.readouterr().err
