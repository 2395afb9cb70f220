"""What a run's TensorBoard holds, read back from its event files (no Ray): every tag on one x
axis (optimiser steps or epochs, never both), and one HParams session with the settings runs
are compared by, the run's method's only."""

import pytest

from raysegbg import train
from raysegbg.config import load_config, to_dict
from raysegbg.hparams import final_metrics, run_hparams
from raysegbg.local import train_local
from raysegbg.tb import epoch_tag
from tests.conftest import tiny_overrides
from tests.tb_read import scalar_steps, sessions, tags

STEPS, EPOCHS = 3, 2  # tiny_overrides: 3 steps an epoch, 2 epochs
STEP_TAGS = {"train/loss", "train/ce", "train/dice", "lr"}
EPOCH_TAGS = {"train_epoch/loss", "train_epoch/ce", "train_epoch/dice", "val/miou",
              "val/fg_dice", "perf/images_per_s", "perf/epoch_s"}  # fmt: skip
# another method's settings in the config (a search over methods sets several): not logged
OTHER_METHOD = "method.mcibi.dims=48"


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory):
    """A baseline run logging every step, then resumed for one more epoch."""
    root = tmp_path_factory.mktemp("tb_layout")
    overrides = [*tiny_overrides(tiny_data, root, **{"logging.name": "run"}), OTHER_METHOD]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "LOG_EVERY", 1)
        train_local(load_config(None, overrides))
        cfg = load_config(None, [*overrides, f"train.epochs={EPOCHS + 1}"])
        metrics, _ = train_local(cfg)
    return root, cfg, metrics


def test_step_and_epoch_tags_are_distinct_with_one_x_axis_each(run):
    root, _, _ = run
    logdir = root / "run" / "tb"
    scalars = set(tags(logdir)["scalars"])
    assert STEP_TAGS | EPOCH_TAGS <= scalars
    all_steps = list(range(1, STEPS * (EPOCHS + 1) + 1))
    epochs = list(range(1, EPOCHS + 2))
    for tag in sorted(scalars):
        steps = scalar_steps(logdir, tag)
        if tag.startswith("hparams/"):
            assert steps == [0], tag  # the session's final metrics: one point
        elif tag in STEP_TAGS or tag.startswith("train/"):
            assert steps == all_steps, tag
        else:
            assert not tag.startswith("train/") and steps == epochs, tag
    assert epoch_tag("train/loss") == "train_epoch/loss" and epoch_tag("val/miou") == "val/miou"


def test_a_run_has_one_hparams_session_with_its_method_settings_only(run):
    root, cfg, metrics = run
    found = sessions(root / "run")
    assert list(found) == ["tb"] and len(found["tb"]) == 1  # the resumed run replaced its first
    (hparams,) = found["tb"]
    assert to_dict(cfg)["method"]["mcibi"]["dims"] == 48  # in the config, not in the session
    assert hparams["method.name"] == "baseline"
    assert {k for k in hparams if k.startswith("method.")} == {
        "method.name", "method.baseline.ce_weight", "method.baseline.dice_weight",
        "method.baseline.class_weights",
    }  # fmt: skip
    for left_out in ("data.path", "logging.storage_path", "logging.name", "model.weights_path"):
        assert left_out not in hparams
    assert hparams["optim.lr"] == pytest.approx(cfg.optim.lr)
    assert hparams["train.epochs"] == EPOCHS + 1 and hparams["logging.score"] == "val/miou"
    assert hparams["data.augment"] == "true"  # a bool as text, not 1.0
    assert hparams["model.encoder_weights"] == "null"  # None kept as a column
    logged = set(tags(root / "run" / "tb")["scalars"])
    assert {"hparams/val/miou", "hparams/val/fg_dice", "hparams/best_score"} <= logged
    assert final_metrics(metrics, ["val/miou"])["hparams/best_score"] == metrics["best_score"]


def test_hparams_keep_the_chosen_method_of_a_config_with_several():
    cfg = to_dict(load_config(None, ["method.name=mcibi", "method.baseline.dice_weight=0.3"]))
    hparams = run_hparams(cfg)
    methods = {k.split(".")[1] for k in hparams if k.startswith("method.") and k != "method.name"}
    assert methods == {"mcibi"} and hparams["method.name"] == "mcibi"
    plugin = {
        **cfg,
        "method": {**cfg["method"], "name": "tests.toy_method:Toy", "toy": {"ema": 0.5}},
    }
    assert {k for k in run_hparams(plugin) if k.startswith("method.")} == {
        "method.name",
        "method.toy.ema",
    }
    first = final_metrics({"val/miou": 0.5, "train/loss": 1.0, "best_score": float("nan")},
                          ["train/loss"])  # fmt: skip
    assert list(first) == ["hparams/train/loss", "hparams/val/miou"]  # NaN left out
