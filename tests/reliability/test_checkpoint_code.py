"""A checkpoint never runs code: a pickle that would call a function on load is refused with
one line, wherever raysegbg reads a checkpoint (load_state, eval, resume, prn's base)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from raysegbg.checkpoint import STATE_FILE, load_state
from raysegbg.cli import main
from raysegbg.errors import RaysegbgError
from raysegbg.local import LocalHost


class Payload:
    """Unpickling this creates the folder `marker` (a stand-in for any code)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def plant(state_file: Path, marker: Path) -> None:
    """Overwrite a checkpoint's model file with the payload, saved as torch.save saves."""
    torch.save({"method": Payload(marker), "epoch": 1}, state_file)


def assert_refused(message: str, state_file: Path) -> None:
    assert "\n" not in message
    assert str(state_file) in message and "refused" in message


def test_the_payload_is_live_when_loaded_unsafely(tmp_path):
    plant(tmp_path / STATE_FILE, tmp_path / "marker")
    torch.load(tmp_path / STATE_FILE, weights_only=False)
    assert (tmp_path / "marker").exists()  # so the tests below prove something


def test_load_state_refuses_a_checkpoint_holding_code(tmp_path):
    folder, marker = tmp_path / "epoch_0001", tmp_path / "marker"
    folder.mkdir()
    plant(folder / STATE_FILE, marker)
    with pytest.raises(RaysegbgError) as info:
        load_state(folder)
    assert_refused(str(info.value), folder / STATE_FILE)
    assert not marker.exists()


def plant_everywhere(run: Path, marker: Path) -> list[Path]:
    files = sorted(run.glob(f"epoch_*/{STATE_FILE}"))
    for state_file in files:
        plant(state_file, marker)
    return files


@pytest.mark.parametrize("which", ["best", "last"])
def test_eval_refuses_it_with_one_line(run_copy, tmp_path, capsys, which):
    marker = tmp_path / "marker"
    files = plant_everywhere(run_copy, marker)
    assert main(["eval", "--run", str(run_copy), "--checkpoint", which]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ")
    assert any(str(f) in err for f in files)
    assert_refused(err, next(f for f in files if str(f) in err))
    assert not marker.exists()


def test_resume_refuses_it(run_copy, tmp_path):
    marker = tmp_path / "marker"
    plant_everywhere(run_copy, marker)
    with pytest.raises(RaysegbgError, match="refused"):
        LocalHost(run_copy).restore()
    assert not marker.exists()


@pytest.mark.parametrize("point_at", ["run", "checkpoint"])
def test_prn_base_checkpoint_refuses_it(run_copy, tmp_path, point_at):
    from raysegbg.methods.prn.bases import load_base

    marker = tmp_path / "marker"
    files = plant_everywhere(run_copy, marker)
    path = run_copy if point_at == "run" else files[0].parent
    with pytest.raises(RaysegbgError) as info:
        load_base(torch.nn.Linear(1, 1), str(path), "val/miou")
    assert "refused" in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()


def test_a_real_checkpoint_loads_without_code(tiny_run):
    """What training saves is all tensors and plain values (weights_only accepts it)."""
    for state_file in tiny_run.glob(f"epoch_*/{STATE_FILE}"):
        state = torch.load(state_file, weights_only=True)
        assert state["method"] and state["step"] > 0
