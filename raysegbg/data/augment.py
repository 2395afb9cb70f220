"""Paired image+mask augmentation of one training sample, driven by one seeded generator.

Every random number comes from the sample's generator, in a fixed order, and an augmentation
that is off draws nothing: the loader seeds the generator from (seed, epoch, position in the
global batch), so W workers augment exactly as one worker would, and a config that leaves the
newer augmentations off draws (and produces) exactly what it did before they existed.

Geometric transforms move image and mask alike (the mask resampled by nearest neighbour, so it
never gains a class id); photometric ones change the image only. Images are float C×H×W in
[-1, 1] and stay there; masks are long H×W with `ignore` where the class is unknown.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from raysegbg.config import DataConfig

LUMA = (0.299, 0.587, 0.114)  # weights of R, G, B in an image's grey version (ITU-R BT.601)


def augment(
    image: torch.Tensor, mask: torch.Tensor, cfg: DataConfig, gen: torch.Generator, ignore: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random scale, warp (rotation, affine, elastic), crop (padding with ignore where the
    image ends), flips and intensity/colour changes; the geometric ones applied identically
    to image and mask."""
    # the first four draws (scale, crop corner, flip) come before any other, as they always have
    u = torch.rand(4, generator=gen).tolist()
    if cfg.augment:
        image, mask = _rescale(image, mask, cfg, u[0])
        image, mask = _warp(image, mask, cfg, gen, ignore)
    if cfg.crop_size:
        image, mask = _random_crop(image, mask, cfg.crop_size, (u[1], u[2]), ignore)
    if cfg.augment and cfg.hflip and u[3] < 0.5:
        image, mask = image.flip(-1), mask.flip(-1)
    if cfg.augment and cfg.vflip and torch.rand(1, generator=gen).item() < 0.5:
        image, mask = image.flip(-2), mask.flip(-2)
    if cfg.augment:
        image = _photometric(image, cfg, gen)
    return image, mask


def _rescale(image, mask, cfg: DataConfig, u: float):
    """Resize both by a factor in [scale_min, scale_max] (the image's size changes)."""
    if (cfg.scale_min, cfg.scale_max) == (1.0, 1.0):
        return image, mask
    scale = cfg.scale_min + u * (cfg.scale_max - cfg.scale_min)
    if scale == 1.0:
        return image, mask
    size = [max(1, round(s * scale)) for s in image.shape[1:]]
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest-exact")[0, 0].long()
    return image, mask


def _random_crop(image, mask, size: int, u: tuple[float, float], ignore: int):
    h, w = image.shape[1:]
    ph, pw = max(0, size - h), max(0, size - w)
    if ph or pw:
        image = F.pad(image, (0, pw, 0, ph))
        mask = F.pad(mask, (0, pw, 0, ph), value=ignore)
        h, w = image.shape[1:]
    top, left = int(u[0] * (h - size + 1)), int(u[1] * (w - size + 1))
    return image[:, top : top + size, left : left + size], mask[
        top : top + size, left : left + size
    ]


def _warp(image, mask, cfg: DataConfig, gen: torch.Generator, ignore: int):
    """Rotation, zoom, shear, shift and elastic deformation as one resampling of the image
    (bilinear) and the mask (nearest). The size stays; what comes from outside the image is 0
    (mid-grey) in the image and `ignore` in the mask."""
    h, w = image.shape[1:]
    theta = _random_affine(cfg, gen, h, w)
    offsets = _elastic_offsets(cfg, gen, h, w)
    if theta is None and offsets is None:
        return image, mask
    if theta is None:
        theta = torch.eye(2, 3)
    grid = F.affine_grid(theta[None], [1, 1, h, w], align_corners=False)
    if offsets is not None:
        grid = grid + offsets
    return _resample(image, mask, grid, ignore)


def _random_affine(cfg: DataConfig, gen: torch.Generator, h: int, w: int):
    """The 2×3 `affine_grid` matrix (output to input, in [-1, 1] coordinates) of a random
    rotation, zoom, shear and shift about the image centre; None when all are off."""
    if not (cfg.rotate or cfg.affine_scale or cfg.shear or cfg.translate):
        return None
    r = [2 * v - 1 for v in torch.rand(6, generator=gen).tolist()]  # each in [-1, 1)
    angle = math.radians(cfg.rotate * r[0])
    shear_x, shear_y = math.radians(cfg.shear * r[2]), math.radians(cfg.shear * r[3])
    zoom = (1 + cfg.affine_scale) ** r[1]  # as likely to shrink by z as to grow by z
    cos, sin = math.cos(angle), math.sin(angle)
    rotation = torch.tensor([[cos, -sin], [sin, cos]], dtype=torch.float64)
    # one shear along x after one along y: unlike a single matrix with both, never singular
    along_x = torch.tensor([[1, math.tan(shear_x)], [0, 1]], dtype=torch.float64)
    along_y = torch.tensor([[1, 0], [math.tan(shear_y), 1]], dtype=torch.float64)
    shear = along_x @ along_y
    forward = zoom * rotation @ shear  # in pixels about the centre, input to output
    shift = torch.tensor([cfg.translate * r[4] * w, cfg.translate * r[5] * h], dtype=torch.float64)
    # affine_grid wants output -> input in coordinates where the image spans [-1, 1]: x_norm
    # = x_pixels / (w / 2), so rotations stay rotations on non-square images
    half = torch.tensor([w / 2, h / 2], dtype=torch.float64)
    backward = torch.linalg.inv(forward)
    linear = backward * half[None, :] / half[:, None]  # diag(1/half) @ backward @ diag(half)
    offset = -(backward @ shift) / half
    return torch.cat([linear, offset[:, None]], dim=1).float()


def _elastic_offsets(cfg: DataConfig, gen: torch.Generator, h: int, w: int):
    """A smooth random displacement field, (1, H, W, 2) in [-1, 1] coordinates: random shifts of
    up to `elastic` pixels on a grid of control points `elastic_smoothness` pixels apart,
    interpolated in between; None when off."""
    if not cfg.elastic:
        return None
    rows = max(2, math.ceil(h / cfg.elastic_smoothness) + 1)
    cols = max(2, math.ceil(w / cfg.elastic_smoothness) + 1)
    control = (2 * torch.rand(1, 2, rows, cols, generator=gen) - 1) * cfg.elastic
    field = F.interpolate(control, size=(h, w), mode="bicubic", align_corners=True)[0]
    field = field / torch.tensor([w / 2, h / 2])[:, None, None]  # pixels -> [-1, 1] units
    return field.permute(1, 2, 0)[None]


def _resample(image, mask, grid: torch.Tensor, ignore: int):
    """Sample both at `grid`; the mask as class id + 1, so that the 0 of 'outside' is told
    apart from class 0 and becomes `ignore`."""
    image = F.grid_sample(image[None], grid, mode="bilinear", align_corners=False)[0]
    shifted = (mask + 1).float()[None, None]
    moved = F.grid_sample(shifted, grid, mode="nearest", align_corners=False)[0, 0].long()
    return image, torch.where(moved == 0, ignore, moved - 1)


def _photometric(image: torch.Tensor, cfg: DataConfig, gen: torch.Generator) -> torch.Tensor:
    """Intensity scale, shift and gamma (any number of channels), then brightness, contrast and
    saturation (3-channel images), on intensities mapped to [0, 1]."""
    intensity = cfg.intensity_scale or cfg.intensity_shift or cfg.gamma
    colour = image.shape[0] == 3 and (cfg.brightness or cfg.contrast or cfg.saturation)
    if not (intensity or colour):
        return image  # untouched, not even mapped to [0, 1] and back
    x = (image + 1) / 2
    if intensity:
        x = _intensity(x, cfg, gen)
    if colour:
        x = _colour_jitter(x, cfg, gen)
    return x * 2 - 1


def _intensity(x: torch.Tensor, cfg: DataConfig, gen: torch.Generator) -> torch.Tensor:
    scale, shift, gamma = (2 * v - 1 for v in torch.rand(3, generator=gen).tolist())
    x = x * (1 + cfg.intensity_scale * scale) + cfg.intensity_shift * shift
    # gamma in [1/(1+g), 1+g]: as likely to brighten the mid-tones as to darken them
    return x.clamp(0, 1) ** ((1 + cfg.gamma) ** gamma)


def _colour_jitter(x: torch.Tensor, cfg: DataConfig, gen: torch.Generator) -> torch.Tensor:
    """Brightness scales the image, contrast blends it with its mean grey, saturation with each
    pixel's grey: each by a factor in [1 - strength, 1 + strength]."""
    b, c, s = (2 * v - 1 for v in torch.rand(3, generator=gen).tolist())
    x = (x * (1 + cfg.brightness * b)).clamp(0, 1)
    mean = _grey(x).mean()
    x = (mean + (x - mean) * (1 + cfg.contrast * c)).clamp(0, 1)
    grey = _grey(x)
    return (grey + (x - grey) * (1 + cfg.saturation * s)).clamp(0, 1)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """(1, H, W) luma of a 3×H×W RGB image."""
    return (x * torch.tensor(LUMA)[:, None, None]).sum(0, keepdim=True)
