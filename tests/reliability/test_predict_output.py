"""`predict` never writes over its input or over masks already there (unless --overwrite),
and never leaves a half-written mask behind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raysegbg import inference
from raysegbg.cli import main
from raysegbg.errors import RaysegbgError


def images(folder: Path, names=("a.png", "b.png")) -> dict[str, bytes]:
    """A folder of small RGB images; returns their bytes by name."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / name)
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.fixture
def no_model(monkeypatch):
    """The refusals come before any work: loading the run fails the test."""

    def read_run(*args, **kwargs):
        raise AssertionError("predict read the run before checking its output folder")

    monkeypatch.setattr(inference, "read_run", read_run)


def predict(run: Path, input_dir: Path, output_dir: Path, *extra: str) -> int:
    return main(["predict", "--run", str(run), "--input", str(input_dir),
                 "--output", str(output_dir), *extra])  # fmt: skip


@pytest.mark.parametrize("output", [".", "masks", "./sub/masks"])
def test_output_in_the_input_folder_is_refused(tmp_path, capsys, no_model, output):
    before = images(tmp_path / "in")
    assert predict(tmp_path / "run", tmp_path / "in", tmp_path / "in" / output) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "or inside it" in err
    assert {p.name: p.read_bytes() for p in (tmp_path / "in").iterdir()} == before


def test_existing_masks_are_kept_without_overwrite(tmp_path, capsys, no_model):
    images(tmp_path / "in")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.png").write_bytes(b"mine")
    assert predict(tmp_path / "run", tmp_path / "in", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--overwrite" in err and "a.png" in err
    assert (tmp_path / "out" / "a.png").read_bytes() == b"mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]  # no temp folder


def test_two_images_with_one_mask_name_are_refused(tmp_path, capsys, no_model):
    images(tmp_path / "in", ("a.png", "a.jpg"))
    assert predict(tmp_path / "run", tmp_path / "in", tmp_path / "out") == 2
    assert "rename one" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_overwrite_replaces_only_the_masks(tiny_run, tmp_path):
    images(tmp_path / "in")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.png").write_bytes(b"mine")
    (tmp_path / "out" / "notes.txt").write_text("keep")
    assert predict(tiny_run, tmp_path / "in", tmp_path / "out", "--overwrite") == 0
    with Image.open(tmp_path / "out" / "a.png") as mask:
        assert mask.size == (32, 32)
    assert (tmp_path / "out" / "notes.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]


@pytest.mark.parametrize("existing", [False, True])
def test_a_failure_midway_leaves_nothing_half_written(tiny_run, tmp_path, monkeypatch, existing):
    images(tmp_path / "in", ("a.png", "b.png", "c.png"))
    if existing:
        (tmp_path / "out").mkdir()
    calls = []
    real = inference._predict_one

    def fail_on_second(method, arr):
        calls.append(1)
        if len(calls) == 2:
            raise RaysegbgError("simulated crash")
        return real(method, arr)

    monkeypatch.setattr(inference, "_predict_one", fail_on_second)
    with pytest.raises(RaysegbgError, match="simulated"):
        inference.predict_folder(tiny_run, tmp_path / "in", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == (["in", "out"] if existing else ["in"])
    assert not existing or not any((tmp_path / "out").iterdir())
