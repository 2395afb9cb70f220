"""Per-rank loading of Parquet shards with paired image+mask augmentation.

The global batch order and every sample's augmentation are functions of (seed, epoch, position
in the global batch) only, never of the rank: W workers see exactly the samples and crops that
one worker would see for the same global batch, which is what makes runs comparable across
cluster sizes (and testable).
"""

from __future__ import annotations

import copy
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from raysegbg.config import DataConfig
from raysegbg.data.augment import augment
from raysegbg.data.batch import Batch, Stream
from raysegbg.data.format import (
    DatasetMeta,
    decode_png,
    open_shard,
    read_meta,
    read_split,
    split_shards,
)
from raysegbg.data.rows import MemoryRows, ParquetRows
from raysegbg.errors import RaysegbgError

LABELED_FIX = "import masks, or raise the labeled fraction (`data make --labeled-fraction`)"
UNLABELED_FIX = (
    "add images without masks (`raysegbg data import --allow-unlabeled`), or lower the labeled "
    "fraction (`raysegbg data make --labeled-fraction`, or the method's labeled_fraction)"
)
PAD_MULTIPLE = 32  # smp encoders downsample up to 32x
PIXEL_SCALE = 127.5  # 0..255 pixel values are fed as value / PIXEL_SCALE - 1, in [-1, 1]
ROWS = {"labeled": ("labeled",), "unlabeled": ("unlabeled",), "all": ("labeled", "unlabeled")}


def _row_kind(image_id: str, has_mask: bool, labeled_fraction: float) -> str:
    """A row is labeled when it has a mask and falls in the labeled share of the ids."""
    if not has_mask or (labeled_fraction < 1 and not in_labeled_share(image_id, labeled_fraction)):
        return "unlabeled"
    return "labeled"


def in_labeled_share(image_id: str, fraction: float) -> bool:
    """A fixed share of ids (hashed with a prefix, so not the hold-out's share), e.g. 1/8."""
    return in_holdout(f"labeled:{image_id}", fraction)


def in_holdout(image_id: str, fraction: float, group: str = "") -> bool:
    """A fixed, rank-independent split of a split's ids (by a hash of the id). With `group`, a
    regular expression whose first group names the image's group (e.g. `(.*_z\\d\\d)\\d$`:
    blocks of ten slices), whole groups fall on one side, so neighbouring slices or frames do
    not leak across; an id the expression does not match is its own group."""
    match = re.match(group, image_id) if group else None
    key = match.group(1) if match else image_id
    return zlib.crc32(key.encode()) % 10_000 < fraction * 10_000


def not_in_holdout(image_id: str, fraction: float, group: str = "") -> bool:
    return not in_holdout(image_id, fraction, group)


def row_kinds(path: str | Path, split: str, labeled_fraction: float) -> set[str]:
    """Which kinds of row (`labeled`, `unlabeled`) a split has at this labeled fraction;
    reads only ids and masks."""
    table = read_split(path, split, columns=["id", "mask"])
    ids, masks = table["id"].to_pylist(), table["mask"].to_pylist()
    return {_row_kind(i, m is not None, labeled_fraction) for i, m in zip(ids, masks, strict=True)}


def check_rows(path: str | Path, split: str, labeled_fraction: float, *rows: str) -> None:
    """One line, before any training, when a split has none of the `rows` a method reads."""
    found = row_kinds(path, split, labeled_fraction)
    for kind in rows:
        if kind not in found:
            fix = UNLABELED_FIX if kind == "unlabeled" else LABELED_FIX
            raise RaysegbgError(f"split '{split}' of {path} has no {kind} samples: {fix}")


STREAM_ABOVE = 2 << 30  # reader auto: stream a split whose decoded images would pass this


def streamed(reader: str, path: str | Path, split: str, meta: DatasetMeta | None = None) -> bool:
    """Whether `reader` (data.reader) reads this split by row groups on demand (`meta`: the
    dataset's, when already read)."""
    if reader != "auto":
        return reader == "stream"
    meta = meta or read_meta(path)
    if meta.image_size is None:  # sizes vary: judge by the encoded bytes (PNG ~ 1/10)
        return sum(pq_bytes(f) for f in split_shards(path, split)) * 10 > STREAM_ABOVE
    h, w = meta.image_size
    per_image = h * w * (meta.channels * 4 + 8)  # float image + long mask, as decoded
    return meta.splits.get(split, 0) * per_image > STREAM_ABOVE


def pq_bytes(file) -> int:
    with open_shard(file) as shard:
        meta = shard.metadata
        return sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))


class SegDataset:
    """One split of a dataset: its rows (in memory or read on demand, `data.reader`), decoded
    on use (and with `cache`, kept decoded; never when streamed).

    `rows` picks `labeled` rows (with a mask), `unlabeled` ones or `all`; with
    `labeled_fraction` < 1 only that share of the rows with a mask counts as labeled (semi-
    supervised training on a fully labeled set). Unlabeled rows never carry a mask, except with
    `hidden_masks` (ground truth for diagnostics, never for training); `masks=False` hides
    every mask (weak supervision). Each row's image-level labels are kept in `labels`.
    """

    def __init__(
        self, path: str | Path, split: str, *, rows: str = "labeled", masks: bool = True,
        labeled_fraction: float = 1.0, hidden_masks: bool = False, cache: bool = True,
        reader: str = "memory",
    ):  # fmt: skip
        if rows not in ROWS:
            raise RaysegbgError(f"rows={rows!r}: use one of {', '.join(ROWS)}")
        self.meta: DatasetMeta = read_meta(path)
        stream = streamed(reader, path, split, self.meta)
        self.source = ParquetRows.index(path, split) if stream else MemoryRows(path, split)
        ids, labels, has_mask = self.source.take_columns()
        kinds = [_row_kind(ids[i], m, labeled_fraction) for i, m in enumerate(has_mask)]
        keep = [i for i, kind in enumerate(kinds) if kind in ROWS[rows]]
        if not keep:
            raise RaysegbgError(
                f"split '{split}' of {path} has no {rows} samples: "
                + (UNLABELED_FIX if rows == "unlabeled" else LABELED_FIX)
            )
        self.split = split
        self.ids = [ids[i] for i in keep]
        self._rows = np.array(keep, dtype=np.int64)  # each sample's row in the source
        shown = lambda i: masks and (kinds[i] == "labeled" or hidden_masks)  # noqa: E731
        # per sample: True reads the row's mask, None hides it, an array replaces it
        self._masks: list[bool | np.ndarray | None] = [True if shown(i) else None for i in keep]
        self.labels = [labels[i] for i in keep]
        cache = cache and not stream  # a decoded cache would grow with the dataset
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def streamed(self) -> bool:
        return isinstance(self.source, ParquetRows)

    def groups(self) -> list[torch.Tensor]:
        """The samples' indices by the row group they are read with, in first-seen order (one
        group when the rows are in memory)."""
        found: dict[int, list[int]] = {}
        for i, row in enumerate(self._rows.tolist()):
            found.setdefault(self.source.group(row), []).append(i)
        return [torch.tensor(v) for v in found.values()]

    def subset(self, keep) -> SegDataset:
        """The samples whose id passes `keep` (same order), e.g. a stage's held-out share."""
        picked = [i for i, image_id in enumerate(self.ids) if keep(image_id)]
        if not picked:
            raise RaysegbgError(
                f"no sample of split '{self.split}' is left for this stage: use a bigger "
                "split or change the method's hold-out fraction"
            )
        out = copy.copy(self)
        out.ids = [self.ids[i] for i in picked]
        out._rows = self._rows[picked]
        out._masks = [self._masks[i] for i in picked]
        out.labels = [self.labels[i] for i in picked]
        out._cache = {} if self._cache is not None else None
        return out

    def with_masks(self, masks: dict[str, np.ndarray]) -> SegDataset:
        """The same rows with these (H×W class id) masks instead, e.g. pseudo masks to train
        on: augmentation and padding treat them like masks read from the dataset."""
        missing = [i for i in self.ids if i not in masks]
        if missing:
            raise RaysegbgError(
                f"no mask given for {len(missing)} sample(s) of split '{self.split}', e.g. "
                f"'{missing[0]}': make the masks for every sample first"
            )
        out = copy.copy(self)
        out._masks = [np.asarray(masks[i]) for i in self.ids]
        out._cache = {} if self._cache is not None else None
        return out

    def multi_hot(self, indices: list[int]) -> torch.Tensor:
        """(len(indices), num_classes) float 0/1 image-level labels of those rows."""
        out = torch.zeros(len(indices), self.meta.num_classes)
        for row, i in enumerate(indices):
            out[row, list(self.labels[i])] = 1.0
        return out

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(image float C×H×W in [-1, 1], mask long H×W with ignore_index where unknown)."""
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        item = self._decode(i)
        if self._cache is not None:
            self._cache[i] = item
        return item

    def _decode(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        what = f"'{self.ids[i]}'"
        image_png, mask_png = self.source.get(int(self._rows[i]))
        img = decode_png(image_png, what=f"image of {what}")
        img = img[:, :, None] if img.ndim == 2 else img
        pixels = torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).float()
        image = pixels / PIXEL_SCALE - 1
        if self._masks[i] is None:
            mask = torch.full(image.shape[1:], self.meta.ignore_index, dtype=torch.long)
        elif isinstance(self._masks[i], np.ndarray):  # given by `with_masks`
            mask = torch.from_numpy(self._masks[i].astype(np.int64))
        else:
            mask = torch.from_numpy(np.array(decode_png(mask_png, what=f"mask of {what}"))).long()
        return image, mask


def collate(items: list[tuple[torch.Tensor, torch.Tensor]], ignore: int):
    """Stack, padding every sample to a common size divisible by the encoder's stride."""
    h = max(i.shape[1] for i, _ in items)
    w = max(i.shape[2] for i, _ in items)
    h, w = -(-h // PAD_MULTIPLE) * PAD_MULTIPLE, -(-w // PAD_MULTIPLE) * PAD_MULTIPLE
    images = torch.zeros(len(items), items[0][0].shape[0], h, w)
    masks = torch.full((len(items), h, w), ignore, dtype=torch.long)
    for k, (img, m) in enumerate(items):
        images[k, :, : img.shape[1], : img.shape[2]] = img
        masks[k, : m.shape[0], : m.shape[1]] = m
    return images, masks


@dataclass
class TrainLoader:
    """Yields this rank's slice of every global batch of one epoch."""

    dataset: SegDataset
    cfg: DataConfig
    global_batch: int
    steps: int  # optimisation steps per epoch
    seed: int
    rank: int = 0
    world: int = 1
    image_labels: bool = False  # attach the rows' image-level labels
    _orders: tuple = ()  # (epoch, order) of the last epoch asked for

    def __post_init__(self):
        if self.dataset.streamed:  # a window's groups stay read until the next window
            self.dataset.source.groups_kept = max(self.cfg.shuffle_window, 2)

    def __getstate__(self):  # a background process computes its own orders
        return {**self.__dict__, "_orders": ()}

    def epoch(self, epoch: int) -> Iterator[Batch]:
        order = self._order(epoch)
        for step in range(self.steps):
            yield self._batch_of(epoch, step, order)

    def batch_at(self, step: int) -> Batch:
        """This rank's slice of global batch `step` counted from the start (epoch after epoch):
        stateless, so a resumed run draws the same batches."""
        epoch, step = divmod(step, self.steps)
        return self._batch_of(epoch, step, self._order(epoch))

    def _batch_of(self, epoch: int, step: int, order: torch.Tensor) -> Batch:
        per_rank = self.global_batch // self.world
        first = step * self.global_batch + self.rank * per_rank
        positions = range(first, first + per_rank)
        return self._batch(epoch, [(p, int(order[p % len(order)])) for p in positions])

    def _order(self, epoch: int) -> torch.Tensor:
        """The epoch's sample order: a permutation per pass over the split. A streamed split
        is shuffled by row groups (`data.shuffle_window` groups in random order, their rows in
        random order), so a rank reads each group about once per pass."""
        if self._orders and self._orders[0] == epoch:
            return self._orders[1]
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        n = len(self.dataset)
        reps = -(-self.steps * self.global_batch // n)
        groups = self.dataset.groups() if self.dataset.streamed else []
        passes = []
        for _ in range(reps):
            if len(groups) <= 1:
                passes.append(torch.randperm(n, generator=gen))
                continue
            shuffled = torch.randperm(len(groups), generator=gen).tolist()
            window = self.cfg.shuffle_window
            for start in range(0, len(shuffled), window):
                rows = torch.cat([groups[g] for g in shuffled[start : start + window]])
                passes.append(rows[torch.randperm(len(rows), generator=gen)])
        self._orders = (epoch, torch.cat(passes))
        return self._orders[1]

    def _batch(self, epoch: int, picks: list[tuple[int, int]]) -> Batch:
        ignore = self.dataset.meta.ignore_index
        items = []
        for position, index in picks:
            key = (self.seed * 1_000_003 + epoch) * 10_000_019 + position
            gen = torch.Generator().manual_seed(key % (2**63))
            image, mask = self.dataset[index]
            items.append(augment(image, mask, self.cfg, gen, ignore))
        images, masks = collate(items, ignore)
        indices = [i for _, i in picks]
        labels = self.dataset.multi_hot(indices) if self.image_labels else None
        return Batch(images, masks, [self.dataset.ids[i] for i in indices], labels)


def eval_batches(dataset: SegDataset, batch_size: int, rank: int = 0, world: int = 1):
    """This rank's strided share of a split, unaugmented, in fixed order."""
    mine = list(range(rank, len(dataset), world))
    for start in range(0, len(mine), batch_size):
        chunk = mine[start : start + batch_size]
        images, masks = collate([dataset[i] for i in chunk], dataset.meta.ignore_index)
        yield Batch(images, masks, [dataset.ids[i] for i in chunk])


def steps_per_epoch(n: int, global_batch: int, configured: int) -> int:
    return configured if configured > 0 else max(1, n // global_batch)


UNLABELED_SEED = 7_919  # the unlabeled stream's order is its own, not the labeled one's


class StreamLoader:
    """The method's streams together: each step, this rank's share of the main stream's
    global batch with the unlabeled stream's share attached (`Batch.unlabeled`). Every stream
    has its own rows, per-step count and seeded order, so W workers still see what one sees.

    With `workers` > 0, background processes (torch's DataLoader, kept for the whole run)
    build the batches ahead, `prefetch` each, and hand them over in step order: a batch is a
    function of (epoch, step) only, so the batches are the same with any number of them.
    """

    def __init__(self, main: TrainLoader, unlabeled: TrainLoader | None = None,
                 workers: int = 0, prefetch: int = 2, pin_memory: bool = False):  # fmt: skip
        self.main, self.unlabeled = main, unlabeled
        self._background = None
        if workers > 0:
            self._steps = _EpochSteps(main.steps)
            self._background = torch.utils.data.DataLoader(
                _StepBatches(main, unlabeled), batch_size=None, sampler=self._steps,
                num_workers=workers, prefetch_factor=prefetch, persistent_workers=True,
                pin_memory=pin_memory,
            )  # fmt: skip

    def batch(self, epoch: int, step: int) -> Batch:
        batch = self.main._batch_of(epoch, step, self.main._order(epoch))
        if self.unlabeled is not None:
            batch.unlabeled = self.unlabeled._batch_of(epoch, step, self.unlabeled._order(epoch))
        return batch

    def epoch(self, epoch: int) -> Iterator[Batch]:
        if self._background is None:
            for step in range(self.main.steps):
                yield self.batch(epoch, step)
            return
        self._steps.epoch = epoch
        yield from self._background


class _EpochSteps(torch.utils.data.Sampler):
    """(epoch, step) of every step of the epoch set last."""

    def __init__(self, steps: int):
        self.steps, self.epoch = steps, 0

    def __iter__(self):
        return iter([(self.epoch, step) for step in range(self.steps)])

    def __len__(self) -> int:
        return self.steps


class _StepBatches(torch.utils.data.Dataset):
    """What a background process computes: the batch of (epoch, step)."""

    def __init__(self, main: TrainLoader, unlabeled: TrainLoader | None):
        self.loader = StreamLoader(main, unlabeled)

    def __getitem__(self, key: tuple[int, int]) -> Batch:
        return self.loader.batch(*key)


def stream_dataset(path: str | Path, stream: Stream, data: DataConfig) -> SegDataset:
    """The training split's rows of one stream."""
    return SegDataset(path, "train", rows=stream.rows, masks=stream.masks,
                      labeled_fraction=stream.labeled_fraction,
                      hidden_masks=stream.hidden_masks, cache=data.cache,
                      reader=data.reader)  # fmt: skip
