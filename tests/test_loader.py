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
