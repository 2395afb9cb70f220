"""The pseudo-label store: per image id, a uint8 mask, an optional confidence (a per-pixel
map or per-region scores) and the step that produced it. Persisted as Parquet shards
published as a whole new version (`storage.publish_dir`), so a reader never sees half a store.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysegbg import storage
from raysegbg.errors import RaysegbgError

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("mask", pa.binary()),
        ("confidence", pa.binary()),  # float32 bytes, null when absent
        ("confidence_shape", pa.list_(pa.int32())),
        ("step", pa.int64()),
    ]
)
SHARD_ROWS = 4096


@dataclass
class PseudoLabel:
    mask: np.ndarray  # (H, W) uint8
    confidence: np.ndarray | None  # (H, W) per pixel, (R,) per region, or None
    step: int


def _check(image_id: str, mask: np.ndarray, confidence: np.ndarray | None) -> None:
    if not isinstance(mask, np.ndarray) or mask.ndim != 2 or mask.dtype != np.uint8:
        shape = getattr(mask, "shape", None)
        dtype = getattr(mask, "dtype", type(mask).__name__)
        raise RaysegbgError(
            f"pseudo-label for '{image_id}' must be a 2-D uint8 mask, got shape {shape} "
            f"dtype {dtype}: pass mask.astype(np.uint8) of shape (H, W)"
        )
    if confidence is not None and confidence.ndim == 2 and confidence.shape != mask.shape:
        raise RaysegbgError(
            f"confidence map for '{image_id}' is {confidence.shape} but its mask is "
            f"{mask.shape}: per-pixel confidence must match the mask"
        )
    if confidence is not None and confidence.ndim not in (1, 2):
        raise RaysegbgError(
            f"confidence for '{image_id}' must be (H, W) per pixel or (R,) per region"
        )


class PseudoLabelStore:
    """In-memory store with batched put/get and atomic Parquet persistence."""

    def __init__(self) -> None:
        self._items: dict[str, PseudoLabel] = {}
        self.generation = 0  # counts the puts: what a persisted copy is compared by

    def __len__(self) -> int:
        return len(self._items)

    def ids(self) -> list[str]:
        return list(self._items)

    def put(self, ids, masks, confidences=None, step: int = 0) -> None:
        """Validate the whole batch first, then store it (all or nothing)."""
        confidences = confidences if confidences is not None else [None] * len(ids)
        if not (len(ids) == len(masks) == len(confidences)):
            raise RaysegbgError(
                f"put got {len(ids)} ids, {len(masks)} masks and {len(confidences)} "
                "confidences: pass one of each per image"
            )
        batch = []
        for image_id, mask, conf in zip(ids, masks, confidences, strict=True):
            conf = None if conf is None else np.asarray(conf, dtype=np.float32)
            _check(image_id, mask, conf)
            batch.append((image_id, PseudoLabel(mask.copy(), conf, int(step))))
        self._items.update(batch)
        self.generation += 1

    def get(self, ids) -> list[PseudoLabel]:
        missing = [i for i in ids if i not in self._items]
        if missing:
            raise RaysegbgError(
                f"no pseudo-label for {len(missing)} id(s), e.g. '{missing[0]}': generate "
                "pseudo-labels for them first (the store holds "
                f"{len(self._items)} ids)"
            )
        return [self._items[i] for i in ids]

    # -- persistence ----------------------------------------------------------------------
    def _table(self, ids: list[str]) -> pa.Table:
        cols: dict[str, list] = {name: [] for name in SCHEMA.names}
        for image_id in ids:
            item = self._items[image_id]
            cols["id"].append(image_id)
            cols["height"].append(item.mask.shape[0])
            cols["width"].append(item.mask.shape[1])
            cols["mask"].append(item.mask.tobytes())
            conf = item.confidence
            cols["confidence"].append(None if conf is None else conf.tobytes())
            cols["confidence_shape"].append(None if conf is None else list(conf.shape))
            cols["step"].append(item.step)
        return pa.table(cols, schema=SCHEMA)

    def write_shards(self, directory: Path) -> None:
        """All entries as `labels-NNNNN.parquet` in an existing folder (one empty shard for an
        empty store, so it loads back as empty)."""
        ids = sorted(self._items)
        for k, start in enumerate(range(0, max(len(ids), 1), SHARD_ROWS)):
            table = self._table(ids[start : start + SHARD_ROWS])
            pq.write_table(table, Path(directory) / f"labels-{k:05d}.parquet")

    def save(self, directory: storage.Location) -> None:
        """Publish all entries as the new version of `directory` (`storage.publish_dir`: a
        reader finds the old version or the new one, never none)."""
        with storage.staging(directory) as tmp:
            self.write_shards(tmp)
            storage.publish_dir(tmp, directory)

    @classmethod
    def load(cls, directory: Path) -> PseudoLabelStore:
        """From a folder of shards, or the current version of a published one (read again
        from the new current version if a writer deleted the one being read meanwhile)."""
        for attempt in range(3):
            folder = Path(storage.published(directory) or directory)
            try:
                return cls._read(folder)
            except FileNotFoundError:
                if folder == Path(directory):
                    raise RaysegbgError(f"no pseudo-label store in {directory}") from None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    @classmethod
    def _read(cls, directory: Path) -> PseudoLabelStore:
        shards = sorted(directory.glob("labels-*.parquet"))
        if not shards:
            if not directory.is_dir():
                raise FileNotFoundError(directory)
            raise RaysegbgError(f"no pseudo-label store in {directory}")
        store = cls()
        for shard in shards:
            for row in pq.read_table(shard).to_pylist():
                mask = np.frombuffer(row["mask"], np.uint8).reshape(row["height"], row["width"])
                conf = row["confidence"]
                if conf is not None:
                    conf = np.frombuffer(conf, np.float32).reshape(row["confidence_shape"])
                store._items[row["id"]] = PseudoLabel(mask.copy(), conf, row["step"])
        return store
