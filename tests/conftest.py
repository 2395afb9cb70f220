"""Shared fixtures: one tiny seeded dataset and one local Ray per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Train V2 polls its workers every 2 s by default and a report waits for the next poll, which
# stretches every tiny run on the session's Ray (test_jobs and test_multinode set it too)
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest workers share the cores: one torch thread each in the pytest processes (Ray
    # Train workers set their own count), or OpenMP's spinning threads oversubscribe the CPU
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A 32x32 heterogeneous-background binary set (60 images)."""
    from raysegbg.data.synthetic import make_dataset

    out = tmp_path_factory.mktemp("data") / "hetero"
    make_dataset("hetero_bg", out, n=60, size=32, seed=0)
    return out


def tiny_overrides(data: Path, run_root: Path, **extra: object) -> list[str]:
    """--set overrides for a fast run on `tiny_data` (depth-3 ResNet-18, 32 px, 2 epochs)."""
    values = {
        "data.path": str(data),
        "data.crop_size": 32,
        "model.encoder_depth": 3,
        "model.decoder_channels": "[32,16,8]",
        "train.epochs": 2,
        "train.batch_size": 8,
        "train.steps_per_epoch": 3,
        "logging.storage_path": str(run_root),
        "logging.image_every": 1,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def train_command(overrides: list[str], *args: str) -> list[str]:
    """`raysegbg train` as a process of its own: `--set` for each override, then `args`."""
    sets = [word for kv in overrides for word in ("--set", kv)]
    return [sys.executable, "-m", "raysegbg.cli", "train", *sets, *args]


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance shared by every test that needs it (start costs ~5 s)."""
    import ray

    from raysegbg.ray_train import init_ray

    init_ray(None)
    yield ray
    ray.shutdown()


# Modules that start Ray clusters of their own (a head on 127.0.0.1, two nodes)
OWN_CLUSTERS = {
    "tests.test_jobs",
    "tests.test_multinode",
    "tests.reliability.test_memory",
    "tests.reliability.test_load",
    "tests.reliability.test_cli_signals",
}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook turns the marker into a group
def pytest_collection_modifyitems(config, items):
    """Under `pytest -n 3 --dist loadgroup` (make test) the tests on the session's Ray go to
    one worker, in file order, as in a serial run; the tests that start clusters of their own
    form a second group, which runs beside them (each cluster has its own ports, and those
    tests' deadlines allow for a loaded machine), while the workers fill in with the
    in-process tests (mostly single-threaded at 32 px). One group alone was the suite's
    critical path: ~950 s of its ~960 s; the tests on Ray mostly wait (for actors, polls,
    process starts), so a third worker keeps the 2 cores busier: clean-clone `make test`
    11m22s against 14m48s with two."""
    for item in items:
        if item.module.__name__ in OWN_CLUSTERS:
            item.add_marker(pytest.mark.xdist_group("own-clusters"))
        elif "ray_local" in item.fixturenames:
            item.add_marker(pytest.mark.xdist_group("ray"))


def pytest_configure(config):
    """Refuse to run with the grouping silently off (pytest 9.2 with pytest-xdist 3.8 drops it:
    pytest-xdist#1386): two Ray clusters at once on 2 cores and every module fixture twice."""
    if os.environ.get("PYTEST_XDIST_WORKER") or config.getoption("dist", "no") != "loadgroup":
        return
    from importlib.metadata import version

    def release(pkg):
        return tuple(int(p) for p in version(pkg).split(".")[:2] if p.isdigit())

    if release("pytest") >= (9, 2) and release("pytest-xdist") <= (3, 8):
        raise pytest.UsageError(
            "pytest 9.2 breaks pytest-xdist's --dist loadgroup (pytest-xdist#1386): "
            "pip install -e '.[dev]' (pins pytest<9.2) or run with TEST_WORKERS=0"
        )
