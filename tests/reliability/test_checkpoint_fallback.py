"""A newest checkpoint cut short (a crash while it was written) is skipped for the one
before it, with one warning line naming it; a run with no readable checkpoint left gives a
one-line error, never torch's PytorchStreamReader traceback."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from raysegbg.checkpoint import META_FILE, STATE_FILE, load_checkpoint, load_state
from raysegbg.cli import main
from raysegbg.errors import RaysegbgError
from raysegbg.local import train_local
from tests.reliability.conftest import tiny_config


def truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("keep", [0.5, 0.0])
def test_a_truncated_newest_checkpoint_falls_back_to_the_previous(run_copy, capsys, keep):
    truncate(run_copy / "epoch_0002" / STATE_FILE, keep)
    folder, state = load_checkpoint(run_copy, "last")
    assert folder == run_copy / "epoch_0001" and state["epoch"] == 0
    warning = capsys.readouterr().err.strip()
    assert warning.startswith("warning: ") and "\n" not in warning
    assert str(run_copy / "epoch_0002") in warning and "truncated or corrupt" in warning


def test_a_truncated_meta_file_is_skipped_too(run_copy, capsys):
    truncate(run_copy / "epoch_0002" / META_FILE, 0.5)
    assert load_checkpoint(run_copy, "last")[0] == run_copy / "epoch_0001"
    warning = capsys.readouterr().err.strip()
    assert "\n" not in warning and str(run_copy / "epoch_0002") in warning


def test_eval_uses_the_previous_checkpoint(run_copy, capsys):
    truncate(run_copy / "epoch_0002" / STATE_FILE, 0.5)
    assert main(["eval", "--run", str(run_copy), "--checkpoint", "last", "--split", "val"]) == 0
    out = capsys.readouterr()
    assert "miou" in out.out
    assert len(out.err.strip().splitlines()) == 1 and "epoch_0002" in out.err


def test_eval_of_a_run_whose_only_checkpoint_is_truncated_is_one_line(run_copy, capsys):
    shutil.rmtree(run_copy / "epoch_0001")
    truncate(run_copy / "epoch_0002" / STATE_FILE, 0.5)
    assert main(["eval", "--run", str(run_copy)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no readable checkpoint") and "\n" not in err
    assert str(run_copy / "epoch_0002") in err and "Traceback" not in err


def test_resume_continues_from_the_previous_checkpoint(run_copy, tiny_data, capsys):
    truncate(run_copy / "epoch_0002" / STATE_FILE, 0.5)
    cfg = tiny_config(tiny_data, run_copy.parent, **{"train.epochs": 3})
    _, host = train_local(cfg, run_copy, log=lambda line: None)
    assert [r["epoch"] for r in host.reports] == [2, 3]  # epoch 2 trained again
    assert "epoch_0002" in capsys.readouterr().err
    assert load_state(run_copy / "epoch_0002")["epoch"] == 1  # rewritten, readable


def test_load_state_names_the_bad_file(run_copy):
    truncate(run_copy / "epoch_0001" / STATE_FILE, 0.5)
    with pytest.raises(RaysegbgError) as info:
        load_state(run_copy / "epoch_0001")
    assert str(run_copy / "epoch_0001" / STATE_FILE) in str(info.value)
    assert "\n" not in str(info.value)
