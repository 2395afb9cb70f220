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


def read_mask(path: Path) -> np.ndarray:
    """Class-index mask from a single-channel or palette image (palette index = class id)."""
    with _open(path) as im:
        if im.mode not in ("L", "P", "I", "I;16", "1"):
            raise RaysegbgError(
                f"mask {path} has mode {im.mode}: masks must be single-channel class-index "
                f"images (mode L or palette P), not colour renderings"
            )
        arr = np.asarray(im)
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


def _pair_sample(
    sid: str, split: str, image: Path, mask: Path | None, channels: int, size: tuple | None
) -> Sample:
    img = read_image(image, channels)
    seg = read_mask(mask) if mask is not None else None
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
    val: float = 0.1,
    test: float = 0.1,
    seed: int = 0,
    labeled_fraction: float = 1.0,
    resize: tuple[int, int] | None = None,
    channels: int | None = None,
    allow_unlabeled: bool = False,
    name: str | None = None,
    overwrite: bool = False,
) -> DatasetMeta:
    """Import image/mask pairs matched by file stem; splits are a seeded shuffle."""
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
    splits = assign_splits(len(stems), val, test, seed)
    samples = (
        _pair_sample(s, sp, images[s], masks.get(s), channels, resize)
        for s, sp in zip(stems, splits, strict=True)
    )
    provenance = {
        "importer": "folder",
        "images_dir": str(Path(images_dir).absolute()),
        "masks_dir": str(Path(masks_dir).absolute()),
        "args": {"val": val, "test": test, "seed": seed, "resize": resize},
        "unlabeled_sources": len(missing),
    }
    return write_dataset(
        out_dir,
        samples,
        name=name or Path(images_dir).absolute().parent.name,
        classes=classes,
        channels=channels,
        provenance=provenance,
        labeled_fraction=labeled_fraction,
        seed=seed,
        overwrite=overwrite,
    )


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
