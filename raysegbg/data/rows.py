"""Where a split's encoded rows come from: all in memory, or read on demand from the shards.

`MemoryRows` holds every PNG of the split (small datasets: one read, then no I/O).
`ParquetRows` holds only an index (ids, image labels, which rows have a mask, where each row
lies) and reads a whole row group when one of its rows is asked for, keeping the most recently
used groups: memory per process is bounded by `groups_kept` row groups, whatever the dataset's
size, and the shards may be local or in an object store. Both pickle (background loader
processes get their own copy; a `ParquetRows` sends only its index and reopens the shards).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq

from raysegbg.data.format import open_shard, read_split, split_shards
from raysegbg.storage import Location

# ids, image labels and mask presence of a split: what every row source knows up front
Columns = tuple[list[str], list[tuple[int, ...]], list[bool]]


class MemoryRows:
    """Every row's PNG bytes of a split, read at once."""

    def __init__(self, path: str | Location, split: str):
        table = read_split(path, split, columns=["id", "image", "mask", "image_labels"])
        self.images: list[bytes] = table.column("image").to_pylist()
        self.masks: list[bytes | None] = table.column("mask").to_pylist()
        labels = table.column("image_labels").to_pylist()
        ids = table.column("id").to_pylist()
        self.columns: Columns = (ids, [tuple(x or ()) for x in labels],
                                 [m is not None for m in self.masks])  # fmt: skip

    def take_columns(self) -> Columns:
        """The ids, labels and mask presence, once (the dataset keeps its own share)."""
        columns, self.columns = self.columns, None
        return columns

    def get(self, row: int) -> tuple[bytes, bytes | None]:
        return self.images[row], self.masks[row]

    def group(self, row: int) -> int:
        return 0  # one group: the loader shuffles the whole split


@dataclass
class ParquetRows:
    """A split read a row group at a time, with the `groups_kept` latest groups kept."""

    files: list[Location]
    where: np.ndarray  # (rows, 3): shard, row group, row inside the group
    columns: Columns | None
    groups_kept: int = 16  # a training loader keeps its shuffle window's groups
    _open: dict[int, pq.ParquetFile] = field(default_factory=dict, repr=False)
    _groups: OrderedDict = field(default_factory=OrderedDict, repr=False)
    reads: int = 0  # row groups read so far (a benchmark's measure of read amplification)

    @classmethod
    def index(cls, path: str | Location, split: str, groups_kept: int = 16) -> ParquetRows:
        """Read only the ids, image labels and mask validity of a split, shard by shard."""
        files = split_shards(path, split)
        where, ids, labels, has_mask = [], [], [], []
        for f, file in enumerate(files):
            with open_shard(file) as shard:
                meta = shard.metadata
                for g in range(meta.num_row_groups):
                    n = meta.row_group(g).num_rows
                    where.append(np.stack([np.full(n, f), np.full(n, g), np.arange(n)], 1))
                    part = shard.read_row_group(g, columns=["id", "mask", "image_labels"])
                    ids += part.column("id").to_pylist()
                    labels += [tuple(x or ()) for x in part.column("image_labels").to_pylist()]
                    has_mask += part.column("mask").is_valid().to_pylist()
        return cls(files, np.concatenate(where).astype(np.int64), (ids, labels, has_mask),
                   groups_kept)  # fmt: skip

    take_columns = MemoryRows.take_columns

    def get(self, row: int) -> tuple[bytes, bytes | None]:
        f, g, k = (int(v) for v in self.where[row])
        images, masks = self._group(f, g)
        return images[k], masks[k]

    def group(self, row: int) -> int:
        """A number naming the row group the row lies in (for a shuffle by groups)."""
        f, g, _ = self.where[row]
        return int(f) << 32 | int(g)

    def _group(self, f: int, g: int) -> tuple[list[bytes], list[bytes | None]]:
        key = (f, g)
        if key in self._groups:
            self._groups.move_to_end(key)
            return self._groups[key]
        if f not in self._open:
            self._open[f] = open_shard(self.files[f])
        part = self._open[f].read_row_group(g, columns=["image", "mask"])
        self._groups[key] = (part.column("image").to_pylist(), part.column("mask").to_pylist())
        self.reads += 1
        while len(self._groups) > self.groups_kept:
            self._groups.popitem(last=False)
        return self._groups[key]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_open"], state["_groups"] = {}, OrderedDict()  # reopened where unpickled
        return state
