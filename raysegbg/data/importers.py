"""Importers from common layouts: a folder of image/mask pairs and Pascal VOC (NIfTI volumes
are in `raysegbg.data.nifti`).

Each builds `Sample`s lazily and hands them to `write_dataset`, so a bad file met halfway
leaves nothing behind.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from raysegbg.data.format import DatasetMeta, Sample, assign_splits, write_dataset
from raysegbg.data.rules import (
    IGNORE_INDEX,
    MaskValues,
    choose_mask_values,
    fixed_splits,
    require_train_pixels,
)
from raysegbg.errors import RaysegbgError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
_COLOUR_MODES = {"RGB", "RGBA", "P", "CMYK", "YCbCr", "LAB", "HSV", "PA"}
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip


def _open(path: Path, load: bool = True) -> Image.Image:
    """Open (and by default decode) an image; a missing or corrupt file is a one-line error."""
    if not Path(path).is_file():
        raise RaysegbgError(f"missing file {path}: add it or drop the sample that refers to it")
    try:
        im = Image.open(path)
        if load:
            im.load()
        return im
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise RaysegbgError(f"cannot read {path}: {e}: replace or remove the file") from None


def read_image(path: Path, channels: int) -> np.ndarray:
    """HxW (channels=1) or HxWx3 uint8 image from any PIL-readable file."""
    with _open(path) as im:
        return np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)


def read_raw_mask(path: Path) -> np.ndarray:
    """The stored values of a single-channel or palette mask image (palette index = value)."""
    with _open(path) as im:
        if im.mode not in ("L", "P", "I", "I;16", "1"):
            raise RaysegbgError(
                f"mask {path} has mode {im.mode}: masks must be single-channel class-index "
                f"images (mode L or palette P), not colour renderings"
            )
        return np.asarray(im)


def read_mask(path: Path) -> np.ndarray:
    """Class-index mask whose stored values are the class ids (255 = ignore)."""
    arr = read_raw_mask(path)
    if arr.min() < 0 or arr.max() > 255:
        raise RaysegbgError(f"mask {path} has values outside 0..255: class ids must fit in uint8")
    return arr.astype(np.uint8)


def resize_array(arr: np.ndarray, size: tuple[int, int] | None, nearest: bool) -> np.ndarray:
    """Resize to (H, W): bilinear for images, nearest for masks."""
    if size is None or arr.shape[:2] == tuple(size):
        return arr
    method = Image.NEAREST if nearest else Image.BILINEAR
    return np.asarray(Image.fromarray(arr).resize((size[1], size[0]), method))


def _list_images(folder: Path, what: str) -> dict[str, Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise RaysegbgError(f"{what} folder {folder} does not exist: pass an existing directory")
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if p.stem in found:
            raise RaysegbgError(
                f"{found[p.stem].name} and {p.name} in {folder} share the stem {p.stem!r}: "
                f"keep one file per sample"
            )
        found[p.stem] = p
    return found


def _infer_channels(paths: list[Path]) -> int:
    """3 if any image is colour, else 1 (only headers are read)."""
    return 3 if any(_open(p, load=False).mode in _COLOUR_MODES for p in paths) else 1


def _binary_255(paths: list[Path]) -> bool:
    """True when the masks hold only 0 and 255, some 255: how binary masks are usually saved."""
    seen: set[int] = set()
    for p in paths:
        seen |= set(np.unique(read_raw_mask(p)).tolist())
        if not seen <= {0, 255}:
            return False
    return 255 in seen


def _pair_sample(
    sid: str,
    split: str,
    image: Path,
    mask: Path | None,
    channels: int,
    size: tuple | None,
    values: MaskValues | None = None,
) -> Sample:
    """One sample; `values` maps raw mask values to class ids (None: they are the ids)."""
    img = read_image(image, channels)
    if mask is None:
        seg = None
    else:
        seg = read_mask(mask) if values is None else values.apply(read_raw_mask(mask), mask)
    if seg is not None and seg.shape != img.shape[:2]:
        raise RaysegbgError(
            f"mask {mask.name} is {seg.shape[0]}x{seg.shape[1]} but its image {image.name} is "
            f"{img.shape[0]}x{img.shape[1]}: masks must match their image size"
        )
    seg = None if seg is None else resize_array(seg, size, nearest=True)
    return Sample(sid, split, resize_array(img, size, nearest=False), seg)


def import_folder(
    images_dir: Path,
    masks_dir: Path,
    out_dir: Path,
    *,
    classes: list[str],
    val: float | None = None,
    test: float | None = None,
    seed: int = 0,
    labeled_fraction: float = 1.0,
    resize: tuple[int, int] | None = None,
    channels: int | None = None,
    allow_unlabeled: bool = False,
    name: str | None = None,
    overwrite: bool = False,
    label_map: dict[int, int] | None = None,
    ignore_value: int | None = None,
    split_file: Path | None = None,
) -> DatasetMeta:
    """Import image/mask pairs matched by file stem.

    Splits are a seeded shuffle (`val`/`test` fractions, default 0.1 each) or the ids of
    `split_file`. Mask values go through `label_map` (raw -> class id) and `ignore_value`;
    without them 0/255 masks with two classes are read as 0 -> 0 and 255 -> 1.
    """
    images = _list_images(images_dir, "images")
    masks = _list_images(masks_dir, "masks")
    if not images:
        raise RaysegbgError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {images_dir}")
    missing = [p.name for stem, p in images.items() if stem not in masks]
    if missing and not allow_unlabeled:
        raise RaysegbgError(
            f"no mask for image {missing[0]!r} in {masks_dir} ({len(missing)} missing): add a "
            f"mask with the same stem or pass --allow-unlabeled"
        )
    channels = channels or _infer_channels(list(images.values()))
    stems = sorted(images)
    splits, val, test = _folder_splits(stems, val, test, seed, split_file, images_dir)
    used = [masks[s] for s in stems if s in masks]
    values = choose_mask_values(classes, label_map, ignore_value, lambda: _binary_255(used))
    samples = (
        _pair_sample(s, sp, images[s], masks.get(s), channels, resize, values)
        for s, sp in zip(stems, splits, strict=True)
    )
    provenance = {
        "importer": "folder",
        "images_dir": str(Path(images_dir).absolute()),
        "masks_dir": str(Path(masks_dir).absolute()),
        "args": {"val": val, "test": test, "seed": seed, "resize": resize},
        "split_file": str(Path(split_file).absolute()) if split_file else None,
        "mask_values": values.provenance(),
        "unlabeled_sources": len(missing),
    }
    return write_dataset(
        out_dir,
        require_train_pixels(samples, classes, lambda: _train_pixels_hint(values)),
        name=name or Path(images_dir).absolute().parent.name,
        classes=classes,
        channels=channels,
        provenance=provenance,
        ignore_index=IGNORE_INDEX,
        labeled_fraction=labeled_fraction,
        seed=seed,
        overwrite=overwrite,
    )


def _train_pixels_hint(values: MaskValues) -> str:
    return (
        f"masks read as {values.describe()}; map mask values with --label-map RAW:ID,... "
        f"(e.g. 0:0,255:1) or --ignore-value V, or put images that show the class into train "
        f"(--split-file, --seed)"
    )


def _folder_splits(
    stems: list[str],
    val: float | None,
    test: float | None,
    seed: int,
    split_file: Path | None,
    images_dir: Path,
) -> tuple[list[str], float | None, float | None]:
    """Split per stem from the split file or a seeded shuffle, and the fractions used."""
    if split_file is None:
        val, test = 0.1 if val is None else val, 0.1 if test is None else test
        return assign_splits(len(stems), val, test, seed), val, test
    owner = fixed_splits(split_file, stems, f"images in {images_dir}", val, test)
    return [owner[s] for s in stems], None, None


def _read_ids(path: Path) -> list[str]:
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def _has_test_txt(root: Path) -> bool:
    return (root / "ImageSets" / "Segmentation" / "test.txt").is_file()


def _voc_splits(root: Path, test_from_val: float, seed: int) -> dict[str, list[str]]:
    sets = root / "ImageSets" / "Segmentation"
    if not (sets / "train.txt").is_file() or not (sets / "val.txt").is_file():
        raise RaysegbgError(
            f"{root} is not a Pascal VOC root (no ImageSets/Segmentation/train.txt and val.txt): "
            f"point at the folder holding JPEGImages/, e.g. VOCdevkit/VOC2012"
        )
    split = {"train": _read_ids(sets / "train.txt"), "val": _read_ids(sets / "val.txt")}
    if _has_test_txt(root):
        split["test"] = _read_ids(sets / "test.txt")
        return split
    val = sorted(split["val"])
    order = np.random.default_rng([seed, 2]).permutation(len(val))
    test = {val[i] for i in order[: round(test_from_val * len(val))]}
    split["test"] = [i for i in split["val"] if i in test]
    split["val"] = [i for i in split["val"] if i not in test]
    return split


def import_voc(
    voc_root: Path,
    out_dir: Path,
    *,
    test_from_val: float = 0.5,
    seed: int = 0,
    labeled_fraction: float = 1.0,
    resize: tuple[int, int] | None = None,
    name: str = "voc",
    overwrite: bool = False,
) -> DatasetMeta:
    """Import a Pascal VOC segmentation layout; test comes from test.txt or a share of val."""
    root = Path(voc_root)
    splits = _voc_splits(root, test_from_val, seed)
    jpg, png = root / "JPEGImages", root / "SegmentationClass"
    samples = (
        _pair_sample(i, s, jpg / f"{i}.jpg", png / f"{i}.png", 3, resize)
        for s in ("train", "val", "test")
        for i in splits[s]
    )
    provenance = {
        "importer": "voc",
        "voc_root": str(root.absolute()),
        "args": {"test_from_val": test_from_val, "seed": seed, "resize": resize},
        "test_source": "test.txt" if _has_test_txt(root) else "val",
    }
    return write_dataset(
        out_dir,
        samples,
        name=name,
        classes=list(VOC_CLASSES),
        channels=3,
        provenance=provenance,
        labeled_fraction=labeled_fraction,
        seed=seed,
        overwrite=overwrite,
    )
