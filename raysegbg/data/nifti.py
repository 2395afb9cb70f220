"""NIfTI import: (image, label) volume pairs sliced along an axis into 2-D samples.

Volumes are cut into slabs of consecutive slices assigned whole to train/val/test, with `gap`
slices dropped at every boundary between splits: adjacent slices are near-duplicates and
would otherwise leak between train and test.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from raysegbg.data.format import DatasetMeta, Sample, assign_splits, write_dataset
from raysegbg.data.importers import resize_array
from raysegbg.data.rules import IGNORE_INDEX, fixed_splits, require_train_pixels
from raysegbg.errors import RaysegbgError


@dataclass(frozen=True)
class LabelRule:
    """How raw label-volume values become contiguous class ids (unlisted values -> 0, the raw
    `ignore` value -> the ignore index)."""

    raw: np.ndarray
    ids: np.ndarray
    classes: tuple[str, ...]
    binarize: bool = False
    ignore: int | None = None

    def apply(self, lab: np.ndarray) -> np.ndarray:
        if self.binarize:
            out = (lab > 0).astype(np.uint8)
        else:
            idx = np.clip(np.searchsorted(self.raw, lab), 0, len(self.raw) - 1)
            out = np.where(self.raw[idx] == lab, self.ids[idx], 0).astype(np.uint8)
        if self.ignore is not None:
            out = np.where(lab == self.ignore, IGNORE_INDEX, out).astype(np.uint8)
        return out

    def provenance(self) -> dict[str, Any]:
        if self.binarize:
            return {"binarize": True, "label_mapping": "label > 0 -> 1", "ignore": self.ignore}
        mapping = {str(int(r)): int(i) for r, i in zip(self.raw, self.ids, strict=True)}
        return {"binarize": False, "label_mapping": mapping, "ignore": self.ignore}


def _foreground(seg: np.ndarray) -> np.ndarray:
    return (seg > 0) & (seg != IGNORE_INDEX)


def _nifti(path: Path) -> Any:
    try:
        img = nib.load(path)
    except FileNotFoundError:
        raise RaysegbgError(f"no such file {path}: check the --image/--label paths") from None
    except (nib.filebasedimages.ImageFileError, OSError, EOFError) as e:
        raise RaysegbgError(f"cannot read {path} as NIfTI ({e}): pass a .nii or .nii.gz") from None
    shape = img.shape
    if len(shape) < 3 or any(d != 1 for d in shape[3:]):
        raise RaysegbgError(f"{path} has shape {shape}: only 3-D volumes can be sliced")
    return img


def _array(img: Any) -> np.ndarray:
    return np.asanyarray(img.dataobj).reshape(img.shape[:3])


def _int_labels(path: Path, img: Any) -> np.ndarray:
    lab = _array(img)
    if not np.issubdtype(lab.dtype, np.integer):
        rounded = np.rint(lab)
        if not np.allclose(lab, rounded, atol=1e-3):
            raise RaysegbgError(f"{path} has non-integer values: give a label volume, not a map")
        lab = rounded
    return lab.astype(np.int64)


def _read_label_names(path: Path) -> dict[int, str]:
    """`<value> <name> ...` lines, as in the atlas .txt files shipped with MRIcron."""
    names = {}
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].lstrip("-").isdigit():
            names[int(parts[0])] = parts[1]
    if not names:
        raise RaysegbgError(f"{path} has no '<value> <name>' lines: fix it or drop --label-names")
    return names


def _label_rule(
    pairs: list[tuple[Path, Path]],
    binarize: bool,
    label_map: Any,
    label_names: Path | None,
    ignore: int | None,
) -> LabelRule:
    if binarize:
        bg_fg = ("background", "foreground")
        return LabelRule(np.zeros(0, np.int64), np.zeros(0), bg_fg, True, ignore)
    names = _read_label_names(label_names) if label_names else {}
    if isinstance(label_map, dict) and ignore in label_map:
        raise RaysegbgError(f"--ignore-value {ignore} is also in --label-map: drop it from one")
    if isinstance(label_map, dict):
        raw = np.array(sorted(label_map), dtype=np.int64)
        ids = np.array([label_map[r] for r in raw], dtype=np.int64)
        if ids.size == 0 or ids.min() < 1 or ids.max() > 254:
            raise RaysegbgError(f"label_map {label_map} is invalid: map raw values to ids 1..254")
        single = {int(i): names.get(int(r), f"label_{r}") for r, i in zip(raw, ids, strict=True)}
        many = {int(i) for i in ids if (ids == i).sum() > 1}
        classes = [
            single[k] if k in single and k not in many else f"class_{k}"
            for k in range(1, int(ids.max()) + 1)
        ]
        return LabelRule(raw, ids, ("background", *classes), ignore=ignore)
    if label_map not in (None, "auto"):
        raise RaysegbgError(f"label_map={label_map!r} is invalid: use 'auto' or a dict raw->id")
    values = sorted(set().union(*(np.unique(_int_labels(lb, _nifti(lb))) for _, lb in pairs)))
    raw = np.array([v for v in values if v not in (0, ignore)], dtype=np.int64)
    if not 1 <= raw.size <= 254:
        raise RaysegbgError(
            f"label volumes hold {raw.size} non-zero values: need 1..254 (use --binarize or a "
            f"--label-map that merges values)"
        )
    classes = [names.get(int(r), f"label_{r}") for r in raw]
    return LabelRule(raw, np.arange(1, raw.size + 1), ("background", *classes), ignore=ignore)


def _check_shapes(image: Path, label: Path, resample: bool) -> tuple[int, ...]:
    """Shape of the image volume, after checking the label volume against it (headers only)."""
    img, lab = _nifti(image), _nifti(label)
    if img.shape[:3] != lab.shape[:3] and not resample:
        raise RaysegbgError(
            f"label {label.name} has shape {lab.shape[:3]} but image {image.name} has "
            f"{img.shape[:3]}: pass --resample-labels to resample it onto the image grid "
            f"(nearest neighbour, via the affines) or give a label volume on the image grid"
        )
    return img.shape[:3]


def _resample_nearest(
    lab: np.ndarray, lab_aff: np.ndarray, shape: tuple[int, ...], img_aff: np.ndarray
) -> tuple[np.ndarray, float]:
    """Label volume sampled at each image voxel centre through the two affines, and the share
    of image voxels that fell inside the label volume."""
    to_lab = np.linalg.inv(lab_aff) @ img_aff
    jk = np.indices(shape[1:]).reshape(2, -1)
    out = np.zeros(shape, dtype=lab.dtype)
    inside = 0
    for i in range(shape[0]):
        ijk = np.vstack([np.full(jk.shape[1], i), jk, np.ones(jk.shape[1])])
        src = np.floor(to_lab[:3] @ ijk + 0.5).astype(np.int64)  # no round-half-to-even
        ok = np.all((src >= 0) & (src < np.array(lab.shape)[:, None]), axis=0)
        out[i].reshape(-1)[ok] = lab[tuple(src[:, ok])]
        inside += int(ok.sum())
    return out, inside / math.prod(shape)


def _labels_on_grid(image: Path, label: Path, resample: bool) -> np.ndarray:
    """Integer label volume, resampled onto the image grid when the shapes differ."""
    img, lab = _nifti(image), _nifti(label)
    seg = _int_labels(label, lab)
    if seg.shape == img.shape[:3]:
        return seg
    seg, cover = _resample_nearest(seg, lab.affine, img.shape[:3], img.affine)
    if cover < 0.5:
        raise RaysegbgError(
            f"{label.name} covers only {cover:.0%} of {image.name} in world space: the "
            f"affines describe different spaces; register the volumes first"
        )
    return seg


def _load_pair(image: Path, label: Path, resample: bool) -> tuple[np.ndarray, np.ndarray]:
    """The image as uint8 (per-volume 1-99 percentile clip) and the labels on the image grid."""
    vol = _array(_nifti(image)).astype(np.float32)
    lo, hi = np.percentile(vol, [1, 99])
    scaled = (np.clip(vol, lo, hi) - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(vol)
    return np.rint(scaled).astype(np.uint8), _labels_on_grid(image, label, resample)


def _eligible(
    pairs: list[tuple[Path, Path]], rule: LabelRule, axis: int, resample: bool, min_fg: float
) -> list[np.ndarray] | None:
    """Per volume, which slices reach `min_fg` foreground (None: all of them do)."""
    if min_fg <= 0:
        return None
    out = []
    for image, label in pairs:
        seg = rule.apply(_labels_on_grid(image, label, resample))
        fg = np.moveaxis(_foreground(seg), axis, 0)
        out.append(fg.reshape(fg.shape[0], -1).mean(axis=1) >= min_fg)
    return out


def _fill(seq: list[str | None]) -> list[str | None]:
    """Give unassigned slabs their neighbour's split so they never create a boundary."""
    known = [x for x in seq if x is not None]
    last = known[0] if known else None
    filled = []
    for x in seq:
        last = x if x is not None else last
        filled.append(last)
    return filled


def slab_plan(
    n_slices: list[int],
    slab: int,
    gap: int,
    val: float,
    test: float,
    seed: int,
    eligible: list[np.ndarray] | None = None,
) -> list[list[str | None]]:
    """Split name per slice of each volume, None for the `gap` slices dropped at boundaries.

    Slabs of `slab` consecutive slices go whole to one split (seeded shuffle over all slabs of
    all volumes with an `eligible` slice); at each boundary between slabs of different splits
    `gap` slices are dropped, so kept slices of different splits are more than `gap` apart.
    """
    counts = [math.ceil(n / slab) for n in n_slices]
    useful = [
        (v, s)
        for v, c in enumerate(counts)
        for s in range(c)
        if eligible is None or eligible[v][s * slab : (s + 1) * slab].any()
    ]
    owner = dict(zip(useful, assign_splits(len(useful), val, test, seed), strict=True))
    plan = []
    for v, n in enumerate(n_slices):
        per_slab = _fill([owner.get((v, s)) for s in range(counts[v])])
        splits = [per_slab[z // slab] for z in range(n)]
        cuts = [b for b in range(slab, n, slab) if splits[b - 1] != splits[b]]
        for b in cuts:
            for z in range(max(0, b - gap // 2), min(n, b + gap - gap // 2)):
                splits[z] = None
        plan.append(splits)
    return plan


def _fit(arr: np.ndarray, size: tuple[int, int] | None, nearest: bool) -> np.ndarray:
    """Resize keeping the aspect ratio, zero-padded to `size`: nothing is cropped."""
    arr = np.ascontiguousarray(arr)
    if size is None:
        return arr
    (h, w), (th, tw) = arr.shape, size
    scale = min(th / h, tw / w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    out = np.zeros((th, tw), np.uint8)
    top, left = (th - nh) // 2, (tw - nw) // 2
    out[top : top + nh, left : left + nw] = resize_array(arr, (nh, nw), nearest)
    return out


def _stems(pairs: list[tuple[Path, Path]]) -> list[str]:
    """Id prefix per volume: the file stem, or `<folder>_<stem>` when stems collide."""
    stems = [i.name.removesuffix(".gz").removesuffix(".nii") for i, _ in pairs]
    if len(set(stems)) == len(stems):
        return stems
    return [f"{i.absolute().parent.name}_{s}" for (i, _), s in zip(pairs, stems, strict=True)]


def _nifti_samples(
    pairs: list[tuple[Path, Path]],
    plan: list[list[str | None]],
    rule: LabelRule,
    axis: int,
    size: tuple[int, int] | None,
    min_foreground: float,
    resample: bool,
) -> Iterator[Sample]:
    for (image, label), splits, stem in zip(pairs, plan, _stems(pairs), strict=True):
        vol, seg_vol = (np.moveaxis(v, axis, 0) for v in _load_pair(image, label, resample))
        width = max(3, len(str(len(splits) - 1)))
        for z, split in enumerate(splits):
            seg = np.rot90(rule.apply(seg_vol[z]))
            if split is None or _foreground(seg).mean() < min_foreground:
                continue
            img = np.rot90(vol[z])
            sid = f"{stem}_{'xyz'[axis]}{z:0{width}d}"
            yield Sample(sid, split, _fit(img, size, False), _fit(seg, size, True))


def import_nifti(
    pairs: list[tuple[Path, Path]],
    out_dir: Path,
    *,
    axis: int = 2,
    binarize: bool = False,
    label_map: dict[int, int] | str | None = None,
    label_names: Path | None = None,
    size: tuple[int, int] | None = None,
    slab: int = 16,
    gap: int = 2,
    val: float | None = None,
    test: float | None = None,
    seed: int = 0,
    min_foreground: float = 0.0,
    resample_labels: bool = False,
    labeled_fraction: float = 1.0,
    name: str = "nifti",
    overwrite: bool = False,
    ignore_value: int | None = None,
    split_file: Path | None = None,
) -> DatasetMeta:
    """Slice (image, label) volume pairs along `axis` into 2-D samples with slab-wise splits
    (`val`/`test` fractions of slabs, default 0.1 each), or whole volumes in the split that
    `split_file` gives their id (the file stem, as in the sample ids)."""
    if not pairs:
        raise RaysegbgError("no volumes given: pass at least one --image PATH --label PATH pair")
    if axis not in (0, 1, 2) or slab < 1 or gap < 0 or not 0.0 <= min_foreground <= 1.0:
        raise RaysegbgError(
            f"axis={axis}, slab={slab}, gap={gap}, min_foreground={min_foreground}: use axis "
            f"0/1/2, slab >= 1, gap >= 0 and min_foreground in [0, 1]"
        )
    pairs = [(Path(i), Path(lb)) for i, lb in pairs]
    n_slices = [_check_shapes(i, lb, resample_labels)[axis] for i, lb in pairs]
    rule = _label_rule(pairs, binarize, label_map, label_names, ignore_value)
    if split_file is None:
        val, test = 0.1 if val is None else val, 0.1 if test is None else test
        eligible = _eligible(pairs, rule, axis, resample_labels, min_foreground)
        plan = slab_plan(n_slices, slab, gap, val, test, seed, eligible)
    else:
        owner = fixed_splits(split_file, _stems(pairs), "--image volumes", val, test)
        plan = [[owner[v]] * n for v, n in zip(_stems(pairs), n_slices, strict=True)]
    samples = _nifti_samples(pairs, plan, rule, axis, size, min_foreground, resample_labels)
    provenance: dict[str, Any] = {
        "importer": "nifti",
        "sources": [{"image": str(i.absolute()), "label": str(lb.absolute())} for i, lb in pairs],
        "axis": axis,
        "slab": slab,
        "gap": gap,
        "val": val,
        "test": test,
        "seed": seed,
        "split_file": str(Path(split_file).absolute()) if split_file else None,
        "size": list(size) if size else None,
        "min_foreground": min_foreground,
        "resample_labels": resample_labels,
        "intensity": "per-volume clip to percentiles 1-99",
        "orientation": "slice z = np.rot90(np.moveaxis(volume, axis, 0)[z])",
        **rule.provenance(),
    }
    return write_dataset(
        out_dir,
        require_train_pixels(samples, rule.classes, lambda: _NO_TRAIN_PIXELS),
        name=name,
        classes=list(rule.classes),
        channels=1,
        provenance=provenance,
        ignore_index=IGNORE_INDEX,
        labeled_fraction=labeled_fraction,
        seed=seed,
        overwrite=overwrite,
    )


_NO_TRAIN_PIXELS = (
    "its slices all went to val/test or were dropped (--gap, --min-foreground): try another "
    "--seed or a smaller --slab, give a --split-file, or merge the class with --label-map"
)
