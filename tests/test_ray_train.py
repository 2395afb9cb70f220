"""A real 2-worker TorchTrainer on a local Ray: report, checkpoint, resume, TensorBoard."""

import pytest

from raysegbg.checkpoint import list_checkpoints
from raysegbg.config import load_config
from raysegbg.ray_train import fit
from tests.conftest import tiny_overrides
from tests.tb_read import scalar_steps, tags

pytestmark = pytest.mark.slow


def test_two_workers_report_checkpoint_and_resume(ray_local, tiny_data, tmp_path):
    overrides = tiny_overrides(
        tiny_data, tmp_path, **{"scaling.workers": 2, "logging.name": "ray-run"}
    )
    first = fit(load_config(None, overrides))
    assert first.metrics["epoch"] == 2 and 0 <= first.metrics["val/miou"] <= 1
    assert first.best_checkpoint is not None and (first.best_checkpoint / "state.pt").is_file()
    run_dir = tmp_path / "ray-run"
    assert (run_dir / "config.yaml").is_file()
    assert {m["epoch"] for _, m in list_checkpoints(run_dir)} <= {1, 2}

    resumed = fit(load_config(None, overrides + ["train.epochs=3"]))
    assert resumed.metrics["epoch"] == 3 and resumed.metrics["step"] == 9
    assert 3 in {m["epoch"] for _, m in list_checkpoints(run_dir)}

    found = tags(run_dir / "tb")
    assert {"train/loss", "lr", "val/miou", "val/fg_dice", "val/fpr"} <= set(found["scalars"])
    assert "val/images" in found["images"]
    assert scalar_steps(run_dir / "tb", "val/fg_dice") == [1, 2, 3]
