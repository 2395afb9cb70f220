import torch

from raysegbg.config import DataConfig
from raysegbg.data.loader import SegDataset, TrainLoader, augment, eval_batches


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
