"""`raysegbg train` stopped with SIGTERM (`kill`, a scheduler) ends as Ctrl+C does: exit 130
and one line, not Ray's abort (exit -6 and a C++ stack dump); the same command resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from tests.conftest import tiny_overrides, train_command

pytestmark = pytest.mark.slow
EPOCHS = 6  # enough that the kill after the first checkpoint lands before the last epoch


def test_sigterm_stops_train_in_one_line_and_the_same_command_resumes(tiny_data, tmp_path):
    extra = {"train.epochs": EPOCHS, "train.steps_per_epoch": 16, "logging.image_every": 100}
    overrides = tiny_overrides(tiny_data, tmp_path / "runs", **extra)
    command = train_command(overrides, "--workers", "1", "--name", "r")
    run = tmp_path / "runs" / "r"
    proc = subprocess.Popen(command, cwd=tmp_path, stderr=subprocess.PIPE, text=True,
                            stdout=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not (run / "checkpoint_manager_snapshot.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted (the same command again resumes it)" in err
    assert "SIGTERM received" not in err and "Traceback" not in err
    done = sorted(p.name for p in run.glob("epoch_*"))
    assert done and len(done) < EPOCHS
    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    # the local Ray runs no preemption watcher (nothing preempts a local machine), so the
    # console carries no error line of Ray's about it
    assert "PreemptionWatcher" not in again.stderr + again.stdout
    meta = json.loads((run / f"epoch_{EPOCHS:04d}" / "meta.json").read_text())
    assert meta["metrics"]["epoch"] == EPOCHS
