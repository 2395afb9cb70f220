"""Bad input fails with one clear line (exit 2) before Ray starts, leaving nothing behind."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raysegbg import ray_train
from raysegbg.cli import main


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started for bad input")

    monkeypatch.setattr(ray_train, "init_ray", refuse)


def run_cli(args: list[str], capsys) -> str:
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def save(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture
def folder(tmp_path):
    """A valid image/mask folder pair the cases below break one way each."""
    for i in range(4):
        save(tmp_path / "img" / f"a{i}.png", np.full((32, 32, 3), 40 * i, np.uint8))
        save(tmp_path / "msk" / f"a{i}.png", np.zeros((32, 32), np.uint8))
    return tmp_path


def import_args(root: Path) -> list:
    return ["data", "import", "folder", "--images", root / "img", "--masks", root / "msk",
            "--classes", "background", "object", "--out", root / "out"]  # fmt: skip


@pytest.mark.parametrize(
    "breakage, expected",
    [
        (lambda r: (r / "msk" / "a2.png").unlink(), "a2"),
        (lambda r: save(r / "msk" / "a1.png", np.zeros((30, 32), np.uint8)), "32"),
        (lambda r: save(r / "msk" / "a3.png", np.full((32, 32), 7, np.uint8)), "7"),
        (lambda r: (r / "img" / "a0.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really"), "a0"),
        (lambda r: [p.unlink() for p in (r / "img").iterdir()], "no"),
    ],
    ids=["missing-mask", "size-mismatch", "label-out-of-range", "corrupt-png", "empty-dataset"],
)
def test_bad_import(folder, capsys, breakage, expected):
    breakage(folder)
    err = run_cli(import_args(folder), capsys)
    assert expected in err
    assert not (folder / "out").exists()
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []  # no temp dirs


def train_args(data: Path, tmp_path: Path, *extra) -> list:
    return ["train", "--set", f"data.path={data}", "--set", f"logging.storage_path={tmp_path}",
            "--set", "logging.name=bad", *extra]  # fmt: skip


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--set", "train.epohcs=2"], "unknown config key 'train.epohcs': valid keys are"),
        (["--set", "optim.lr=fast"], "config key 'optim.lr' expects float"),
        (["--set", "model.arch=UNetto"], "unknown model.arch 'UNetto': choose one of"),
        (["--set", "model.encoder=resnet7"], "unknown model.encoder 'resnet7': choose one of"),
        (["--set", "method.name=magic"], "unknown method 'magic'"),
        (["--address", "127.0.0.1:1"], "cannot reach a Ray cluster at 127.0.0.1:1"),
        (["--config", "nope.yaml"], "config file nope.yaml not found"),
    ],
)
def test_bad_train(tiny_data, tmp_path, capsys, extra, expected):
    err = run_cli(train_args(tiny_data, tmp_path, *extra), capsys)
    assert expected in err
    assert not (tmp_path / "bad").exists()


def test_unknown_architecture_lists_the_valid_ones(tiny_data, tmp_path, capsys):
    err = run_cli(train_args(tiny_data, tmp_path, "--set", "model.arch=x"), capsys)
    assert "unet" in err and "deeplabv3plus" in err and "segformer" in err


def test_missing_dataset(tmp_path, capsys):
    err = run_cli(train_args(tmp_path / "nothing", tmp_path), capsys)
    assert "no dataset at" in err and "raysegbg data make" in err


def test_missing_run_folder(tmp_path, capsys):
    err = run_cli(["eval", "--run", tmp_path / "no-such-run"], capsys)
    assert "not a raysegbg run folder" in err
    err = run_cli(
        ["predict", "--run", tmp_path, "--input", tmp_path, "--output", tmp_path / "o"], capsys
    )
    assert "no images" in err and not (tmp_path / "o").exists()


def test_prn_rejects_a_multiclass_dataset(tmp_path, capsys):
    from raysegbg.data.synthetic import make_dataset

    data = tmp_path / "multi"
    make_dataset("ambiguous", data, n=12, size=32, seed=0)
    err = run_cli(train_args(data, tmp_path, "--set", "method.name=prn"), capsys)
    assert "prn refines binary segmentation but the dataset has" in err
    assert "varying_contrast" in err and not (tmp_path / "bad").exists()
