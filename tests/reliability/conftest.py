"""A tiny finished run (in-process, no Ray) that the reliability tests read, copy and damage."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from raysegbg.config import load_config
from raysegbg.local import train_local
from tests.conftest import tiny_overrides


def tiny_config(data: Path, root: Path, **extra: object):
    """Two epochs of one step each: a run with checkpoints epoch_0001 and epoch_0002."""
    values = {"train.steps_per_epoch": 1, "logging.image_every": 100, **extra}
    return load_config(None, tiny_overrides(data, root, **values))


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    train_local(tiny_config(tiny_data, root), root / "tiny", log=lambda line: None)
    return root / "tiny"


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    """A copy of the tiny run that a test may change."""
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))
