"""Built-in generators: shapes, determinism, the hetero_bg distractor, the head phantom's
brain-like background, and the data CLI."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pytest

from raysegbg.data.commands import add_data_commands
from raysegbg.data.format import class_frequencies, decode_png, read_meta, read_split
from raysegbg.data.synthetic import FG_RGB, GENERATORS, make_dataset
from raysegbg.errors import RaysegbgError


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_data_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_generator_shapes_and_labels(name: str) -> None:
    spec = GENERATORS[name]
    images, masks = spec(np.random.default_rng(0), 24, 48)
    assert images.shape == (24, 48, 48, spec.channels) and images.dtype == np.uint8
    assert masks.shape == (24, 48, 48) and masks.dtype == np.uint8
    assert masks.max() < len(spec.classes)
    assert all(m.any() for m in masks)  # every image has at least one object
    present = np.unique(masks)
    assert present.tolist() == list(range(len(spec.classes)))
    assert images.std() > 20  # not a blank canvas


def test_same_seed_gives_identical_shards(tmp_path: Path) -> None:
    for out, seed in (("a", 7), ("b", 7), ("c", 8)):
        make_dataset("multiclass", tmp_path / out, n=40, size=32, seed=seed, labeled_fraction=0.5)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    assert (tmp_path / "a" / files[-1]).read_bytes() != (tmp_path / "c" / files[-1]).read_bytes()


def test_make_dataset_meta_splits_and_labeled_fraction(tmp_path: Path) -> None:
    meta = make_dataset("hetero_bg", tmp_path / "ds", n=50, size=32, seed=1, labeled_fraction=0.2)
    assert meta.splits == {"train": 40, "val": 5, "test": 5}
    assert meta.labeled == {"train": 8, "val": 5, "test": 5}
    assert meta.classes == ("background", "foreground") and meta.channels == 3
    assert meta.provenance["generator"] == "hetero_bg" and meta.provenance["seed"] == 1
    assert meta.provenance["params"] == {"n": 50, "size": 32, "val": 0.1, "test": 0.1}
    rows = read_split(tmp_path / "ds", "train").to_pylist()
    assert all(r["image_labels"] == [0, 1] for r in rows)  # weak labels survive dropped masks
    assert sum(r["mask"] is not None for r in rows) == 8
    assert decode_png(rows[0]["image"]).shape == (32, 32, 3)


def test_hetero_bg_has_a_textured_distractor() -> None:
    """Some background is foreground-coloured, but its 4x4 texture is much rougher."""
    images, masks = GENERATORS["hetero_bg"](np.random.default_rng(3), 64, 64)
    blocks = images.astype(np.float32).reshape(64, 16, 4, 16, 4, 3).transpose(0, 1, 3, 2, 4, 5)
    blocks = blocks.reshape(64, 16, 16, 16, 3)
    labels = masks.reshape(64, 16, 4, 16, 4).transpose(0, 1, 3, 2, 4).reshape(64, 16, 16, 16)
    mean, rough = blocks.mean(axis=3), blocks[..., 0].std(axis=3)
    reddish = (mean[..., 0] - mean[..., 1] > 50) & (np.abs(mean - FG_RGB).max(-1) < 90)
    distractor = reddish & (labels == 0).all(-1)
    foreground = (labels == 1).all(-1)
    assert (distractor.reshape(64, -1).any(1)).mean() > 0.6  # most images have one
    assert rough[distractor].mean() > 4 * rough[foreground].mean()


def test_head_background_has_brain_like_tissue_touching_the_brain() -> None:
    """The head set's background is not one mode: air, bone and CSF are dark, but scalp and
    extra-cranial tissue are as bright as the brain, and in most slices some of that bright
    background touches the brain (the dark rings break), which is where a model over-segments."""
    images, masks = GENERATORS["head"](np.random.default_rng(5), 64, 64)
    img, brain = images[..., 0].astype(np.float32), masks == 1
    lo, hi = np.percentile(img[brain], [10, 90])
    like_brain = (img >= lo) & (img <= hi) & ~brain
    assert like_brain.sum() > 0.3 * brain.sum()  # plenty of brain-bright background
    assert (img[~brain] < lo).mean() > 0.5  # and most background is dark
    grown = brain.copy()  # the brain's 1-px outer rim
    grown[:, 1:] |= brain[:, :-1]
    grown[:, :-1] |= brain[:, 1:]
    grown[:, :, 1:] |= brain[:, :, :-1]
    grown[:, :, :-1] |= brain[:, :, 1:]
    touching = (like_brain & grown).reshape(64, -1).sum(1) >= 5  # pixels, not a noise speck
    assert touching.mean() > 0.5


def test_generator_is_fast() -> None:
    start = time.perf_counter()
    GENERATORS["hetero_bg"](np.random.default_rng(0), 1000, 64)
    assert time.perf_counter() - start < 10


def test_unknown_generator(tmp_path: Path) -> None:
    with pytest.raises(RaysegbgError, match="unknown generator 'nope': choose one of hetero_bg"):
        make_dataset("nope", tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


def test_cli_make_and_info(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "ds"
    argv = ["data", "make", "multiclass", "--out", str(out), "--n", "30", "--size", "32"]
    assert run_cli([*argv, "--labeled-fraction", "0.5", "--seed", "2"]) == 0
    with pytest.raises(RaysegbgError, match="already exists: pass --overwrite"):
        run_cli(argv)
    capsys.readouterr()
    assert run_cli(["data", "info", str(out)]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert "24" in next(line for line in lines if line.startswith("train"))
    assert next(line for line in lines if line.startswith("train")).split() == ["train", "24", "12"]
    assert "32x32, 3 channel(s); 4 classes" in text
    freq = class_frequencies(out, "train")
    disc = next(line for line in lines if " disc " in f"{line} ")
    assert f"{100 * freq[1] / freq.sum():.2f}" in disc
    for needle in ("background", "square", "triangle", "train px %", "generator: multiclass"):
        assert needle in text
    assert read_meta(out).provenance["labeled_fraction"] == 0.5
