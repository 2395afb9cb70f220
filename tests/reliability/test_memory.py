"""Memory pressure ends a run with one line, never a multi-page traceback or a hang (issue #19).

Ray's memory monitor is made to fire at once (its kill threshold set to 5 % of this machine's
memory), and the kernel's OOM killer is stood in for by SIGKILL to the run's own Ray head.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from raysegbg import failures
from tests.conftest import tiny_overrides, train_command

pytestmark = pytest.mark.slow

RAY_2_60 = (  # the sentence Ray 2.60 puts deep inside the failure chain (abridged)
    "1 worker(s) were killed due to the node running low on memory. Memory on the node "
    "(IP: 192.0.2.2, ID: 0b56) was 1.72GB used / 23.54GB limit (0.072999)\n"
    "OOM kill reason: Memory usage 1841651712B exceeded threshold of 1263810176B "
    "(5.0% of 25276203008B limit)\n"
    "Selected to kill: (Task: job ID=01000000, task name=RayTrainWorker.__init__, required "
    "resources={}, pid=23169, actual memory used=0.84GB, worker ID=c603)"
)


def test_an_oom_deep_in_the_chain_becomes_one_line_with_the_figures():
    from ray.exceptions import OutOfMemoryError

    try:
        try:
            raise OutOfMemoryError(RAY_2_60)
        except OutOfMemoryError as cause:
            raise RuntimeError("Training failed due to controller error") from cause
    except RuntimeError as exc:
        error = failures.explain(exc, "run 'x'")
    line = str(error)
    assert "\n" not in line and line.startswith("run 'x' stopped: Ray killed RayTrainWorker")
    assert "(0.84 GB)" in line and "1.72 GB of 23.54 GB" in line and "limit of 5%" in line
    assert "train.batch_size" in line  # what to change
    older = failures.explain(ValueError("OutOfMemoryError: was 21.3GB / 23.5GB (0.906) ... "
                                        "exceeds the memory usage threshold of 0.9"))  # fmt: skip
    assert "21.30 GB of 23.50 GB, above Ray's limit of 90%" in str(older)
    assert failures.explain(RuntimeError("a worker raised ValueError")) is None


def _train(overrides: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        train_command(overrides, "--workers", "1"), cwd=cwd, env={**os.environ, **env},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_ray_s_memory_monitor_ends_a_run_with_one_line(tiny_data, tmp_path):
    env = {"RAY_memory_usage_threshold": "0.05", "RAY_memory_monitor_refresh_ms": "100"}
    proc = _train(tiny_overrides(tiny_data, tmp_path / "runs"), env, tmp_path)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err and "Traceback" not in out
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: run ") and "ran out of memory: the node used" in last, err


def test_a_run_whose_ray_head_is_killed_ends_at_once_with_one_line(tiny_data, tmp_path):
    overrides = tiny_overrides(tiny_data, tmp_path / "runs", **{"train.epochs": 500})
    proc = _train(overrides, {}, tmp_path)
    try:
        deadline = time.monotonic() + 180
        while not list(
            (tmp_path / "runs").glob("*/checkpoint_manager_snapshot.json")
        ):  # training is under way
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
            time.sleep(0.5)
        head = failures.head_processes(proc.pid)
        assert set(head.values()) == {"gcs_server", "raylet"}, head
        os.kill(next(pid for pid, name in head.items() if name == "raylet"), signal.SIGKILL)
        killed = time.monotonic()
        out, err = proc.communicate(timeout=45)  # Ray's own wait for its head is 60 s
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert time.monotonic() - killed < 15
    assert proc.returncode == 3
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: this run's local Ray stopped (raylet died"), err[-2000:]
    assert "resume" in last and "Traceback" not in err
