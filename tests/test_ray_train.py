"""A real 2-worker TorchTrainer on a local Ray: report, checkpoint, resume, TensorBoard, and
the run's shared-state actor (MCIBI keeps its class memory there)."""

import io
import subprocess
import sys

import numpy as np
import pytest
import torch

from raysegbg import storage
from raysegbg.checkpoint import list_checkpoints, load_state, pick_checkpoint
from raysegbg.config import load_config
from raysegbg.inference import evaluate_run
from raysegbg.ray_train import fit
from raysegbg.state import actor as state_actor
from tests.conftest import tiny_overrides
from tests.tb_read import scalar_steps, tags

pytestmark = pytest.mark.slow


def test_two_workers_report_checkpoint_resume_and_keep_the_memory_in_the_actor(
    ray_local, tiny_data, tmp_path
):
    """One run, trained and then resumed: every Ray Train run costs ~30 s of start-up here."""
    # scored by epoch, the newest checkpoint is always the best: the one before it is kept too
    overrides = tiny_overrides(
        tiny_data, tmp_path,
        **{"scaling.workers": 2, "logging.name": "ray-run", "logging.score": "epoch",
           "method.name": "mcibi", "method.mcibi.dims": 8, "method.mcibi.attention_dims": 4,
           "train.snapshot_every": 2},
    )  # fmt: skip
    first = fit(load_config(None, overrides))
    assert first.metrics["epoch"] == 2 and 0 <= first.metrics["val/miou"] <= 1
    assert first.best_checkpoint is not None and (first.best_checkpoint / "state.pt").is_file()
    run_dir = tmp_path / "ray-run"
    assert (run_dir / "config.yaml").is_file()
    assert {m["epoch"] for _, m in list_checkpoints(run_dir)} <= {1, 2}
    assert state_actor.alive("ray-run") == []  # the driver's actor ends with its run

    resumed = fit(load_config(None, overrides + ["train.epochs=3"]))
    assert resumed.metrics["epoch"] == 3 and resumed.metrics["step"] == 9
    assert [m["epoch"] for _, m in list_checkpoints(run_dir)] == [2, 3]  # a fall-back exists

    found = tags(run_dir / "tb")
    assert {"train/loss", "lr", "val/miou", "val/fg_dice", "val/fpr"} <= set(found["scalars"])
    assert {"val/images", "mcibi/memory_cosine"} <= set(found["images"])
    assert scalar_steps(run_dir / "tb", "val/fg_dice") == [1, 2, 3]

    # the actor's memory snapshot in the checkpoint is the workers' memory, and it carried on
    # across the resume (6 steps before, 3 after)
    state = load_state(pick_checkpoint(run_dir, "last"))
    with np.load(io.BytesIO(state["shared"]["memory-memory.npz"])) as snap:
        torch.testing.assert_close(
            torch.from_numpy(snap["memory"]), state["method"]["memory.memory"]
        )
        assert int(snap["version"]) == resumed.metrics["step"] == 9
    snapshot = storage.published(run_dir / "state" / "memories")
    assert snapshot is not None and (snapshot / "memories.json").is_file()  # async snapshots landed
    assert state_actor.alive("ray-run") == []
    assert 0 <= evaluate_run(run_dir, "test")["miou"] <= 1  # eval reads the checkpointed memory


def test_a_local_ray_worker_drops_the_autoscaler_clients_warnings_after_trains_log_setup(
    ray_local,
):
    """Train's controller warns, with a traceback, whenever the autoscaler request of a run on
    a busy local Ray takes over 5 s; the workers of the local Ray drop those warnings, also
    once Train's own logging setup has reset the levels under `ray.train`, and keep errors."""

    @ray_local.remote
    def emitted() -> list[str]:
        import logging
        import logging.config

        from raysegbg.ray_logs import AUTOSCALER_CLIENT

        stream = io.StringIO()
        logging.config.dictConfig({
            "version": 1, "disable_existing_loggers": False,
            "handlers": {"out": {"class": "logging.StreamHandler", "stream": stream}},
            "loggers": {"ray.train": {"handlers": ["out"], "level": "INFO"}},
        })  # fmt: skip
        client = logging.getLogger(AUTOSCALER_CLIENT)
        client.warning("request failed", exc_info=ValueError("timed out"))
        client.error("a real error")
        logging.getLogger("ray.train.other").warning("another warning")
        return stream.getvalue().splitlines()

    assert ray_local.get(emitted.remote()) == ["a real error", "another warning"]


def test_the_hook_every_local_ray_worker_runs_imports_neither_torch_nor_ray():
    """The hook's module is imported by every worker process of the local Ray."""
    code = ("import sys, raysegbg.ray_logs; "
            "print(sorted({'torch', 'ray', 'numpy'} & set(sys.modules)))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
