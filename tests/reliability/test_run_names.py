"""Run and search names stay one folder inside the storage path: a name that could point
elsewhere is refused with one line at config load or argument parsing, before Ray starts."""

from __future__ import annotations

import pytest

from raysegbg import jobs
from raysegbg.cli import main
from raysegbg.config import load_config
from raysegbg.errors import RaysegbgError

BAD = ["../escape", "a/b", "a\\b", "..", ".hidden", "/abs/run", "a..b", "x\0y"]


@pytest.mark.parametrize("name", BAD)
def test_config_refuses_a_name_that_leaves_the_storage_path(name):
    with pytest.raises(RaysegbgError) as info:
        load_config(None, [f"logging.name={name}"])
    message = str(info.value)
    assert "\n" not in message and "logging.name" in message and "e.g." in message


def test_config_file_is_checked_too(tmp_path):
    (tmp_path / "c.yaml").write_text("logging:\n  name: ../../etc\n")
    with pytest.raises(RaysegbgError, match="logging.name"):
        load_config(tmp_path / "c.yaml")


@pytest.mark.parametrize("name", ["baseline-20261122-023512", "lr_3e-4.b", "run 1", ""])
def test_plain_names_pass(name):
    assert load_config(None, [f"logging.name={name}"]).logging.name == name


@pytest.fixture
def no_ray(monkeypatch):
    """Anything that would start Ray or a job fails the test."""
    import raysegbg.ray_train
    import raysegbg.tune

    def started(*args, **kwargs):
        raise AssertionError("Ray was reached before the name was checked")

    monkeypatch.setattr(raysegbg.ray_train, "fit", started)
    monkeypatch.setattr(raysegbg.tune, "init_ray", started)
    monkeypatch.setattr(jobs, "submit", started)


COMMANDS = [
    ["train", "--name", "../escape"],
    ["train", "--name", ""],
    ["tune", "--space", "s.yaml", "--name", "a/b"],
    ["tune", "--space", "s.yaml", "--name", ""],
    ["tune", "--resume", "../escape"],
    ["submit", "--name", ".hidden", "--", "train"],
    ["submit", "--", "train", "--name", "/abs"],
    ["submit", "--", "tune", "--resume", ".."],
]


@pytest.mark.parametrize("argv", COMMANDS, ids=" ".join)
def test_cli_refuses_it_with_one_line(argv, capsys, no_ray):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --") and "\n" not in err and "folder name" in err
