"""Four `raysegbg train` started at once on one machine (issue #19's load test): each starts its
own Ray with its own ports and writes its own run folder, and all four finish with the result
one of them gets alone (same seed: any cross-talk between the runs would change it)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import tiny_overrides, train_command

pytestmark = pytest.mark.slow
RUNS = 4
EPOCHS = 2


def _final(run_dir: Path) -> dict[str, float]:
    return json.loads((run_dir / f"epoch_{EPOCHS:04d}" / "meta.json").read_text())["metrics"]


def test_four_runs_started_at_once_all_finish_alike(tiny_data, tmp_path):
    # one CPU (and torch thread) per run: four runs share 2 cores, and a float sum split over
    # threads may round differently from run to run
    extra = {"scaling.workers": 1, "scaling.cpus_per_worker": 1, "train.epochs": EPOCHS,
             "logging.image_every": 100}  # fmt: skip
    procs = []
    for k in range(RUNS):
        overrides = tiny_overrides(tiny_data, tmp_path / f"root{k}", **extra)
        command = train_command(overrides, "--name", "run")
        procs.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, cwd=tmp_path))  # fmt: skip
    deadline = time.monotonic() + 400
    outputs = [p.communicate(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
        # (under this load Ray's TrainController may log a transient warning with a traceback,
        # "Failed to send resource request ... safe to ignore": Ray's, the run is unharmed)
        assert not [line for line in err.splitlines() if line.startswith("error:")], err[-3000:]
    finals = [_final(tmp_path / f"root{k}" / "run") for k in range(RUNS)]
    restarted = [k for k, (_, err) in enumerate(outputs) if "resuming at epoch" in err]
    for final in finals[1:]:
        assert final["val/miou"] == pytest.approx(finals[0]["val/miou"], abs=1e-6), (
            f"val mIoU {[f['val/miou'] for f in finals]}; runs restarted by Ray: {restarted}"
        )
    # each its own Ray: four GCS addresses (ports), none joined another's
    addresses = {json.loads((tmp_path / f"root{k}" / "run" / "environment.json").read_text())
                 ["ray_address"] for k in range(RUNS)}  # fmt: skip
    assert len(addresses) == RUNS and None not in addresses, addresses
