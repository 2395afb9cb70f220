"""Folder, Pascal VOC and NIfTI importers on small inputs written by the tests themselves."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from raysegbg.data.commands import add_data_commands
from raysegbg.data.format import decode_png, read_meta, read_split
from raysegbg.data.importers import VOC_CLASSES, import_folder, import_voc
from raysegbg.data.nifti import import_nifti, slab_plan
from raysegbg.errors import RaysegbgError


def all_rows(path: Path) -> list[dict]:
    meta = read_meta(path)
    return [
        r
        for s in ("train", "val", "test")
        if meta.splits[s]
        for r in read_split(path, s).to_pylist()
    ]


def assert_nothing_left(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_data_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


# ---------------------------------------------------------------- folder


def write_folder(root: Path, n: int = 10, grey: bool = False) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    for i in range(n):
        arr = rng.integers(0, 256, (32, 40) if grey else (32, 40, 3), dtype=np.uint8)
        suffix = ".bmp" if i % 3 == 0 else ".png"
        Image.fromarray(arr).save(images / f"s{i:02d}{suffix}")
        Image.fromarray(rng.integers(0, 3, (32, 40), dtype=np.uint8), "L").save(
            masks / f"s{i:02d}.png"
        )
    return images, masks


def test_folder_round_trip(tmp_path: Path) -> None:
    images, masks = write_folder(tmp_path)
    meta = import_folder(
        images, masks, tmp_path / "ds", classes=["bg", "a", "b"], val=0.2, test=0.2, seed=1
    )
    assert meta.splits == {"train": 6, "val": 2, "test": 2} and meta.channels == 3
    assert meta.image_size == (32, 40) and meta.provenance["importer"] == "folder"
    for row in all_rows(tmp_path / "ds"):
        src = next(images.glob(f"{row['id']}.*"))
        np.testing.assert_array_equal(decode_png(row["image"]), np.asarray(Image.open(src)))
        mask = np.asarray(Image.open(masks / f"{row['id']}.png"))
        np.testing.assert_array_equal(decode_png(row["mask"]), mask)


def test_folder_channels_inferred_and_resize(tmp_path: Path) -> None:
    images, masks = write_folder(tmp_path, n=4, grey=True)
    meta = import_folder(
        images, masks, tmp_path / "ds", classes=["bg", "a", "b"], val=0, test=0, resize=(16, 24)
    )
    assert meta.channels == 1 and meta.image_size == (16, 24)
    row = all_rows(tmp_path / "ds")[0]
    assert decode_png(row["image"]).shape == (16, 24)
    assert set(np.unique(decode_png(row["mask"]))) <= {0, 1, 2}  # nearest: no new values
    Image.new("RGB", (40, 32), (200, 10, 10)).save(images / "colour.png")
    Image.new("L", (40, 32)).save(masks / "colour.png")
    meta = import_folder(images, masks, tmp_path / "ds2", classes=["bg", "a", "b"])
    assert meta.channels == 3


def test_folder_missing_mask(tmp_path: Path) -> None:
    images, masks = write_folder(tmp_path, n=5)
    (masks / "s04.png").unlink()
    with pytest.raises(RaysegbgError, match=r"no mask for image 's04.png' .*--allow-unlabeled"):
        import_folder(images, masks, tmp_path / "ds", classes=["bg", "a", "b"])
    assert_nothing_left(tmp_path / "ds")
    meta = import_folder(
        images,
        masks,
        tmp_path / "ds",
        classes=["bg", "a", "b"],
        val=0,
        test=0,
        allow_unlabeled=True,
    )
    assert meta.labeled["train"] == 4 and meta.splits["train"] == 5


@pytest.mark.parametrize("which", ["images", "masks"])
def test_folder_corrupt_png(tmp_path: Path, which: str) -> None:
    images, masks = write_folder(tmp_path, n=6)
    target = (images if which == "images" else masks) / "s04.png"
    target.write_bytes(target.read_bytes()[:60])
    with pytest.raises(RaysegbgError, match=r"cannot read .*s04\.png.*replace or remove") as err:
        import_folder(images, masks, tmp_path / "ds", classes=["bg", "a", "b"])
    assert "\n" not in str(err.value)
    assert_nothing_left(tmp_path / "ds")


def test_folder_bad_masks(tmp_path: Path) -> None:
    images, masks = write_folder(tmp_path, n=4)
    Image.new("L", (20, 20)).save(masks / "s01.png")
    with pytest.raises(RaysegbgError, match="mask s01.png is 20x20 but its image s01.png is 32x40"):
        import_folder(images, masks, tmp_path / "ds", classes=["bg", "a", "b"])
    assert_nothing_left(tmp_path / "ds")
    Image.new("L", (40, 32), 7).save(masks / "s01.png")
    with pytest.raises(RaysegbgError, match=r"s01\.png has value 7, which is neither a class id"):
        import_folder(images, masks, tmp_path / "ds", classes=["bg", "a", "b"])
    assert_nothing_left(tmp_path / "ds")
    Image.new("RGB", (40, 32)).save(masks / "s01.png")
    with pytest.raises(RaysegbgError, match="has mode RGB: masks must be single-channel"):
        import_folder(images, masks, tmp_path / "ds", classes=["bg", "a", "b"])


# ---------------------------------------------------------------- VOC


def palette_png(mask: np.ndarray, path: Path) -> None:
    im = Image.fromarray(mask, "P")
    im.putpalette(list(np.random.default_rng(1).integers(0, 256, 768)))
    im.save(path)


def write_voc(root: Path, n: int = 12, test_txt: bool = False) -> None:
    rng = np.random.default_rng(0)
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    ids = [f"2007_{i:06d}" for i in range(n)]
    for i, sid in enumerate(ids):
        Image.fromarray(rng.integers(0, 256, (36, 48, 3), dtype=np.uint8)).save(
            root / "JPEGImages" / f"{sid}.jpg"
        )
        mask = np.zeros((36, 48), np.uint8)
        mask[5:20, 5:30] = 1 + i % 20
        mask[5, 5:30] = 255  # VOC's object boundary
        palette_png(mask, root / "SegmentationClass" / f"{sid}.png")
    sets = root / "ImageSets" / "Segmentation"
    sets.joinpath("train.txt").write_text("\n".join(ids[:6]) + "\n")
    sets.joinpath("val.txt").write_text("\n".join(ids[6:10] if test_txt else ids[6:]) + "\n")
    if test_txt:
        sets.joinpath("test.txt").write_text("\n".join(ids[10:]) + "\n")


def test_voc_layout(tmp_path: Path) -> None:
    write_voc(tmp_path / "VOC")
    meta = import_voc(tmp_path / "VOC", tmp_path / "ds", test_from_val=0.5)
    assert meta.classes == VOC_CLASSES and len(meta.classes) == 21
    assert meta.splits == {"train": 6, "val": 3, "test": 3}
    assert meta.provenance["test_source"] == "val"
    rows = {r["id"]: r for r in all_rows(tmp_path / "ds")}
    assert {k for k, r in rows.items() if r["split"] == "train"} == {
        f"2007_{i:06d}" for i in range(6)
    }
    mask = decode_png(rows["2007_000003"]["mask"])
    assert mask[10, 10] == 4 and mask[5, 10] == 255 and mask[30, 40] == 0
    assert rows["2007_000003"]["image_labels"] == [0, 4]
    assert decode_png(rows["2007_000003"]["image"]).shape == (36, 48, 3)


def test_voc_test_txt_and_resize(tmp_path: Path) -> None:
    write_voc(tmp_path / "VOC", test_txt=True)
    meta = import_voc(tmp_path / "VOC", tmp_path / "ds", resize=(18, 24))
    assert meta.splits == {"train": 6, "val": 4, "test": 2} and meta.image_size == (18, 24)
    assert meta.provenance["test_source"] == "test.txt"
    test_ids = {r["id"] for r in read_split(tmp_path / "ds", "test").to_pylist()}
    assert test_ids == {"2007_000010", "2007_000011"}


def test_voc_errors(tmp_path: Path) -> None:
    with pytest.raises(RaysegbgError, match="is not a Pascal VOC root"):
        import_voc(tmp_path, tmp_path / "ds")
    write_voc(tmp_path / "VOC")
    (tmp_path / "VOC" / "SegmentationClass" / "2007_000007.png").unlink()
    with pytest.raises(RaysegbgError, match=r"missing file .*2007_000007\.png: add it"):
        import_voc(tmp_path / "VOC", tmp_path / "ds")
    assert_nothing_left(tmp_path / "ds")


# ---------------------------------------------------------------- NIfTI


def write_volume(path: Path, data: np.ndarray, zoom: float = 1.0) -> Path:
    affine = np.diag([zoom, zoom, zoom, 1.0])
    affine[:3, 3] = (zoom - 1) / 2  # voxel j of a coarse grid covers fine voxels zoom*j...
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def nifti_pair(root: Path, shape=(24, 20, 50), stem: str = "vol") -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    image = rng.normal(100, 20, shape).astype(np.float32)
    label = np.zeros(shape, np.int16)
    label[4:12, 4:10, :] = 2001
    label[14:20, 8:16, 10:40] = 7
    image[label > 0] += 80
    return (
        write_volume(root / f"{stem}.nii.gz", image),
        write_volume(root / f"{stem}_seg.nii.gz", label),
    )


def slice_index(sid: str) -> int:
    return int(re.fullmatch(r"vol_z(\d+)", sid).group(1))


def test_nifti_auto_labels_ids_and_intensity(tmp_path: Path) -> None:
    pair = nifti_pair(tmp_path)
    meta = import_nifti([pair], tmp_path / "ds", slab=10, gap=2, val=0.2, test=0.2, seed=0)
    assert meta.classes == ("background", "label_7", "label_2001") and meta.channels == 1
    assert meta.provenance["label_mapping"] == {"7": 1, "2001": 2}
    assert meta.image_size == (20, 24)  # rot90 of a (24, 20) slice
    rows = all_rows(tmp_path / "ds")
    assert all(re.fullmatch(r"vol_z\d{3}", r["id"]) for r in rows)
    label = nib.load(pair[1]).get_fdata()
    for row in rows[:10]:
        z = slice_index(row["id"])
        expected = np.rot90(np.select([label[:, :, z] == 7, label[:, :, z] == 2001], [1, 2]))
        np.testing.assert_array_equal(decode_png(row["mask"]), expected)
    pixels = np.concatenate([decode_png(r["image"]).ravel() for r in rows])
    assert pixels.min() == 0 and pixels.max() == 255


def test_nifti_slab_splits_respect_gap(tmp_path: Path) -> None:
    meta = import_nifti(
        [nifti_pair(tmp_path)],
        tmp_path / "ds",
        binarize=True,
        slab=8,
        gap=3,
        val=0.3,
        test=0.3,
        seed=5,
    )
    assert meta.classes == ("background", "foreground")
    rows = all_rows(tmp_path / "ds")
    label = nib.load(tmp_path / "vol_seg.nii.gz").get_fdata()
    for row in rows[::7]:
        expected = np.rot90(label[:, :, slice_index(row["id"])] > 0).astype(np.uint8)
        np.testing.assert_array_equal(decode_png(row["mask"]), expected)
    split_of = {slice_index(r["id"]): r["split"] for r in rows}
    assert {"train", "val", "test"} == set(split_of.values())
    for slab in range(7):  # each slab belongs to a single split
        assert len({split_of[z] for z in range(slab * 8, slab * 8 + 8) if z in split_of}) <= 1
    for a in split_of:
        for b in split_of:
            if split_of[a] != split_of[b]:
                assert abs(a - b) > 3
    plan = slab_plan([50], 8, 3, 0.3, 0.3, 5)[0]
    cuts = sum(plan[b - 2] != plan[b + 1] for b in range(8, 50, 8) if b + 1 < 50)
    assert len(split_of) == 50 - 3 * cuts


@pytest.mark.parametrize("seed", range(20))
def test_slab_plan_property(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = [int(v) for v in rng.integers(5, 60, 3)]
    slab, gap = int(rng.integers(1, 9)), int(rng.integers(0, 5))
    eligible = [rng.random(k) > 0.3 for k in n]
    for plan in (
        slab_plan(n, slab, gap, 0.2, 0.2, seed),
        slab_plan(n, slab, gap, 0.2, 0.2, seed, eligible),
    ):
        for splits in plan:
            kept = [(z, s) for z, s in enumerate(splits) if s is not None]
            for (za, sa), (zb, sb) in zip(kept, kept[1:], strict=False):
                assert sa == sb or zb - za > gap


def test_slab_plan_uses_only_slabs_with_eligible_slices() -> None:
    eligible = [np.zeros(100, bool)]
    eligible[0][40:70] = True  # three useful slabs out of ten
    for seed in range(5):
        plan = slab_plan([100], 10, 2, 1 / 3, 1 / 3, seed, eligible)[0]
        assert {s for s in plan[40:70] if s} == {"train", "val", "test"}
    eligible[0][:] = True
    eligible[0][10:20] = False  # an unusable slab must not cause drops around it
    plan = slab_plan([30], 10, 2, 0.0, 0.0, 0, [eligible[0][:30]])[0]
    assert plan == ["train"] * 30


def test_nifti_label_map_min_foreground_and_size(tmp_path: Path) -> None:
    meta = import_nifti(
        [nifti_pair(tmp_path)],
        tmp_path / "ds",
        label_map={7: 1},
        slab=5,
        gap=0,
        val=0,
        test=0,
        min_foreground=0.1,
        size=(32, 32),
    )
    assert meta.classes == ("background", "label_7") and meta.image_size == (32, 32)
    z = sorted(slice_index(r["id"]) for r in all_rows(tmp_path / "ds"))
    assert z == list(range(10, 40))  # only slices where label 7 covers >= 10%
    mask = decode_png(all_rows(tmp_path / "ds")[0]["mask"])
    assert set(np.unique(mask)) == {0, 1}
    assert not mask[:, :3].any() and not mask[:, -3:].any()  # padded, not stretched


def test_nifti_shape_mismatch_and_resample(tmp_path: Path) -> None:
    image, _ = nifti_pair(tmp_path, shape=(24, 20, 50))
    coarse = np.zeros((12, 10, 25), np.uint8)
    coarse[2:6, 2:5, :] = 3
    label = write_volume(tmp_path / "coarse.nii.gz", coarse, zoom=2.0)
    with pytest.raises(RaysegbgError) as err:
        import_nifti([(image, label)], tmp_path / "ds")
    msg = str(err.value)
    assert "(12, 10, 25)" in msg and "(24, 20, 50)" in msg and "--resample-labels" in msg
    assert "\n" not in msg
    assert_nothing_left(tmp_path / "ds")
    import_nifti([(image, label)], tmp_path / "ds", resample_labels=True, val=0, test=0)
    row = next(r for r in all_rows(tmp_path / "ds") if r["id"] == "vol_z020")
    expected = np.rot90(np.kron(coarse[:, :, 10], np.ones((2, 2), np.uint8)) > 0)
    np.testing.assert_array_equal(decode_png(row["mask"]), expected.astype(np.uint8))


def test_nifti_several_volumes_with_the_same_stem(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    pairs = [nifti_pair(tmp_path / "a"), nifti_pair(tmp_path / "b", shape=(24, 20, 30))]
    meta = import_nifti(pairs, tmp_path / "ds", binarize=True, slab=10, gap=2, val=0.2, test=0.2)
    assert 80 - 6 * 2 <= sum(meta.splits.values()) < 80  # 6 slab boundaries, 2 dropped at a cut
    ids = {r["id"] for r in all_rows(tmp_path / "ds")}
    assert {i.split("_z")[0] for i in ids} == {"a_vol", "b_vol"}


def test_nifti_cli_and_bad_volume(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    image, label = nifti_pair(tmp_path)
    argv = [
        "data",
        "import",
        "nifti",
        "--image",
        str(image),
        "--label",
        str(label),
        "--binarize",
        "--slab",
        "10",
        "--gap",
        "2",
        "--out",
        str(tmp_path / "ds"),
    ]
    assert run_cli(argv) == 0
    assert read_meta(tmp_path / "ds").provenance["gap"] == 2
    (tmp_path / "bad.nii.gz").write_bytes(b"not a volume")
    argv[4] = str(tmp_path / "bad.nii.gz")
    argv[-1] = str(tmp_path / "ds2")
    with pytest.raises(RaysegbgError, match=r"cannot read .*bad\.nii\.gz as NIfTI"):
        run_cli(argv)
    assert_nothing_left(tmp_path / "ds2")
    with pytest.raises(RaysegbgError, match="give one --label per --image"):
        run_cli([*argv, "--image", str(image)])


def test_folder_and_voc_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    images, masks = write_folder(tmp_path, n=6)
    argv = ["data", "import", "folder", "--images", str(images), "--masks", str(masks)]
    assert run_cli([*argv, "--classes", "bg", "a", "b", "--out", str(tmp_path / "f")]) == 0
    assert read_meta(tmp_path / "f").classes == ("bg", "a", "b")
    write_voc(tmp_path / "VOC")
    argv = ["data", "import", "voc", str(tmp_path / "VOC"), "--resize", "16", "16"]
    assert run_cli([*argv, "--out", str(tmp_path / "v")]) == 0
    assert read_meta(tmp_path / "v").image_size == (16, 16)
    assert "wrote 'voc'" in capsys.readouterr().out
