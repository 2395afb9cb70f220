"""W workers on a split global batch must equal one worker on the whole batch."""

from pathlib import Path

import torch

from raysegbg.config import load_config
from raysegbg.methods.base import StepInfo
from raysegbg.train import Trainer, WorkerContext
from tests.conftest import tiny_overrides
from tests.multiproc import run_ranks


def first_step(rank: int, world: int, overrides: list[str]) -> dict:
    """Loss and gradients of the first step (no optimiser update) on this rank."""
    cfg = load_config(None, overrides)
    trainer = Trainer(cfg, WorkerContext(run_dir=Path("unused"), rank=rank, world_size=world))
    batch = next(trainer.loader.epoch(0))
    trainer.method.train()
    losses = trainer.runner.module("main")(batch, StepInfo(0, 0, 1.0))
    losses["loss"].backward()  # DDP averages gradients over ranks here
    grads = {n: p.grad.clone() for n, p in trainer.method.named_parameters() if p.grad is not None}
    return {"loss": losses["loss"].item(), "grads": grads, "ids": batch.ids}


def test_two_workers_equal_one_worker_on_the_same_global_batch(tiny_data, tmp_path):
    overrides = tiny_overrides(tiny_data, tmp_path, **{"scaling.workers": 1})
    (single,) = run_ranks(first_step, 1, overrides)
    pair = run_ranks(first_step, 2, overrides)
    assert pair[0]["ids"] + pair[1]["ids"] == single["ids"]
    # each rank's loss is its share of the global mean, scaled by W: their mean is the global loss
    assert abs((pair[0]["loss"] + pair[1]["loss"]) / 2 - single["loss"]) < 1e-5
    assert single["grads"].keys() == pair[0]["grads"].keys()
    for name, g in single["grads"].items():
        for rank in (0, 1):
            torch.testing.assert_close(pair[rank]["grads"][name], g, rtol=1e-4, atol=1e-6)


def test_without_global_batchnorm_the_gradients_differ(tiny_data, tmp_path):
    """The check above can fail: per-rank BatchNorm statistics change the gradients."""
    overrides = tiny_overrides(tiny_data, tmp_path, **{"model.sync_bn": "false"})
    (single,) = run_ranks(first_step, 1, overrides)
    pair = run_ranks(first_step, 2, overrides)
    diffs = [(pair[0]["grads"][n] - g).abs().max().item() for n, g in single["grads"].items()]
    assert max(diffs) > 1e-4
