"""The Parquet dataset format: round trip, labeled fraction, validation and atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from raysegbg.data.format import (
    Sample,
    assign_splits,
    class_frequencies,
    decode_png,
    encode_png,
    read_meta,
    read_split,
    write_dataset,
)
from raysegbg.errors import RaysegbgError

CLASSES = ["background", "cat", "dog"]


def make_samples(n: int = 12, size: int = 32, channels: int = 3, seed: int = 0) -> list[Sample]:
    rng = np.random.default_rng(seed)
    splits = assign_splits(n, 0.25, 0.25, seed)
    shape = (size, size, 3) if channels == 3 else (size, size)
    out = []
    for i in range(n):
        mask = rng.integers(0, 3, (size, size), dtype=np.uint8)
        mask[0, : i % 5] = 255  # some ignore pixels
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        out.append(Sample(f"img_{i:03d}", splits[i], image, mask))
    return out


def write(out: Path, samples: list[Sample], **kw) -> object:
    args = {"name": "toy", "classes": CLASSES, "channels": 3, "provenance": {"src": "test"}}
    return write_dataset(out, samples, **{**args, **kw})


def assert_nothing_left(parent: Path, out: Path) -> None:
    assert not out.exists()
    leftovers = [p.name for p in parent.iterdir() if p.name.startswith(f".{out.name}")]
    assert leftovers == []


def test_round_trip_every_column(tmp_path: Path) -> None:
    samples = make_samples()
    meta = write(tmp_path / "ds", samples, shard_rows=4)
    by_id = {s.id: s for s in samples}
    seen = []
    for split in ("train", "val", "test"):
        table = read_split(tmp_path / "ds", split)
        assert table.schema.names == ["id", "split", "image", "mask", "image_labels"]
        for row in table.to_pylist():
            src = by_id[row["id"]]
            assert row["split"] == src.split == split
            np.testing.assert_array_equal(decode_png(row["image"]), src.image)
            np.testing.assert_array_equal(decode_png(row["mask"]), src.mask)
            expected = sorted(set(np.unique(src.mask).tolist()) - {255})
            assert row["image_labels"] == expected
            seen.append(row["id"])
    assert sorted(seen) == sorted(by_id)
    assert meta.num_classes == 3 and meta.channels == 3 and meta.image_size == (32, 32)
    assert meta.splits == {"train": 6, "val": 3, "test": 3} == meta.labeled
    assert meta.shards == (
        "train-00000.parquet",
        "train-00001.parquet",
        "val-00000.parquet",
        "test-00000.parquet",
    )
    assert read_meta(tmp_path / "ds") == meta
    raw = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert raw["format_version"] == 1 and raw["ignore_index"] == 255
    assert raw["image_size"] == [32, 32] and raw["provenance"]["src"] == "test"
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == sorted(
        [*meta.shards, "dataset.json"]
    )


def test_grayscale_unlabeled_and_mixed_sizes(tmp_path: Path) -> None:
    samples = make_samples(n=6, channels=1)
    samples[1].mask, samples[1].split = None, "train"
    samples.append(Sample("big", "train", np.zeros((40, 48), np.uint8), np.ones((40, 48), int)))
    meta = write(tmp_path / "ds", samples, channels=1)
    rows = {r["id"]: r for r in read_split(tmp_path / "ds", "train").to_pylist()}
    assert decode_png(rows["big"]["image"]).shape == (40, 48)
    assert rows["big"]["image_labels"] == [1]
    assert meta.image_size is None
    assert rows["img_001"]["mask"] is None and rows["img_001"]["image_labels"] is None
    assert sum(meta.labeled.values()) == len(samples) - 1


def test_labeled_fraction_drops_train_masks_only_and_keeps_labels(tmp_path: Path) -> None:
    samples = make_samples(n=40)
    meta = write(tmp_path / "a", samples, labeled_fraction=0.25, seed=3)
    assert meta.labeled["train"] == round(0.25 * meta.splits["train"])
    assert meta.labeled["val"] == meta.splits["val"] and meta.labeled["test"] == meta.splits["test"]
    rows = read_split(tmp_path / "a", "train").to_pylist()
    by_id = {s.id: s for s in samples}
    for row in rows:
        expected = sorted(set(np.unique(by_id[row["id"]].mask).tolist()) - {255})
        assert row["image_labels"] == expected
    kept = {r["id"] for r in rows if r["mask"] is not None}
    again = write(tmp_path / "b", samples, labeled_fraction=0.25, seed=3)
    other = write(tmp_path / "c", samples, labeled_fraction=0.25, seed=4)
    kept_b = {r["id"] for r in read_split(tmp_path / "b", "train").to_pylist() if r["mask"]}
    kept_c = {r["id"] for r in read_split(tmp_path / "c", "train").to_pylist() if r["mask"]}
    assert kept == kept_b and kept != kept_c
    assert again.labeled == other.labeled == meta.labeled


def test_same_input_gives_identical_bytes(tmp_path: Path) -> None:
    write(tmp_path / "a", make_samples(), labeled_fraction=0.5)
    write(tmp_path / "b", make_samples(), labeled_fraction=0.5)
    for f in sorted((tmp_path / "a").iterdir()):
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes()


def _bad(kind: str) -> list[Sample]:
    s = make_samples(n=8)
    if kind == "float image":
        s[3].image = s[3].image.astype(np.float32)
    elif kind == "channels":
        s[3].image = s[3].image[:, :, 0]
    elif kind == "mask size":
        s[3].mask = np.zeros((32, 40), np.uint8)
    elif kind == "mask class":
        s[5].mask[4, 4] = 3
    elif kind == "mask 3d":
        s[5].mask = np.zeros((32, 32, 3), np.uint8)
    elif kind == "duplicate id":
        s[4].id = s[2].id
    elif kind == "bad split":
        s[4].split = "dev"
    elif kind == "empty":
        s = []
    elif kind == "no train":
        s = [x for x in s if x.split != "train"]
    return s


BAD = {
    "float image": "image of 'img_003' has dtype float32",
    "channels": "image of 'img_003' has shape (32, 32) but the dataset has channels=3",
    "mask size": "mask for 'img_003' is 32x40 but its image is 32x32: masks must match",
    "mask class": "mask for 'img_005' contains class 3 but there are only 3 classes",
    "mask 3d": "mask of 'img_005' has shape (32, 32, 3)",
    "duplicate id": "duplicate sample id 'img_002'",
    "bad split": "sample 'img_004' has split 'dev'",
    "empty": "no samples to write",
    "no train": "the train split is empty",
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_input_raises_one_line_and_leaves_nothing(tmp_path: Path, kind: str) -> None:
    samples = _bad(kind)
    with pytest.raises(RaysegbgError) as err:
        write(tmp_path / "ds", samples)
    msg = str(err.value)
    assert BAD[kind] in msg and "\n" not in msg and ": " in msg
    assert_nothing_left(tmp_path, tmp_path / "ds")


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"channels": 2}, "channels=2 is not supported"),
        ({"classes": ["background"]}, "at least 2 unique names"),
        ({"labeled_fraction": 1.5}, "labeled_fraction=1.5 is out of range"),
        ({"ignore_index": 2}, "ignore_index=2 must be in 3..255"),
    ],
)
def test_bad_options(tmp_path: Path, kw: dict, needle: str) -> None:
    with pytest.raises(RaysegbgError, match=needle):
        write(tmp_path / "ds", make_samples(n=4), **kw)
    assert_nothing_left(tmp_path, tmp_path / "ds")


def test_overwrite_rules(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    write(out, make_samples(n=8))
    before = (out / "dataset.json").read_text()
    with pytest.raises(RaysegbgError, match="already exists: pass --overwrite"):
        write(out, make_samples(n=4))
    assert (out / "dataset.json").read_text() == before
    bad = make_samples(n=4)
    bad[0].mask = np.full((32, 32), 9, np.uint8)
    with pytest.raises(RaysegbgError):
        write(out, bad, overwrite=True)
    assert (out / "dataset.json").read_text() == before  # a failed overwrite keeps the old one
    meta = write(out, make_samples(n=4), overwrite=True)
    assert read_meta(out) == meta and sum(meta.splits.values()) == 4
    assert len(list(tmp_path.iterdir())) == 1
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(RaysegbgError, match="not a dataset: refusing"):
        write(other, make_samples(n=4), overwrite=True)
    assert (other / "keep.txt").exists()


def test_read_errors(tmp_path: Path) -> None:
    with pytest.raises(RaysegbgError, match=r"no dataset at .*: create one with `raysegbg data"):
        read_meta(tmp_path / "missing")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "dataset.json").write_text("{not json")
    with pytest.raises(RaysegbgError, match="dataset.json is invalid"):
        read_meta(tmp_path / "broken")
    samples = [s for s in make_samples(n=8) if s.split != "test"]
    write(tmp_path / "ds", samples)
    with pytest.raises(RaysegbgError, match=r"split 'test' .* is empty \(train=4, val=2, test=0\)"):
        read_split(tmp_path / "ds", "test")
    with pytest.raises(RaysegbgError, match="unknown split 'dev'"):
        read_split(tmp_path / "ds", "dev")


def test_read_split_columns_and_only_its_shards(tmp_path: Path) -> None:
    write(tmp_path / "ds", make_samples(n=12))
    (tmp_path / "ds" / "val-00000.parquet").write_bytes(b"garbage")  # must not be opened
    table = read_split(tmp_path / "ds", "train", columns=["id", "image_labels"])
    assert table.column_names == ["id", "image_labels"] and table.num_rows == 6
    assert pq.read_schema(tmp_path / "ds" / "train-00000.parquet").field("mask").nullable


def test_png_codec_and_corrupt_bytes() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_png(encode_png(rgb)), rgb)
    grey = rgb[:, :, 0]
    np.testing.assert_array_equal(decode_png(encode_png(grey[:, :, None])), grey)
    with pytest.raises(RaysegbgError, match="cannot decode image of 'x'") as err:
        decode_png(encode_png(rgb)[:20], what="image of 'x'")
    assert "\n" not in str(err.value)


def test_class_frequencies_count_pixels(tmp_path: Path) -> None:
    samples = make_samples(n=12)
    write(tmp_path / "ds", samples)
    expected = np.zeros(3, np.int64)
    for s in samples:
        if s.split == "val":
            expected += np.bincount(s.mask.ravel(), minlength=256)[:3]
    np.testing.assert_array_equal(class_frequencies(tmp_path / "ds", "val"), expected)


def test_assign_splits_counts_and_seed() -> None:
    a = assign_splits(50, 0.1, 0.2, 1)
    assert (a.count("train"), a.count("val"), a.count("test")) == (35, 5, 10)
    assert a == assign_splits(50, 0.1, 0.2, 1) and a != assign_splits(50, 0.1, 0.2, 2)
    with pytest.raises(RaysegbgError, match="val=0.6, test=0.5 are invalid"):
        assign_splits(10, 0.6, 0.5, 0)
