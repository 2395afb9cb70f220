"""What a user tells an importer about their files: which mask value is which class, and which
sample goes to which split.

Everything here fails with a one-line `RaysegbgError` while the importer is still reading, so
`write_dataset` never renames a half-right dataset into place.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from raysegbg.data.format import SPLITS, Sample
from raysegbg.errors import RaysegbgError

IGNORE_INDEX = 255  # what `write_dataset` stores for "ignore" (its default ignore_index)
_FIX = "map mask values with --label-map RAW:ID,... or set --ignore-value V"


def _listing(items: Sequence[Any], limit: int = 5) -> str:
    shown = ", ".join(repr(i) if isinstance(i, str) else str(i) for i in items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


class MaskValues:
    """How raw mask values become class ids: `table` maps raw -> id, the raw `ignore` value
    becomes the ignore index, and any other value is an error naming the file."""

    def __init__(self, table: dict[int, int], ignore: int | None, how: str) -> None:
        self.table, self.ignore, self.how = table, ignore, how
        self.seen: set[int] = set()

    def apply(self, raw: np.ndarray, path: Path) -> np.ndarray:
        """The uint8 class-id mask of a raw mask read from `path`."""
        values, inverse = np.unique(raw, return_inverse=True)
        ids = np.array([self._id(int(v), path) for v in values], dtype=np.uint8)
        self.seen.update(int(v) for v in values)
        return ids[inverse].reshape(raw.shape)

    def _id(self, value: int, path: Path) -> int:
        if value == self.ignore:
            return IGNORE_INDEX
        if value in self.table:
            return self.table[value]
        if self.how == "label-map":
            raise RaysegbgError(
                f"mask {path} has value {value}, which --label-map does not map (it maps "
                f"{_listing(sorted(self.table), 8)}; ignore value {self.ignore}): add "
                f"{value}:ID to --label-map or pass --ignore-value {value}"
            )
        raise RaysegbgError(
            f"mask {path} has value {value}, which is neither a class id "
            f"(0..{max(self.table, default=0)}) nor the ignore value {self.ignore}: fix the "
            f"mask, add class names, or {_FIX}"
        )

    def describe(self) -> str:
        """The mapping of the values seen so far, e.g. '0->0, 255->ignore'."""
        pairs = [
            f"{v}->{'ignore' if v == self.ignore else self.table[v]}" for v in sorted(self.seen)
        ]
        return _listing(pairs, 8).replace("'", "") or "no masks read"

    def provenance(self) -> dict[str, Any]:
        table = {str(k): v for k, v in sorted(self.table.items())}
        return {"how": self.how, "map": table, "ignore_value": self.ignore}


def parse_pairs(text: str, flag: str = "--label-map") -> dict[int, int]:
    """'RAW:ID,RAW:ID,...' -> {raw: id}; a malformed or repeated raw value is an error."""
    out: dict[int, int] = {}
    try:
        for item in (i for i in text.split(",") if i.strip()):
            raw, cid = (int(x) for x in item.split(":"))
            if raw in out:
                raise RaysegbgError(f"{flag} maps raw value {raw} twice: give each value once")
            out[raw] = cid
    except ValueError:
        raise RaysegbgError(
            f"{flag} {text!r} is invalid: give RAW:ID pairs like 0:0,255:1"
        ) from None
    if not out:
        raise RaysegbgError(f"{flag} {text!r} is empty: give RAW:ID pairs like 0:0,255:1")
    return out


def _check_label_map(label_map: dict[int, int], classes: Sequence[str], ignore: int | None) -> None:
    n = len(classes)
    for raw, cid in label_map.items():
        if raw < 0 or not (0 <= cid < n or cid == IGNORE_INDEX):
            raise RaysegbgError(
                f"--label-map entry {raw}:{cid} is invalid: raw values are >= 0 and ids are "
                f"class ids 0..{n - 1} ({_listing(list(classes))}) or {IGNORE_INDEX} for ignore"
            )
    if ignore is not None and ignore in label_map:
        raise RaysegbgError(
            f"--ignore-value {ignore} is also in --label-map: drop it from one of them "
            f"(or map it to {IGNORE_INDEX}, which means ignore)"
        )


def choose_mask_values(
    classes: Sequence[str],
    label_map: dict[int, int] | None,
    ignore_value: int | None,
    binary_255: Callable[[], bool],
) -> MaskValues:
    """The user's label map, else 0/255 binary masks read as classes 0/1 (only with 2 classes,
    no --ignore-value and `binary_255()` true), else mask value = class id with 255 ignored."""
    if ignore_value is not None and ignore_value < 0:
        raise RaysegbgError(f"--ignore-value {ignore_value} is negative: give a raw mask value")
    if label_map is not None:
        _check_label_map(label_map, classes, ignore_value)
        if ignore_value is None:  # 255 stays "ignore" unless the map gives it a class
            ignore_value = None if IGNORE_INDEX in label_map else IGNORE_INDEX
        return MaskValues(dict(label_map), ignore_value, "label-map")
    if ignore_value is None and len(classes) == 2 and binary_255():
        return MaskValues({0: 0, 255: 1}, None, "auto-binary")
    ignore = IGNORE_INDEX if ignore_value is None else ignore_value
    return MaskValues({k: k for k in range(len(classes)) if k != ignore}, ignore, "identity")


def mapping_note(provenance: dict[str, Any], classes: Sequence[str]) -> str | None:
    """The line to print when the importer chose a mapping the user did not ask for."""
    if provenance.get("mask_values", {}).get("how") != "auto-binary":
        return None
    return (
        f"masks hold only 0 and 255 with 2 classes: read 0 as class 0 {classes[0]!r} and 255 "
        f"as class 1 {classes[1]!r}; to read them differently, {_FIX}"
    )


def require_train_pixels(
    samples: Iterable[Sample], classes: Sequence[str], hint: Callable[[], str]
) -> Iterator[Sample]:
    """Pass `samples` through; at their end, refuse a class without a pixel in any train mask
    (a model cannot learn it, and a wrong value mapping shows up exactly like this)."""
    counts = np.zeros(len(classes), np.int64)
    labeled = 0
    for s in samples:
        if s.split == "train" and s.mask is not None:
            values = np.asarray(s.mask).ravel().astype(np.int64)
            counts += np.bincount(values, minlength=len(classes))[: len(classes)]
            labeled += 1
        yield s
    empty = [f"{k} {classes[k]!r}" for k in np.flatnonzero(counts == 0)]
    if labeled and empty:
        which = f"class {empty[0]} has" if len(empty) == 1 else f"classes {', '.join(empty)} have"
        raise RaysegbgError(f"{which} no pixels in the {labeled} train masks: {hint()}")


def _id_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(i, str) for i in value)


def _load_split_file(path: Path) -> dict[str, list[str]]:
    if not Path(path).is_file():
        raise RaysegbgError(f"split file {path} not found: pass an existing JSON file")
    try:
        data = json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise RaysegbgError(f"split file {path} is not valid JSON ({e}): fix it") from None
    if isinstance(data, list):
        raise RaysegbgError(
            f"split file {path} holds a list (nnU-Net keeps one split per fold): write the "
            f'fold you want as {{"train": [...], "val": [...], "test": [...]}}'
        )
    if (
        not isinstance(data, dict)
        or set(data) - set(SPLITS)
        or not all(map(_id_list, data.values()))
    ):
        raise RaysegbgError(
            f'split file {path} must be {{"train": [ids], "val": [ids], "test": [ids]}} with '
            f"string ids (keys: {', '.join(SPLITS)}; val/test may be left out)"
        )
    if not data.get("train"):
        raise RaysegbgError(f"split file {path} has no train ids: list at least one")
    return data


def read_split_file(path: Path, ids: Sequence[str], what: str) -> dict[str, str]:
    """{id: split} from a JSON split file that names each of `ids` exactly once."""
    owner: dict[str, str] = {}
    for split, listed in _load_split_file(path).items():
        for i in listed:
            if i in owner:
                where = "twice in" if owner[i] == split else f"in both {owner[i]} and"
                raise RaysegbgError(
                    f"id {i!r} is {where} {split} in split file {path}: give each id one split"
                )
            owner[i] = split
    unknown = sorted(set(owner) - set(ids))
    if unknown:
        raise RaysegbgError(
            f"split file {path} lists {len(unknown)} ids that are not {what}: "
            f"{_listing(unknown)}; ids are file stems, e.g. {_listing(list(ids), 2)}"
        )
    unassigned = [i for i in ids if i not in owner]
    if unassigned:
        raise RaysegbgError(
            f"{len(unassigned)} of {len(ids)} {what} are in no split of split file {path}: "
            f"{_listing(unassigned)}; add them to train, val or test"
        )
    return owner


def fixed_splits(
    split_file: Path, ids: Sequence[str], what: str, val: float | None, test: float | None
) -> dict[str, str]:
    """{id: split} from `split_file`, refused together with --val/--test fractions."""
    if val is not None or test is not None:
        raise RaysegbgError(
            "--split-file fixes every split, so --val/--test do not apply: drop one or the other"
        )
    return read_split_file(split_file, ids, what)
