"""Streamed splits (`data.reader=stream`) and background loader processes (`data.workers`)."""

import pytest
import torch

from raysegbg.config import load_config
from raysegbg.data import format as fmt
from raysegbg.data.loader import SegDataset, StreamLoader, TrainLoader, streamed
from raysegbg.data.synthetic import make_dataset
from raysegbg.errors import RaysegbgError
from raysegbg.local import train_local
from tests.conftest import tiny_overrides


@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    """60 images of 32 px in row groups of ~8 rows (so a split spans several groups)."""
    out = tmp_path_factory.mktemp("grouped") / "hetero"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fmt, "ROW_GROUP_BYTES", 8 * 1500)
        make_dataset("hetero_bg", out, n=60, size=32, seed=0)
    return out


def groups_of(path, split):
    with fmt.open_shard(fmt.split_shards(path, split)[0]) as shard:
        return shard.metadata.num_row_groups


def test_a_streamed_split_reads_the_same_rows_a_group_at_a_time(grouped):
    assert groups_of(grouped, "train") > 3
    memory = SegDataset(grouped, "train", reader="memory")
    stream = SegDataset(grouped, "train", reader="stream")
    assert stream.streamed and not memory.streamed and stream.ids == memory.ids
    assert stream.labels == memory.labels and stream._cache is None  # never a decoded cache
    stream.source.groups_kept = 2
    for i in range(len(memory)):
        for a, b in zip(memory[i], stream[i], strict=True):
            assert torch.equal(a, b)
    # one pass in order reads each row group once, and keeps at most `groups_kept`
    assert stream.source.reads == groups_of(grouped, "train")
    assert len(stream.source._groups) == 2
    # a subset (a stage's share) keeps the rows it names, read from the same groups
    half = stream.subset(lambda image_id: image_id in set(memory.ids[::2]))
    assert torch.equal(half[3][0], memory[6][0])


def test_the_streamed_order_is_by_groups_and_the_same_on_any_number_of_ranks(grouped):
    cfg = load_config(None, [f"data.path={grouped}", "data.shuffle_window=2"])
    data = SegDataset(grouped, "train", reader="stream")
    n = len(data)
    one = TrainLoader(data, cfg.data, 8, n // 8, seed=3)
    order = one._order(0)
    assert sorted(order.tolist()) == list(range(n))  # a permutation of the split per pass
    assert not torch.equal(order, one._order(1))
    # rows of two groups at a time: a group's rows lie inside a window of two groups' rows
    sizes = [len(rows) for rows in data.groups()]
    where = {int(row): k for k, row in enumerate(order)}
    for rows in data.groups():
        places = [where[int(i)] for i in rows]
        assert max(places) - min(places) < 2 * max(sizes)
    # so a pass keeping the window's groups reads each group once
    data.source.groups_kept, data.source.reads = 2, 0
    for step in range(n // 8):
        one.batch_at(step)
    assert data.source.reads == len(sizes)
    two = [TrainLoader(data, cfg.data, 8, n // 8, seed=3, rank=r, world=2) for r in range(2)]
    for step in range(n // 8):
        whole = one.batch_at(step)
        parts = [loader.batch_at(step) for loader in two]
        assert whole.ids == parts[0].ids + parts[1].ids
        assert torch.equal(whole.images, torch.cat([p.images for p in parts]))


@pytest.mark.parametrize("reader", ["memory", "stream"])
def test_background_processes_give_the_same_batches(grouped, reader):
    cfg = load_config(None, [f"data.path={grouped}", "data.augment=true", "data.crop_size=24"])
    data = SegDataset(grouped, "train", reader=reader)
    unlabeled = SegDataset(grouped, "train", rows="all", masks=False, reader=reader)
    loaders = [
        StreamLoader(TrainLoader(data, cfg.data, 4, 5, seed=1),
                     TrainLoader(unlabeled, cfg.data, 2, 5, seed=2), workers=workers)
        for workers in (0, 2)
    ]  # fmt: skip
    for epoch in (0, 1):
        inline, background = (list(loader.epoch(epoch)) for loader in loaders)
        assert len(inline) == len(background) == 5
        for a, b in zip(inline, background, strict=True):
            assert a.ids == b.ids and a.unlabeled.ids == b.unlabeled.ids
            assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
            assert torch.equal(a.unlabeled.images, b.unlabeled.images)


def test_auto_streams_only_a_split_too_big_for_memory(grouped, monkeypatch):
    from raysegbg.data import loader

    assert not streamed("auto", grouped, "train")
    monkeypatch.setattr(loader, "STREAM_ABOVE", 40 * 32 * 32 * (3 * 4 + 8))
    assert streamed("auto", grouped, "train") and not streamed("auto", grouped, "val")
    assert streamed("stream", grouped, "val") and not streamed("memory", grouped, "train")
    with pytest.raises(
        RaysegbgError, match="data.reader='disk' is not one of: auto, memory, stream"
    ):
        load_config(None, ["data.reader=disk"])


def test_a_streamed_run_with_background_processes_trains_as_one_without(grouped, tmp_path):
    overrides = tiny_overrides(grouped, tmp_path, **{"data.reader": "stream", "data.workers": 1,
                                                     "data.shuffle_window": 2})  # fmt: skip
    whole, _ = train_local(load_config(None, overrides), tmp_path / "whole")
    inline, _ = train_local(load_config(None, overrides + ["data.workers=0"]), tmp_path / "in")
    assert whole["train/loss"] == inline["train/loss"] and whole["val/miou"] == inline["val/miou"]
