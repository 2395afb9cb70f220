"""The per-worker loop in plain torch: metrics, checkpoints, resume, TensorBoard, eval, predict."""

import numpy as np
import torch
from PIL import Image

from raysegbg.checkpoint import (
    checkpoint_name,
    list_checkpoints,
    pick_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from raysegbg.config import load_config
from raysegbg.inference import evaluate_run, predict_folder
from raysegbg.local import train_local
from tests.conftest import tiny_overrides
from tests.tb_read import hparams_of, scalar_steps, tags

EXPECTED_SCALARS = {
    "train/loss", "lr", "train/ce", "train/dice", "val/miou", "val/fg_dice", "val/precision",
    "val/recall", "val/fpr", "val/iou/background", "perf/images_per_s",
}  # fmt: skip


def test_local_runs_keep_checkpoints_as_ray_does(tmp_path):
    """The two best by score and the newest stay; the rest of an in-process run goes."""
    for epoch, score in enumerate([0.5, 0.9, 0.1, 0.8, 0.2], start=1):
        folder = tmp_path / checkpoint_name(epoch)
        save_checkpoint(folder, {"w": torch.zeros(1)}, {"epoch": epoch, "metrics": {"s": score}})
    prune_checkpoints(tmp_path, "s")
    assert [m["epoch"] for _, m in list_checkpoints(tmp_path)] == [2, 4, 5]


def test_train_resume_eval_predict(tiny_data, tmp_path):
    overrides = tiny_overrides(tiny_data, tmp_path, **{"logging.name": "run"})
    cfg = load_config(None, overrides)
    run_dir = tmp_path / "run"
    metrics, host = train_local(cfg, run_dir)
    assert [r["epoch"] for r in host.reports] == [1, 2]
    assert 0.0 <= metrics["val/miou"] <= 1.0 and metrics["step"] == 6
    assert [m["epoch"] for _, m in list_checkpoints(run_dir)] == [1, 2]

    # the same run with more epochs resumes at the next epoch, not from scratch
    longer = load_config(None, overrides + ["train.epochs=3"])
    metrics, host = train_local(longer, run_dir)
    assert [r["epoch"] for r in host.reports] == [3] and metrics["step"] == 9

    logdir = run_dir / "tb"
    found = tags(logdir)
    assert EXPECTED_SCALARS <= set(found["scalars"])
    assert "val/images" in found["images"]
    assert scalar_steps(logdir, "val/miou") == [1, 2, 3]  # no duplicate points after resume
    hparams = hparams_of(logdir)
    assert hparams["optim.lr"] == cfg.optim.lr and hparams["method.name"] == "baseline"

    best = pick_checkpoint(run_dir, "best")
    assert best.name.startswith("epoch_")
    result = evaluate_run(run_dir, "test")
    assert 0.0 <= result["miou"] <= 1.0 and result["samples"] > 0

    images = tmp_path / "in"
    images.mkdir()
    for i in range(3):
        Image.fromarray(np.full((40, 36, 3), 60 * i, np.uint8)).save(images / f"x{i}.png")
    assert predict_folder(run_dir, images, tmp_path / "out") == 3
    mask = np.asarray(Image.open(tmp_path / "out" / "x1.png"))
    assert mask.shape == (40, 36) and mask.max() < 2
