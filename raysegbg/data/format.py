"""The on-disk dataset format: `dataset.json` plus per-split Parquet shards of PNG-encoded rows.

Every importer and generator goes through `write_dataset`, which validates all samples before
anything appears at the target path, so a dataset directory is either complete or absent.
"""

from __future__ import annotations

import io
import json
import shutil
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from raysegbg import storage
from raysegbg.errors import RaysegbgError
from raysegbg.storage import Location

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
META_FILE = "dataset.json"
SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("mask", pa.binary()),
        pa.field("image_labels", pa.list_(pa.int32())),
    ]
)
# A row group is what a streaming reader fetches at once (`loader.ParquetRows`): small enough
# that a shuffle window of a few dozen stays in tens of MB, big enough for object stores.
ROW_GROUP_BYTES = 4 << 20
ROW_GROUP_ROWS = 512
_HOW_TO_CREATE = "create one with `raysegbg data make` or `raysegbg data import`"


@dataclass(frozen=True)
class DatasetMeta:
    """The contents of `dataset.json`: what a loader needs to know without opening a shard."""

    name: str
    classes: tuple[str, ...]
    ignore_index: int
    channels: int
    image_size: tuple[int, int] | None
    splits: dict[str, int]
    labeled: dict[str, int]
    shards: tuple[str, ...]
    provenance: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (tuples become lists)."""
        d = asdict(self)
        d["classes"] = list(self.classes)
        d["shards"] = list(self.shards)
        d["image_size"] = list(self.image_size) if self.image_size else None
        return d

    def to_json(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatasetMeta:
        size = d["image_size"]
        return cls(
            name=str(d["name"]),
            classes=tuple(d["classes"]),
            ignore_index=int(d["ignore_index"]),
            channels=int(d["channels"]),
            image_size=(int(size[0]), int(size[1])) if size else None,
            splits={k: int(v) for k, v in d["splits"].items()},
            labeled={k: int(v) for k, v in d["labeled"].items()},
            shards=tuple(d["shards"]),
            provenance=dict(d.get("provenance") or {}),
            format_version=int(d["format_version"]),
        )

    @classmethod
    def from_json(cls, path: Path) -> DatasetMeta:
        return cls.from_dict(json.loads(Path(path).read_text()))


@dataclass
class Sample:
    """One image with its optional mask (None = unlabeled), before encoding."""

    id: str
    split: str
    image: np.ndarray
    mask: np.ndarray | None


def encode_png(arr: np.ndarray) -> bytes:
    """PNG bytes of an HxW (mode L) or HxWx3 (RGB) uint8 array."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data: bytes, what: str = "PNG data") -> np.ndarray:
    """HxW or HxWx3 uint8 array from PNG bytes; corrupt bytes raise an error naming `what`."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.mode not in ("L", "RGB"):
                im = im.convert("RGB" if im.mode in ("RGBA", "P", "CMYK", "YCbCr") else "L")
            return np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise RaysegbgError(f"cannot decode {what}: {e}; re-create the dataset") from None


def _check_options(classes: list[str], channels: int, ignore_index: int, frac: float) -> None:
    if channels not in (1, 3):
        raise RaysegbgError(f"channels={channels} is not supported: use 1 (grayscale) or 3 (RGB)")
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise RaysegbgError(
            f"classes {classes} are invalid: give at least 2 unique names, index 0 = background"
        )
    if not len(classes) <= ignore_index <= 255:
        raise RaysegbgError(
            f"ignore_index={ignore_index} must be in {len(classes)}..255 with "
            f"{len(classes)} classes: masks are uint8 and the ignore index is not a class"
        )
    if not 0.0 <= frac <= 1.0:
        raise RaysegbgError(f"labeled_fraction={frac} is out of range: use a value in [0, 1]")


def _check_image(s: Sample, channels: int) -> np.ndarray:
    img = np.asarray(s.image)
    if img.dtype != np.uint8:
        raise RaysegbgError(
            f"image of {s.id!r} has dtype {img.dtype}: images must be uint8 (scale to 0-255)"
        )
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    got = 1 if img.ndim == 2 else (img.shape[2] if img.ndim == 3 else -1)
    if got != channels:
        raise RaysegbgError(
            f"image of {s.id!r} has shape {img.shape} but the dataset has channels={channels}: "
            f"give HxW images for channels=1 or HxWx3 for channels=3"
        )
    return img


def _check_mask(s: Sample, hw: tuple[int, ...], classes: list[str], ignore: int) -> np.ndarray:
    mask = np.asarray(s.mask)
    if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
        raise RaysegbgError(
            f"mask of {s.id!r} has shape {mask.shape} and dtype {mask.dtype}: "
            f"masks must be 2-D integer class-index arrays"
        )
    if mask.shape != hw:
        raise RaysegbgError(
            f"mask for {s.id!r} is {mask.shape[0]}x{mask.shape[1]} but its image is "
            f"{hw[0]}x{hw[1]}: masks must match their image size"
        )
    values = np.unique(mask)
    bad = values[((values < 0) | (values >= len(classes))) & (values != ignore)]
    if bad.size:
        raise RaysegbgError(
            f"mask for {s.id!r} contains class {int(bad[0])} but there are only {len(classes)} "
            f"classes ({', '.join(classes[:6])}{', ...' if len(classes) > 6 else ''}) and "
            f"ignore_index={ignore}: add the missing class names or fix the mask"
        )
    return mask.astype(np.uint8)


@dataclass
class _Row:
    id: str
    split: str
    image: bytes
    mask: bytes | None
    labels: list[int] | None
    hw: tuple[int, int]


def _encode_rows(
    samples: Iterable[Sample], classes: list[str], channels: int, ignore: int
) -> Iterator[_Row]:
    """Validate and encode each sample; labels are derived here from the mask."""
    seen: set[str] = set()
    for s in samples:
        if s.split not in SPLITS:
            raise RaysegbgError(f"sample {s.id!r} has split {s.split!r}: use one of {SPLITS}")
        if s.id in seen:
            raise RaysegbgError(f"duplicate sample id {s.id!r}: ids must be unique across splits")
        seen.add(s.id)
        img = _check_image(s, channels)
        mask_bytes, labels = None, None
        if s.mask is not None:
            mask = _check_mask(s, img.shape[:2], classes, ignore)
            present = np.unique(mask)
            labels = [int(v) for v in present if v != ignore]
            mask_bytes = encode_png(mask)
        yield _Row(s.id, s.split, encode_png(img), mask_bytes, labels, img.shape[:2])


def _drop_masks(rows: list[_Row], fraction: float, seed: int) -> None:
    """Keep masks on a seeded random `fraction` of labeled train rows; image labels stay."""
    if fraction >= 1.0:
        return
    labeled = [r for r in rows if r.split == "train" and r.mask is not None]
    keep = round(fraction * len(labeled))
    chosen = set(np.random.default_rng(seed).choice(len(labeled), keep, replace=False).tolist())
    for i, r in enumerate(labeled):
        if i not in chosen:
            r.mask = None


def _write_shards(rows: list[_Row], tmp: Path, shard_rows: int) -> list[str]:
    shards = []
    for split in SPLITS:
        part = [r for r in rows if r.split == split]
        for k, start in enumerate(range(0, len(part), shard_rows)):
            chunk = part[start : start + shard_rows]
            cols = {
                "id": [r.id for r in chunk],
                "split": [r.split for r in chunk],
                "image": [r.image for r in chunk],
                "mask": [r.mask for r in chunk],
                "image_labels": [r.labels for r in chunk],
            }
            fname = f"{split}-{k:05d}.parquet"
            table = pa.table(cols, schema=SCHEMA)
            with pq.ParquetWriter(tmp / fname, SCHEMA, write_statistics=["id", "split"]) as out:
                for first, stop in _row_groups(chunk):
                    out.write_table(table.slice(first, stop - first), row_group_size=stop - first)
            shards.append(fname)
    return shards


def _row_groups(rows: list[_Row]) -> Iterator[tuple[int, int]]:
    """(first, stop) of each row group: up to ROW_GROUP_BYTES of PNG data or ROW_GROUP_ROWS."""
    first, size = 0, 0
    for i, r in enumerate(rows):
        size += len(r.image) + len(r.mask or b"")
        if size >= ROW_GROUP_BYTES or i + 1 - first == ROW_GROUP_ROWS or i + 1 == len(rows):
            yield first, i + 1
            first, size = i + 1, 0


def _check_counts(rows: list[_Row]) -> dict[str, int]:
    counts = {s: sum(r.split == s for r in rows) for s in SPLITS}
    if not rows:
        raise RaysegbgError("no samples to write: the input is empty; check the input paths")
    if counts["train"] == 0:
        raise RaysegbgError(
            f"the train split is empty (val={counts['val']}, test={counts['test']}): "
            f"lower the val/test fractions or add samples"
        )
    return counts


def _prepare_target(out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists():
        return
    if not overwrite:
        raise RaysegbgError(f"{out_dir} already exists: pass --overwrite or choose another --out")
    if not (out_dir / META_FILE).is_file() and any(out_dir.iterdir()):
        raise RaysegbgError(
            f"{out_dir} is a non-empty directory that is not a dataset: refusing to overwrite it; "
            f"choose another --out"
        )


def replace_directory(tmp: Path, out_dir: Path) -> None:
    """Move a finished temp dir into place, replacing an old one only at the last step, so a
    reader sees the old folder or the new one, never half of either."""
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old)
    else:
        tmp.rename(out_dir)


def write_dataset(
    out_dir: Path,
    samples: Iterable[Sample],
    *,
    name: str,
    classes: list[str],
    channels: int,
    provenance: dict[str, Any],
    ignore_index: int = 255,
    labeled_fraction: float = 1.0,
    seed: int = 0,
    shard_rows: int = 512,
    overwrite: bool = False,
) -> DatasetMeta:
    """Validate every sample, write shards and `dataset.json` to a temp dir, then rename it."""
    out_dir = Path(out_dir).absolute()
    classes = list(classes)
    _check_options(classes, channels, ignore_index, labeled_fraction)
    _prepare_target(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        rows = list(_encode_rows(samples, classes, channels, ignore_index))
        counts = _check_counts(rows)
        _drop_masks(rows, labeled_fraction, seed)
        sizes = {r.hw for r in rows}
        meta = DatasetMeta(
            name=name,
            classes=tuple(classes),
            ignore_index=ignore_index,
            channels=channels,
            image_size=next(iter(sizes)) if len(sizes) == 1 else None,
            splits=counts,
            labeled={s: sum(r.split == s and r.mask is not None for r in rows) for s in SPLITS},
            shards=tuple(_write_shards(rows, tmp, max(1, shard_rows))),
            provenance={**provenance, "labeled_fraction": labeled_fraction, "labeled_seed": seed},
        )
        meta.to_json(tmp / META_FILE)
        replace_directory(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def assign_splits(n: int, val: float, test: float, seed: int) -> list[str]:
    """A seeded split name per item: round(val*n) val, round(test*n) test, the rest train."""
    if not (0 <= val and 0 <= test and val + test < 1):
        raise RaysegbgError(f"val={val}, test={test} are invalid: use fractions >= 0 with sum < 1")
    n_val, n_test = round(val * n), round(test * n)
    order = np.random.default_rng([seed, 1]).permutation(n)
    split = np.full(n, "train", dtype=object)
    split[order[:n_val]] = "val"
    split[order[n_val : n_val + n_test]] = "test"
    return split.tolist()


def read_meta(path: str | Path) -> DatasetMeta:
    """The dataset's metadata (a local folder or an object-store URI), or a one-line error
    saying how to create a dataset."""
    path = storage.location(path)
    if not storage.is_file(storage.join(path, META_FILE)):
        raise RaysegbgError(f"no dataset at {path}: {_HOW_TO_CREATE}")
    try:
        meta = DatasetMeta.from_dict(json.loads(storage.read_text(storage.join(path, META_FILE))))
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise RaysegbgError(
            f"{path / META_FILE} is invalid ({type(e).__name__}: {e}): re-create the dataset "
            f"with `raysegbg data make` or `raysegbg data import`"
        ) from None
    if meta.format_version > FORMAT_VERSION:
        raise RaysegbgError(
            f"dataset at {path} has format_version {meta.format_version}; this raysegbg reads "
            f"up to {FORMAT_VERSION}: upgrade raysegbg"
        )
    return meta


def read_split(path: str | Path, split: str, columns: list[str] | None = None) -> pa.Table:
    """All rows of one split, read from that split's shards only."""
    return pa.concat_tables([_read_shard(f, columns) for f in split_shards(path, split)])


def split_shards(path: str | Path, split: str) -> list[Location]:
    """The shard files (paths or URIs) of one split, in order."""
    meta = read_meta(path)
    if split not in SPLITS:
        raise RaysegbgError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    files = [f for f in meta.shards if f.startswith(f"{split}-")]
    if not files:
        counts = ", ".join(f"{k}={v}" for k, v in meta.splits.items())
        raise RaysegbgError(
            f"split {split!r} of dataset {meta.name!r} is empty ({counts}): choose a non-empty "
            f"split or re-create the dataset with val/test fractions > 0"
        )
    return [storage.join(path, f) for f in files]


def _read_shard(file: Location, columns: list[str] | None) -> pa.Table:
    """One Parquet shard; a missing or corrupt one is a one-line error, not Arrow's."""
    with open_shard(file) as shard:
        try:
            return shard.read(columns=columns)
        except (pa.ArrowException, OSError) as exc:
            raise _corrupt(file, exc) from None


def open_shard(file: Location) -> pq.ParquetFile:
    """A shard opened for reading (its footer read); missing or corrupt: one line."""
    fs, fs_path = storage.resolve(file)
    if fs.get_file_info(fs_path).type != storage.pafs.FileType.File:
        raise RaysegbgError(
            f"shard {file} listed in {META_FILE} is missing: re-create the dataset with "
            f"`raysegbg data make` or re-run `raysegbg data import`"
        )
    try:
        return pq.ParquetFile(fs.open_input_file(fs_path))
    except (pa.ArrowException, OSError) as exc:
        raise _corrupt(file, exc) from None


def _corrupt(file: Location, exc: Exception) -> RaysegbgError:
    # Arrow names the file again: keep its first sentence after the path
    reason = str(exc).split("': ")[-1].split(". ")[0] or type(exc).__name__
    return RaysegbgError(
        f"shard {file} is corrupt ({reason}): re-create the dataset with "
        f"`raysegbg data make` or re-run `raysegbg data import`"
    )


def class_frequencies(path: Path, split: str) -> np.ndarray:
    """Pixel count per class over the labeled masks of a split (ignore-index pixels excluded)."""
    meta = read_meta(path)
    counts = np.zeros(meta.num_classes, dtype=np.int64)
    table = read_split(path, split, columns=["id", "mask"])
    for sid, data in zip(table["id"].to_pylist(), table["mask"].to_pylist(), strict=True):
        if data is None:
            continue
        mask = decode_png(data, what=f"mask of {sid!r}")
        counts += np.bincount(mask.ravel(), minlength=256)[: meta.num_classes]
    return counts
