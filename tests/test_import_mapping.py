"""Mask values -> classes (label map, ignore value, 0/255 binary masks), the refusal of a class
without train pixels, and fixed splits from a split file: tiny 32 px inputs, no Ray."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from raysegbg.data.commands import add_data_commands, format_info
from raysegbg.data.format import SPLITS, class_frequencies, decode_png, read_meta, read_split
from raysegbg.data.importers import import_folder
from raysegbg.data.nifti import import_nifti
from raysegbg.errors import RaysegbgError

BINARY = ["background", "lesion"]


def run_cli(argv: list) -> int:
    parser = argparse.ArgumentParser()
    add_data_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


def write_pairs(root: Path, masks: list[np.ndarray]) -> tuple[Path, Path]:
    """Grey images c00, c01, ... with the given masks saved as 8-bit PNGs."""
    images, mask_dir = root / "images", root / "masks"
    images.mkdir(parents=True)
    mask_dir.mkdir()
    rng = np.random.default_rng(0)
    for i, mask in enumerate(masks):
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(
            images / f"c{i:02d}.png"
        )
        Image.fromarray(mask.astype(np.uint8), "L").save(mask_dir / f"c{i:02d}.png")
    return images, mask_dir


def square(values: tuple[int, ...]) -> np.ndarray:
    """32x32 mask of value `values[0]` with a 6x24 stripe of each further value."""
    mask = np.full((32, 32), values[0], np.uint8)
    for k, v in enumerate(values[1:]):
        mask[4 + 8 * k : 10 + 8 * k, 4:28] = v
    return mask


def folder_argv(images: Path, masks: Path, out: Path, *extra) -> list:
    return ["data", "import", "folder", "--images", images, "--masks", masks, "--out", out, *extra]


def masks_by_id(out: Path) -> dict[str, np.ndarray]:
    meta = read_meta(out)
    rows = [r for s in SPLITS if meta.splits[s] for r in read_split(out, s).to_pylist()]
    return {r["id"]: decode_png(r["mask"]) for r in rows}


def ids_by_split(out: Path) -> dict[str, list[str]]:
    meta = read_meta(out)
    return {
        s: sorted(read_split(out, s, columns=["id"])["id"].to_pylist()) if meta.splits[s] else []
        for s in SPLITS
    }


def assert_refused(err: pytest.ExceptionInfo, out: Path, *words: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


# ---------------------------------------------------------------- mask values


def test_binary_0_255_masks_keep_their_foreground(tmp_path: Path, capsys) -> None:
    images, masks = write_pairs(tmp_path, [square((0, 255)) for _ in range(12)])
    out = tmp_path / "ds"
    assert run_cli(folder_argv(images, masks, out, "--classes", *BINARY)) == 0
    printed = capsys.readouterr().out
    assert "255 as class 1 'lesion'" in printed and "--label-map" in printed
    assert "--ignore-value" in printed and "wrote" in printed
    assert all(set(np.unique(m)) == {0, 1} for m in masks_by_id(out).values())
    train = class_frequencies(out, "train")
    assert train[1] == 10 * 6 * 24  # every stripe pixel of the 10 train masks
    row = next(line for line in format_info(out).splitlines() if "lesion" in line)
    assert float(row.split()[2]) > 0  # `data info`: train px % of the foreground
    assert read_meta(out).provenance["mask_values"]["how"] == "auto-binary"


def test_0_1_255_masks_still_read_255_as_ignore(tmp_path: Path) -> None:
    images, masks = write_pairs(tmp_path, [square((0, 1, 255)) for _ in range(4)])
    import_folder(images, masks, tmp_path / "ds", classes=BINARY, val=0, test=0)
    assert all(set(np.unique(m)) == {0, 1, 255} for m in masks_by_id(tmp_path / "ds").values())


def test_label_map(tmp_path: Path) -> None:
    images, masks = write_pairs(tmp_path, [square((0, 100, 200, 7)) for _ in range(4)])
    out, args = tmp_path / "ds", ["--classes", "bg", "a", "b", "--val", "0", "--test", "0"]
    mapped = [*args, "--label-map", "0:0,100:2,200:1,7:255"]  # 7 -> 255: ignore
    assert run_cli(folder_argv(images, masks, out, *mapped)) == 0
    expected = np.select([square((0, 100, 200, 7)) == v for v in (100, 200, 7)], [2, 1, 255], 0)
    for mask in masks_by_id(out).values():
        np.testing.assert_array_equal(mask, expected)
    assert read_meta(out).provenance["mask_values"]["map"] == {"0": 0, "7": 255, "100": 2, "200": 1}
    with pytest.raises(RaysegbgError) as err:
        run_cli(folder_argv(images, masks, tmp_path / "ds2", *args, "--label-map", "0:0,100:2"))
    assert_refused(err, tmp_path / "ds2", "has value 7", str(masks / "c00.png"), "--label-map")


def test_ignore_value(tmp_path: Path) -> None:
    images, masks = write_pairs(tmp_path, [square((0, 1, 9)) for _ in range(4)])
    meta = import_folder(
        images, masks, tmp_path / "ds", classes=BINARY, ignore_value=9, val=0, test=0
    )
    assert meta.ignore_index == 255 and meta.provenance["mask_values"]["ignore_value"] == 9
    expected = np.select([square((0, 1, 9)) == 1, square((0, 1, 9)) == 9], [1, 255], 0)
    for mask in masks_by_id(tmp_path / "ds").values():
        np.testing.assert_array_equal(mask, expected)
    with pytest.raises(RaysegbgError) as err:  # 9 is no class and not the default ignore 255
        import_folder(images, masks, tmp_path / "ds2", classes=BINARY)
    assert_refused(err, tmp_path / "ds2", "has value 9", "c00.png", "--ignore-value")
    with pytest.raises(RaysegbgError) as err:
        both = {"label_map": {0: 0, 9: 1}, "ignore_value": 9}
        import_folder(images, masks, tmp_path / "ds2", classes=BINARY, **both)
    assert_refused(err, tmp_path / "ds2", "--ignore-value 9 is also in --label-map")


@pytest.mark.parametrize(
    "text, words",
    [
        ("0-0,255-1", ["is invalid", "0:0,255:1"]),
        ("0:0,0:1", ["maps raw value 0 twice"]),
        ("0:0,255:5", ["entry 255:5 is invalid", "0..1"]),
    ],
)
def test_bad_label_maps(tmp_path: Path, text: str, words: list[str]) -> None:
    images, masks = write_pairs(tmp_path, [square((0, 255)) for _ in range(3)])
    with pytest.raises(RaysegbgError) as err:
        run_cli(
            folder_argv(images, masks, tmp_path / "ds", "--classes", *BINARY, "--label-map", text)
        )
    assert_refused(err, tmp_path / "ds", *words)


# ---------------------------------------------------------------- classes without train pixels


def test_class_without_train_pixels_is_refused(tmp_path: Path) -> None:
    images, masks = write_pairs(tmp_path, [square((0, 255)) for _ in range(6)])
    with pytest.raises(RaysegbgError) as err:  # 255 declared "ignore": no lesion pixel left
        import_folder(images, masks, tmp_path / "ds", classes=BINARY, ignore_value=255)
    assert_refused(err, tmp_path / "ds", "class 1 'lesion' has no pixels", "255->ignore")
    with pytest.raises(RaysegbgError) as err:  # 0/255 with 3 classes is not read as binary
        import_folder(images, masks, tmp_path / "ds", classes=["bg", "a", "b"])
    assert_refused(err, tmp_path / "ds", "classes 1 'a', 2 'b' have no pixels", "--label-map")


def test_class_only_in_val_is_refused(tmp_path: Path) -> None:
    images, masks = write_pairs(tmp_path, [square((0, 1))] * 3 + [square((0, 1, 2))])
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["c00", "c01", "c02"], "val": ["c03"]}))
    with pytest.raises(RaysegbgError) as err:
        import_folder(images, masks, tmp_path / "ds", classes=["bg", "a", "b"], split_file=split)
    assert_refused(err, tmp_path / "ds", "class 2 'b' has no pixels in the 3 train masks")


# ---------------------------------------------------------------- split files


def test_split_file_is_honoured_exactly(tmp_path: Path) -> None:
    images, masks = write_pairs(tmp_path, [square((0, 255)) for _ in range(8)])
    fixed = {"train": ["c01", "c02", "c04", "c07"], "val": ["c00", "c05"], "test": ["c03", "c06"]}
    (tmp_path / "split.json").write_text(json.dumps(fixed))
    out, args = tmp_path / "ds", ["--classes", *BINARY, "--split-file", tmp_path / "split.json"]
    assert run_cli(folder_argv(images, masks, out, *args)) == 0
    assert ids_by_split(out) == fixed
    assert read_meta(out).provenance["split_file"] == str(tmp_path / "split.json")
    with pytest.raises(RaysegbgError) as err:
        run_cli(folder_argv(images, masks, tmp_path / "ds2", *args, "--val", "0.2"))
    assert_refused(err, tmp_path / "ds2", "--split-file", "--val/--test")


ALL = [f"c{i:02d}" for i in range(6)]


@pytest.mark.parametrize(
    "content, words",
    [
        ({"train": [*ALL, "c99", "x"]}, ["lists 2 ids", "'c99', 'x'", "file stems"]),
        ({"train": ALL, "val": ["c02"]}, ["'c02' is in both train and val"]),
        ({"train": [*ALL, "c01"]}, ["'c01' is twice in train"]),
        ({"train": ALL[:2], "test": ALL[2:3]}, ["3 of 6 images", "'c03', 'c04', 'c05'"]),
        ({"train": ALL, "validation": []}, ["keys: train, val, test"]),
        ({"train": [0, 1]}, ["string ids"]),
        ({"val": ALL}, ["no train ids"]),
        ([{"train": ALL, "val": []}], ["holds a list", "fold"]),
        ("{not json", ["is not valid JSON"]),
        (None, ["not found"]),
    ],
    ids=[
        "unknown",
        "two-splits",
        "twice",
        "unassigned",
        "key",
        "ints",
        "no-train",
        "folds",
        "json",
        "missing",
    ],  # fmt: skip
)
def test_bad_split_files(tmp_path: Path, content, words: list[str]) -> None:
    images, masks = write_pairs(tmp_path, [square((0, 255)) for _ in range(6)])
    split = tmp_path / "split.json"
    if content is not None:
        split.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(RaysegbgError) as err:
        import_folder(images, masks, tmp_path / "ds", classes=BINARY, split_file=split)
    assert_refused(err, tmp_path / "ds", str(split), *words)


# ---------------------------------------------------------------- NIfTI


def nifti_volume(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


def nifti_pairs(root: Path, labels: dict[str, np.ndarray]) -> list[tuple[Path, Path]]:
    rng = np.random.default_rng(0)
    return [
        (
            nifti_volume(root / f"{stem}.nii.gz", rng.normal(0, 1, lab.shape).astype(np.float32)),
            nifti_volume(root / f"{stem}_seg.nii.gz", lab),
        )
        for stem, lab in labels.items()
    ]


def test_nifti_split_file_ignore_value_and_train_pixels(tmp_path: Path) -> None:
    lab = np.zeros((16, 16, 6), np.int16)
    lab[2:8, 2:8] = 3
    lab[10:14, 10:14] = 9
    only_b = lab.copy()
    only_b[2:4, 12:14] = 5
    pairs = nifti_pairs(tmp_path, {"a": lab, "b": lab, "c": only_b})
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["a", "c"], "test": ["b"]}))
    meta = import_nifti(pairs, tmp_path / "ds", ignore_value=9, split_file=split)
    assert meta.classes == ("background", "label_3", "label_5")
    by_split = ids_by_split(tmp_path / "ds")
    assert {re.sub(r"_z\d+$", "", i) for i in by_split["train"]} == {"a", "c"}
    assert len(by_split["train"]) == 12 and len(by_split["test"]) == 6 and not by_split["val"]
    mask = masks_by_id(tmp_path / "ds")["b_z000"]
    assert set(np.unique(mask)) == {0, 1, 255}
    split.write_text(json.dumps({"train": ["a", "b"], "val": ["c"]}))
    with pytest.raises(RaysegbgError) as err:  # label 5 is only in c, which went to val
        import_nifti(pairs, tmp_path / "ds2", ignore_value=9, split_file=split)
    assert_refused(err, tmp_path / "ds2", "class 2 'label_5' has no pixels", "--split-file")
    with pytest.raises(RaysegbgError) as err:
        import_nifti(pairs, tmp_path / "ds2", split_file=split, val=0.2)
    assert_refused(err, tmp_path / "ds2", "--val/--test do not apply")
