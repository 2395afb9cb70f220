import torch

from raysegbg.config import DataConfig
from raysegbg.data.loader import (
    SegDataset,
    TrainLoader,
    augment,
    eval_batches,
    in_holdout,
    not_in_holdout,
)


def test_global_batches_do_not_depend_on_world_size(tiny_data):
    ds = SegDataset(tiny_data, "train")
    cfg = DataConfig(crop_size=24)
    one = list(TrainLoader(ds, cfg, 8, 3, seed=1).epoch(2))
    two = [list(TrainLoader(ds, cfg, 8, 3, seed=1, rank=r, world=2).epoch(2)) for r in (0, 1)]
    for step in range(3):
        joined = torch.cat([two[0][step].images, two[1][step].images])
        assert torch.equal(joined, one[step].images)
        assert two[0][step].ids + two[1][step].ids == one[step].ids


def test_epochs_differ_and_seed_repeats(tiny_data):
    ds = SegDataset(tiny_data, "train")
    loader = TrainLoader(ds, DataConfig(crop_size=32), 8, 2, seed=0)
    a, b = next(loader.epoch(0)), next(loader.epoch(1))
    assert a.ids != b.ids
    assert torch.equal(next(loader.epoch(0)).images, a.images)


def test_augment_keeps_image_and_mask_aligned():
    image = torch.zeros(1, 40, 40)
    image[0, 5:15, 20:30] = 1.0
    mask = (image[0] > 0).long()
    cfg = DataConfig(crop_size=32, scale_min=0.7, scale_max=1.4, vflip=True)
    for seed in range(20):
        img, m = augment(image.clone(), mask.clone(), cfg, torch.Generator().manual_seed(seed), 255)
        assert img.shape == (1, 32, 32) and m.shape == (32, 32)
        if m.sum() == 0:
            continue
        # bilinear edges blur, but the square must sit where the mask says: same centroid
        ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
        w = img[0].clamp(0, 1)
        c_img = torch.stack([(ys * w).sum(), (xs * w).sum()]) / w.sum()
        c_mask = torch.stack([ys[m == 1].mean(), xs[m == 1].mean()])
        assert torch.allclose(c_img, c_mask, atol=0.5)


def test_eval_batches_cover_the_split_once_across_ranks(tiny_data):
    ds = SegDataset(tiny_data, "val")
    ids = [i for r in range(2) for b in eval_batches(ds, 4, r, 2) for i in b.ids]
    assert sorted(ids) == sorted(ds.ids)


def test_holdout_by_group_keeps_whole_groups_on_one_side():
    ids = [f"ch2_z{z:03d}" for z in range(200)]
    plain = {i for i in ids if in_holdout(i, 0.5)}
    assert 0.35 < len(plain) / len(ids) < 0.65
    blocks = r"^(.*_z\d\d)\d$"  # ten slices per group
    held = {i for i in ids if in_holdout(i, 0.5, blocks)}
    assert held and held != set(ids)
    for start in range(0, 200, 10):  # every block is all in or all out
        block = {f"ch2_z{z:03d}" for z in range(start, start + 10)}
        assert block <= held or not block & held
    assert held != plain  # the ids alone would split blocks
    assert all(not_in_holdout(i, 0.5, blocks) == (i not in held) for i in ids)
    # an id the expression does not match is its own group
    assert in_holdout("other", 0.5, blocks) == in_holdout("other", 0.5)


def test_every_stream_is_the_same_for_one_worker_and_for_two(tmp_path):
    """Labeled rows with image labels plus an unlabeled stream of another per-step count:
    the two ranks' shares of each stream join into what one worker sees."""
    from raysegbg.data.batch import Stream
    from raysegbg.data.loader import StreamLoader, stream_dataset
    from raysegbg.data.synthetic import make_dataset

    make_dataset("hetero_bg", tmp_path / "semi", n=60, size=32, seed=0, labeled_fraction=0.25)
    labeled = stream_dataset(tmp_path / "semi", Stream("labeled"), DataConfig())
    unlabeled = stream_dataset(tmp_path / "semi", Stream("unlabeled"), DataConfig())
    assert not set(labeled.ids) & set(unlabeled.ids) and len(unlabeled) > 2 * len(labeled)
    cfg = DataConfig(crop_size=24)

    def loader(rank: int, world: int) -> StreamLoader:
        main = TrainLoader(labeled, cfg, 4, 3, 1, rank, world, image_labels=True)
        extra = TrainLoader(unlabeled, cfg, 8, 3, 1 + 7_919, rank, world, image_labels=True)
        return StreamLoader(main, extra)

    one = list(loader(0, 1).epoch(1))
    two = [list(loader(r, 2).epoch(1)) for r in (0, 1)]
    for step in range(3):
        for part in (lambda b: b, lambda b: b.unlabeled):
            whole, halves = part(one[step]), [part(two[r][step]) for r in (0, 1)]
            assert halves[0].ids + halves[1].ids == whole.ids
            for field in ("images", "masks", "image_labels"):
                joined = torch.cat([getattr(h, field) for h in halves])
                assert torch.equal(joined, getattr(whole, field)), field
    batch = one[0]
    assert len(batch.ids) == 4 and len(batch.unlabeled.ids) == 8
    assert (batch.unlabeled.masks == 255).all() and (batch.masks != 255).any()
    # image labels: the classes present in each row's (dropped or kept) mask
    for row, image_id in zip(batch.unlabeled.image_labels, batch.unlabeled.ids, strict=True):
        expected = unlabeled.labels[unlabeled.ids.index(image_id)]
        assert row.nonzero().flatten().tolist() == sorted(expected)


def test_a_weak_stream_hides_the_masks(tiny_data):
    from raysegbg.data.batch import Stream
    from raysegbg.data.loader import stream_dataset

    weak = stream_dataset(
        tiny_data, Stream("all", masks=False, image_labels=True), DataConfig(cache=False)
    )
    image, mask = weak[0]
    assert (mask == 255).all() and weak.labels[0]
