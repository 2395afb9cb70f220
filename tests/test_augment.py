"""Paired augmentation: geometry moves image and mask together, photometry leaves the mask
alone, every draw is seeded, and the default config behaves exactly as before the newer
augmentations existed."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
import torch.nn.functional as F

from raysegbg.config import DataConfig, load_config
from raysegbg.data.augment import augment
from raysegbg.data.loader import SegDataset, TrainLoader
from raysegbg.errors import RaysegbgError

IGNORE = 255
WARPS = {
    "rotate": DataConfig(crop_size=0, rotate=40),
    "affine": DataConfig(crop_size=0, affine_scale=0.3, shear=15, translate=0.2),
    "elastic": DataConfig(crop_size=0, elastic=3, elastic_smoothness=12),
    "everything": DataConfig(
        crop_size=40, rotate=30, affine_scale=0.2, shear=10, translate=0.1, elastic=2, vflip=True
    ),
}
PHOTOMETRIC = DataConfig(crop_size=0, scale_min=1.0, scale_max=1.0, hflip=False,
                         intensity_scale=0.5, intensity_shift=0.3, gamma=1.0,
                         brightness=0.5, contrast=0.5, saturation=0.8)  # fmt: skip
ALL_ON = dataclasses.replace(WARPS["everything"], intensity_scale=0.2, gamma=0.5, contrast=0.3)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def blocks(seed: int, size: int = 48, block: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """A mask of random 3-class blocks and a 3-channel image that encodes it: channel k is
    bright where the class is k, dark elsewhere."""
    coarse = torch.randint(0, 3, (size // block, size // block), generator=gen(seed))
    mask = coarse.repeat_interleave(block, 0).repeat_interleave(block, 1)
    return F.one_hot(mask, 3).permute(2, 0, 1).float() * 1.8 - 0.9, mask


def uniform_inside(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Pixels whose (2·radius+1)² neighbourhood holds one class and no ignore, and lies within
    the image (its edge pixels blend with input pixels the output does not show)."""
    m = F.pad(mask[None, None].float(), [radius] * 4, value=IGNORE)
    k = 2 * radius + 1
    high = F.max_pool2d(m, k, 1)[0, 0]
    low = -F.max_pool2d(-m, k, 1)[0, 0]
    return (high == low) & (mask != IGNORE)


@pytest.mark.parametrize("name", list(WARPS))
def test_warps_keep_image_and_mask_aligned(name):
    """Away from class borders (where bilinear blends and nearest picks), the image's
    brightest channel still names the mask's class: a mask half a pixel off fails this."""
    cfg = WARPS[name]
    checked = 0
    for seed in range(12):
        image, mask = blocks(seed)
        img, m = augment(image, mask, cfg, gen(100 + seed), IGNORE)
        assert img.shape[1:] == m.shape
        inside = uniform_inside(m, radius=1)
        assert torch.equal(img.argmax(0)[inside], m[inside])
        checked += int(inside.sum())
    assert checked > 12 * 600  # a good share of every image was compared


@pytest.mark.parametrize("name", list(WARPS))
def test_warped_masks_hold_only_their_class_ids_or_ignore(name):
    for seed in range(12):
        image, mask = blocks(seed)
        mask = torch.tensor([0, 3, 7])[mask]
        mask[:8, :16] = IGNORE
        img, m = augment(image, mask, WARPS[name], gen(seed), IGNORE)
        assert set(m.unique().tolist()) <= {0, 3, 7, IGNORE}
        assert img.shape[0] == 3 and -1 <= img.min() and img.max() <= 1


def test_what_comes_from_outside_is_ignore_and_mid_grey():
    cfg = DataConfig(crop_size=0, scale_min=1.0, scale_max=1.0, hflip=False, rotate=45)
    outside_seen = 0
    for seed in range(10):
        image, mask = torch.full((1, 48, 48), 0.9), torch.ones(48, 48, dtype=torch.long)
        img, m = augment(image, mask, cfg, gen(seed), IGNORE)
        assert set(m.unique().tolist()) <= {1, IGNORE}
        # well outside (all neighbours outside too) the image is exactly 0, mid-grey
        outside = -F.max_pool2d(-(m == IGNORE)[None, None].float(), 3, 1, 1)[0, 0] == 1
        assert (img[0][outside] == 0).all()
        assert (img[0][m == 1] > 0).all()  # at most half mixed with the grey outside
        outside_seen += int(outside.sum())
    assert outside_seen > 0  # some rotation was large enough to show the corners


def test_photometric_leaves_the_mask_alone_and_the_image_in_range():
    _, mask = blocks(0)
    for channels in (1, 3):
        image = torch.rand(channels, 48, 48, generator=gen(1)) * 2 - 1
        for seed in range(10):
            img, m = augment(image.clone(), mask.clone(), PHOTOMETRIC, gen(seed), IGNORE)
            assert torch.equal(m, mask)
            assert img.shape == image.shape and -1 <= img.min() and img.max() <= 1
            assert not torch.equal(img, image)


def test_intensity_and_gamma_keep_the_order_of_intensities():
    """Scale, shift and gamma are monotonic: an MRI slice keeps its anatomy's ordering (up to
    values clipped at either end)."""
    cfg = dataclasses.replace(PHOTOMETRIC, intensity_shift=0.0)  # nothing clipped at 0
    image = torch.linspace(-1, 0.3, 48 * 48).reshape(1, 48, 48)
    for seed in range(10):
        img, _ = augment(image, torch.zeros(48, 48, dtype=torch.long), cfg, gen(seed), IGNORE)
        flat = img.flatten()
        assert (flat[1:] >= flat[:-1]).all()


def test_colour_jitter_is_for_rgb_only():
    """A 1-channel image draws nothing for colour jitter: the same as with it off."""
    image, mask = torch.rand(1, 32, 32, generator=gen(0)) * 2 - 1, torch.zeros(32, 32).long()
    no_colour = dataclasses.replace(PHOTOMETRIC, brightness=0.0, contrast=0.0, saturation=0.0)
    a = augment(image, mask, PHOTOMETRIC, gen(3), IGNORE)[0]
    assert torch.equal(a, augment(image, mask, no_colour, gen(3), IGNORE)[0])


def test_the_same_seed_gives_the_same_sample():
    image, mask = blocks(0)
    a = augment(image, mask, ALL_ON, gen(5), IGNORE)
    b = augment(image, mask, ALL_ON, gen(5), IGNORE)
    c = augment(image, mask, ALL_ON, gen(6), IGNORE)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_two_workers_see_what_one_worker_sees_with_every_augmentation(tiny_data):
    ds = SegDataset(tiny_data, "train")
    one = list(TrainLoader(ds, ALL_ON, 8, 3, seed=1).epoch(2))
    again = list(TrainLoader(ds, ALL_ON, 8, 3, seed=1).epoch(2))
    two = [list(TrainLoader(ds, ALL_ON, 8, 3, seed=1, rank=r, world=2).epoch(2)) for r in (0, 1)]
    plain = list(TrainLoader(ds, DataConfig(crop_size=40), 8, 3, seed=1).epoch(2))
    for step in range(3):
        for field in ("images", "masks"):
            joined = torch.cat([getattr(two[r][step], field) for r in (0, 1)])
            assert torch.equal(joined, getattr(one[step], field)), field
            assert torch.equal(getattr(again[step], field), getattr(one[step], field)), field
        assert not torch.equal(plain[step].images, one[step].images)


def old_augment(image, mask, cfg, gen, ignore):
    """`augment` as it was before rotation, affine, elastic and photometric augmentation:
    the reference that the default config must still match bit for bit."""
    u = torch.rand(4, generator=gen).tolist()
    if cfg.augment and (cfg.scale_min, cfg.scale_max) != (1.0, 1.0):
        scale = cfg.scale_min + u[0] * (cfg.scale_max - cfg.scale_min)
        if scale != 1.0:
            size = [max(1, round(s * scale)) for s in image.shape[1:]]
            image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
            mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest-exact")[
                0, 0
            ].long()
    if cfg.crop_size:
        h, w = image.shape[1:]
        size = cfg.crop_size
        ph, pw = max(0, size - h), max(0, size - w)
        if ph or pw:
            image = F.pad(image, (0, pw, 0, ph))
            mask = F.pad(mask, (0, pw, 0, ph), value=ignore)
            h, w = image.shape[1:]
        top, left = int(u[1] * (h - size + 1)), int(u[2] * (w - size + 1))
        image, mask = (
            image[:, top : top + size, left : left + size],
            mask[top : top + size, left : left + size],
        )
    if cfg.augment and cfg.hflip and u[3] < 0.5:
        image, mask = image.flip(-1), mask.flip(-1)
    if cfg.augment and cfg.vflip and torch.rand(1, generator=gen).item() < 0.5:
        image, mask = image.flip(-2), mask.flip(-2)
    return image, mask


@pytest.mark.parametrize(
    "cfg",
    [
        DataConfig(),
        DataConfig(crop_size=24, vflip=True),
        DataConfig(crop_size=0, scale_min=0.5, scale_max=2.0),
        DataConfig(scale_min=1.0, scale_max=1.0, hflip=False),
        DataConfig(augment=False, crop_size=0),
        load_config(None, []).data,
    ],
    ids=["default", "crop-vflip", "full-image", "no-scale", "off", "loaded"],
)
def test_configs_without_the_new_keys_augment_exactly_as_before(cfg):
    for seed in range(20):
        size = (40 + seed, 80 - seed)
        image = torch.rand(3, *size, generator=gen(seed)) * 2 - 1
        mask = torch.randint(0, 4, size, generator=gen(seed))
        new_gen, old_gen = gen(seed), gen(seed)
        new = augment(image, mask, cfg, new_gen, IGNORE)
        old = old_augment(image, mask, cfg, old_gen, IGNORE)
        assert torch.equal(new[0], old[0]) and torch.equal(new[1], old[1])
        assert torch.equal(new_gen.get_state(), old_gen.get_state())  # no extra draws


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.rotate=-5", "data.rotate=-5.0 is out of range: use a number in [0, 180] (0: off)"),
        ("data.gamma=3", "data.gamma=3.0 is out of range: use a number in [0, 2] (0: off)"),
        ("data.elastic_smoothness=0.5", "use a number >= 1"),
    ],
)
def test_strengths_out_of_range_are_one_line_errors(override, message):
    with pytest.raises(RaysegbgError, match=re.escape(message)):
        load_config(None, [override])
