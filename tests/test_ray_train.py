"""A real 2-worker TorchTrainer on a local Ray: report, checkpoint, resume, TensorBoard."""

import pytest

from raysegbg.checkpoint import list_checkpoints
from raysegbg.config import load_config
from raysegbg.ray_train import fit
from tests.conftest import tiny_overrides
from tests.tb_read import scalar_steps, tags

pytestmark = pytest.mark.slow


def test_two_workers_report_checkpoint_and_resume(ray_local, tiny_data, tmp_path):
    # scored by epoch, the newest checkpoint is always the best: the one before it is kept too
    overrides = tiny_overrides(
        tiny_data, tmp_path,
        **{"scaling.workers": 2, "logging.name": "ray-run", "logging.score": "epoch"},
    )  # fmt: skip
    first = fit(load_config(None, overrides))
    assert first.metrics["epoch"] == 2 and 0 <= first.metrics["val/miou"] <= 1
    assert first.best_checkpoint is not None and (first.best_checkpoint / "state.pt").is_file()
    run_dir = tmp_path / "ray-run"
    assert (run_dir / "config.yaml").is_file()
    assert {m["epoch"] for _, m in list_checkpoints(run_dir)} <= {1, 2}

    resumed = fit(load_config(None, overrides + ["train.epochs=3"]))
    assert resumed.metrics["epoch"] == 3 and resumed.metrics["step"] == 9
    assert [m["epoch"] for _, m in list_checkpoints(run_dir)] == [2, 3]  # a fall-back exists

    found = tags(run_dir / "tb")
    assert {"train/loss", "lr", "val/miou", "val/fg_dice", "val/fpr"} <= set(found["scalars"])
    assert "val/images" in found["images"]
    assert scalar_steps(run_dir / "tb", "val/fg_dice") == [1, 2, 3]


def test_mcibi_run_keeps_its_memory_in_the_actor_and_checkpoints(ray_local, tiny_data, tmp_path):
    import io

    import numpy as np
    import torch

    from raysegbg.checkpoint import load_state, pick_checkpoint
    from raysegbg.inference import evaluate_run
    from raysegbg.state import actor as state_actor

    overrides = tiny_overrides(
        tiny_data, tmp_path,
        **{"scaling.workers": 2, "logging.name": "mcibi-run", "method.name": "mcibi",
           "method.mcibi.dims": 8, "method.mcibi.attention_dims": 4, "train.snapshot_every": 2},
    )  # fmt: skip
    result = fit(load_config(None, overrides))
    run_dir = tmp_path / "mcibi-run"
    last = pick_checkpoint(run_dir, "last")
    state = load_state(last)
    with np.load(io.BytesIO(state["shared"]["memory-memory.npz"])) as snap:
        torch.testing.assert_close(
            torch.from_numpy(snap["memory"]), state["method"]["memory.memory"]
        )
        assert int(snap["version"]) == result.metrics["step"] == 6
    assert (run_dir / "state" / "latest" / "memories.json").is_file()  # async snapshots landed
    with pytest.raises(ValueError):
        state_actor.lookup("mcibi-run")  # the actor ends with its run
    assert "mcibi/memory_cosine" in tags(run_dir / "tb")["images"]
    assert 0 <= evaluate_run(run_dir, "test")["miou"] <= 1  # eval reads the checkpointed memory
