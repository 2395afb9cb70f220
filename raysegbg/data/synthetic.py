"""Seeded synthetic datasets, each built to show one failure mode of background-unaware models.

Every generator is vectorised numpy over a batch: `fn(rng, n, size) -> (images, masks)` with
images `(n, size, size, channels)` uint8 and masks `(n, size, size)` uint8 class ids. The same
seed gives byte-identical shards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raysegbg.data.format import DatasetMeta, Sample, assign_splits, write_dataset
from raysegbg.errors import RaysegbgError

Batch = tuple[np.ndarray, np.ndarray]
_CHUNK = 128
FG_RGB = np.array([200.0, 55.0, 45.0], dtype=np.float32)


@dataclass(frozen=True)
class GeneratorSpec:
    """A generator function plus the dataset metadata it implies."""

    fn: Callable[[np.random.Generator, int, int], Batch]
    classes: tuple[str, ...]
    channels: int
    summary: str

    def __call__(self, rng: np.random.Generator, n: int, size: int) -> Batch:
        return self.fn(rng, n, size)


# ---------------------------------------------------------------- geometry helpers


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1), shaped (1, H, W) for broadcasting over a batch."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    return c[None, :, None], c[None, None, :]


def _uniform(rng: np.random.Generator, lo: float, hi: float, shape: tuple[int, ...]) -> np.ndarray:
    return rng.uniform(lo, hi, shape).astype(np.float32)[..., None, None]


def _rotated(rng: np.random.Generator, n: int, size: int, lo: float, hi: float):
    """Per-image shape frame: coordinates (u, v) relative to a random centre and angle."""
    yy, xx = _grid(size)
    cy, cx = _uniform(rng, lo, hi, (n,)), _uniform(rng, lo, hi, (n,))
    theta = _uniform(rng, 0, np.pi, (n,))
    dy, dx = yy - cy, xx - cx
    return dx * np.cos(theta) + dy * np.sin(theta), -dx * np.sin(theta) + dy * np.cos(theta)


def _ellipse(rng: np.random.Generator, n: int, size: int, lo: float, hi: float) -> np.ndarray:
    """Normalised squared radius (n, H, W) of one random ellipse per image; inside where <= 1."""
    u, v = _rotated(rng, n, size, 0.2, 0.8)
    a, b = _uniform(rng, lo, hi, (n,)), _uniform(rng, lo, hi, (n,))
    return (u / a) ** 2 + (v / b) ** 2


def _square(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    u, v = _rotated(rng, n, size, 0.2, 0.8)
    return np.maximum(np.abs(u), np.abs(v)) <= _uniform(rng, 0.08, 0.16, (n,))


def _triangle(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    u, v = _rotated(rng, n, size, 0.2, 0.8)
    inradius = _uniform(rng, 0.06, 0.11, (n,))
    dist = [u * np.cos(a) + v * np.sin(a) for a in (np.pi / 2, 7 * np.pi / 6, 11 * np.pi / 6)]
    return np.max(dist, axis=0) <= inradius


def _blobs(rng: np.random.Generator, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """1-3 ellipses per image: (inside mask, smooth shading in [0.7, 1])."""
    count = rng.integers(1, 4, n)
    r2 = np.stack([_ellipse(rng, n, size, 0.08, 0.2) for _ in range(3)], axis=1)
    r2 = np.where((np.arange(3)[None, :] < count[:, None])[..., None, None], r2, np.inf)
    nearest = r2.min(axis=1)
    return nearest <= 1.0, 1.0 - 0.3 * np.clip(nearest, 0, 1)


# ---------------------------------------------------------------- textures, (n, H, W, 3) in 0..255


def _waves(rng: np.random.Generator, n: int, size: int, lo: float, hi: float) -> np.ndarray:
    """A random plane sinusoid in [0, 1] per image, `lo`-`hi` cycles across the image."""
    u, _ = _rotated(rng, n, size, 0.0, 1.0)
    freq = _uniform(rng, lo, hi, (n,))
    return 0.5 + 0.5 * np.sin(2 * np.pi * freq * u + _uniform(rng, 0, 6.3, (n,)))


def _colour(rng: np.random.Generator, n: int, lo: float, hi: float) -> np.ndarray:
    return rng.uniform(lo, hi, (n, 1, 1, 3)).astype(np.float32)


def _dark_smooth(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    return _colour(rng, n, 15, 70) + 25 * _waves(rng, n, size, 0.5, 1.5)[..., None]


def _bright_noise(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    grey = rng.uniform(150, 210, (n, 1, 1, 1)).astype(np.float32)
    return grey + rng.uniform(-45, 45, (n, size, size, 3)).astype(np.float32)


def _stripes(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    a, b = _colour(rng, n, 60, 140), _colour(rng, n, 120, 220)
    a[..., 0] *= 0.5  # keep stripes away from the red foreground hue
    t = _waves(rng, n, size, 2, 6)[..., None]
    return a * t + b * (1 - t)


def _distractor(rng: np.random.Generator, n: int, size: int, fg: np.ndarray) -> np.ndarray:
    """The foreground's colour with a 2-px checker texture: same hue, different texture."""
    yy, xx = np.indices((size, size))
    checker = ((yy // 2 + xx // 2) % 2).astype(np.float32)[None, :, :, None]
    return fg * (0.45 + 0.55 * checker) + rng.normal(0, 8, (n, size, size, 3)).astype(np.float32)


def _patchwork(rng: np.random.Generator, modes: list[np.ndarray], cells: int = 7) -> np.ndarray:
    """Voronoi cells, each filled by one mode; every mode appears in every image."""
    n, size = modes[0].shape[:2]
    yy, xx = _grid(size)
    seeds = rng.random((n, cells, 2), dtype=np.float32)
    dist = (yy[:, None] - seeds[:, :, 0, None, None]) ** 2
    dist = dist + (xx[:, None] - seeds[:, :, 1, None, None]) ** 2
    cell = dist.argmin(axis=1)
    cell_mode = np.argsort(rng.random((n, cells)), axis=1) % len(modes)
    pixel_mode = np.take_along_axis(cell_mode, cell.reshape(n, -1), axis=1).reshape(cell.shape)
    return np.choose(pixel_mode[..., None], modes)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- generators


def _hetero_bg(rng: np.random.Generator, n: int, size: int) -> Batch:
    fg = FG_RGB + _colour(rng, n, -15, 15)
    modes = [_dark_smooth(rng, n, size), _bright_noise(rng, n, size), _stripes(rng, n, size)]
    bg = _patchwork(rng, [*modes, _distractor(rng, n, size, fg)])
    inside, shade = _blobs(rng, n, size)
    obj = fg * shade[..., None] + rng.normal(0, 3, bg.shape).astype(np.float32)
    return _to_uint8(np.where(inside[..., None], obj, bg)), inside.astype(np.uint8)


def _multiclass(rng: np.random.Generator, n: int, size: int) -> Batch:
    modes = [_dark_smooth(rng, n, size), _bright_noise(rng, n, size), _stripes(rng, n, size)]
    img, mask = _patchwork(rng, modes), np.zeros((n, size, size), np.uint8)
    for draw in range(3):
        kind = rng.integers(1 if draw == 0 else 0, 4, n)[:, None, None]  # 0 = no object
        r2 = _ellipse(rng, n, size, 0.07, 0.15)
        disc = np.float32([60, 100, 220]) * (1 - 0.3 * np.clip(r2, 0, 1))[..., None]
        stripe = _waves(rng, n, size, 5, 8)[..., None]
        square = np.float32([230, 200, 40]) * (0.5 + 0.5 * stripe)
        dots = (np.indices((size, size)).sum(0) % 3 == 0)[None, :, :, None]
        tri = np.where(dots, 250.0, 130.0) * np.float32([0.9, 0.3, 0.9])
        shapes = [(1, r2 <= 1, disc), (2, _square(rng, n, size), square)]
        for cls, inside, look in [*shapes, (3, _triangle(rng, n, size), tri)]:
            hit = inside & (kind == cls)
            img, mask = np.where(hit[..., None], look, img), np.where(hit, cls, mask)
    return _to_uint8(img), mask.astype(np.uint8)


AMBIGUOUS_MEANS = np.float32([[150, 112, 112], [112, 150, 112], [112, 112, 150]])


def _ambiguous(rng: np.random.Generator, n: int, size: int) -> Batch:
    """Same-shaped objects whose classes differ only in a mean colour buried in per-pixel noise
    (σ 45 vs 38 apart): a pixel and its neighbours are ambiguous, the class statistics over
    the dataset are not. A grey noisy background mode sits between the classes."""
    grey = 125 + rng.normal(0, 45, (n, size, size, 3)).astype(np.float32)
    modes = [_dark_smooth(rng, n, size), _stripes(rng, n, size), grey]
    img, mask = _patchwork(rng, modes), np.zeros((n, size, size), np.uint8)
    for draw in range(3):
        kind = rng.integers(1 if draw == 0 else 0, 4, n)[:, None, None]  # 0 = no object
        inside = _ellipse(rng, n, size, 0.08, 0.16) <= 1
        for cls in (1, 2, 3):
            hit = inside & (kind == cls)
            look = AMBIGUOUS_MEANS[cls - 1] + rng.normal(0, 45, img.shape).astype(np.float32)
            img, mask = np.where(hit[..., None], look, img), np.where(hit, cls, mask)
    return _to_uint8(img), mask.astype(np.uint8)


def _varying_contrast(rng: np.random.Generator, n: int, size: int) -> Batch:
    inside, shade = _blobs(rng, n, size)
    texture = 90 + 20 * _waves(rng, n, size, 1, 3) + rng.normal(0, 6, (n, size, size))
    contrast = 45 * shade * inside
    illum = 0.25 + 0.75 * _waves(rng, n, size, 0.3, 0.6)
    return _to_uint8(illum * (texture + contrast))[..., None], inside.astype(np.uint8)


def _head(rng: np.random.Generator, n: int, size: int) -> Batch:
    """A T1-like head slice: the brain (foreground; grey-matter rim, white-matter core) inside
    dark CSF and skull rings that thin out and break in places (partial volume), a scalp as
    bright as white matter, air outside, and in most slices extra-cranial tissue (eye, muscle)
    with the brain's own intensities pressed against the skull. Bias field, blur and noise on
    top. Low slices (skull base) hold only small brain lobes among face tissue. The background is
    air, bone, fat and brain-like tissue: one background class has to cover all of them, and
    where the rings break the brain-like parts touch the brain."""
    u, v = _rotated(rng, n, size, 0.42, 0.58)
    a, b = _uniform(rng, 0.36, 0.46, (n,)), _uniform(rng, 0.30, 0.42, (n,))
    r, phi = np.hypot(u / a, v / b), np.arctan2(v / b, u / a)

    def ring(lo: float, hi: float, amp: float) -> np.ndarray:  # thickness varying with angle
        mean = _uniform(rng, lo, hi, (n,))
        wave = amp * np.sin(2 * phi + _uniform(rng, 0, 6.3, (n,)))
        return np.maximum(mean + wave, 0.0)

    wobble = sum(_uniform(rng, 0, amp, (n,)) * np.sin(k * phi + _uniform(rng, 0, 6.3, (n,)))
                 for k, amp in ((2, 0.04), (3, 0.03), (5, 0.02)))  # fmt: skip
    brain_edge = _uniform(rng, 0.66, 0.74, (n,)) + wobble
    csf_edge = brain_edge + ring(0.0, 0.04, 0.04)
    skull_edge = csf_edge + ring(0.02, 0.06, 0.04)
    gyri = 0.05 * np.sin(9 * phi + _uniform(rng, 0, 6.3, (n,)))
    white = r <= brain_edge - _uniform(rng, 0.12, 0.2, (n,)) + gyri
    brain = r <= brain_edge
    tissue = np.where(white, 165.0, 110.0) + 8 * _waves(rng, n, size, 2, 4)
    img = np.where(brain, tissue, 45.0)  # CSF
    img = np.where(r > csf_edge, 25.0, img)  # bone
    img = np.where(r > skull_edge, _uniform(rng, 150, 185, (n,)), img)  # scalp fat
    img = np.where(r > 1.0, 8.0, img)  # air
    # low slices (skull base, 2 in 5): the brain is 1-3 small lobes with thin, broken CSF rims,
    # and the rest of the skull holds face tissue (muscle, fat, air sinuses) as bright as brain
    low = (rng.random(n) < 0.4)[:, None, None]
    lobes, rims = np.zeros(r.shape, bool), np.zeros(r.shape, bool)
    count = rng.integers(1, 4, n)[:, None, None]
    for k in range(3):
        du = (u / a - _uniform(rng, -0.4, 0.4, (n,))) / _uniform(rng, 0.15, 0.3, (n,))
        dv = (v / b - _uniform(rng, -0.1, 0.4, (n,))) / _uniform(rng, 0.12, 0.25, (n,))
        lr, angle = np.hypot(du, dv), np.arctan2(dv, du)
        rim = 0.3 * np.maximum(np.sin(2 * angle + _uniform(rng, 0, 6.3, (n,))), 0)
        lobes |= (lr <= 1) & (k < count)
        rims |= (lr > 1) & (lr <= 1 + rim) & (k < count)
    lobes &= r <= brain_edge
    face = _waves(rng, n, size, 1, 3) + 0.3 * _waves(rng, n, size, 3, 6)
    face = np.where(face > 0.85, 165.0, np.where(face > 0.4, 110.0, 20.0))
    inside = low & (r <= csf_edge)
    img = np.where(inside, np.where(lobes, tissue, np.where(rims, 45.0, face)), img)
    brain = np.where(low, lobes, brain)
    # an eye or muscle against the skull, with grey/white-matter intensities, in 3 of 4 slices
    angle = _uniform(rng, 0, 2 * np.pi, (n,))
    du, dv = u / a - 0.95 * np.cos(angle), v / b - 0.95 * np.sin(angle)
    blob_r = np.hypot(du, dv) / _uniform(rng, 0.2, 0.35, (n,))
    extra = (blob_r <= 1) & (r > skull_edge) & (rng.random(n) < 0.75)[:, None, None]
    img = np.where(extra, np.where(blob_r <= 0.5, 165.0, 110.0), img)
    padded = np.pad(img, ((0, 0), (1, 1), (1, 1)), mode="edge")  # partial volume: 3x3 blur
    kernel = np.outer([1, 2, 1], [1, 2, 1]) / 16.0
    img = sum(kernel[i, j] * padded[:, i : i + size, j : j + size]
              for i in range(3) for j in range(3))  # fmt: skip
    bias = 0.8 + 0.4 * _waves(rng, n, size, 0.3, 0.7)
    img = img * bias + rng.normal(0, 10, (n, size, size)).astype(np.float32)
    return _to_uint8(img)[..., None], brain.astype(np.uint8)


def _cooccur(rng: np.random.Generator, n: int, size: int) -> Batch:
    yy, xx = _grid(size)
    level = _uniform(rng, 0.35, 0.6, (n,))
    horizon = level + 0.04 * np.sin(12 * xx + _uniform(rng, 0, 6.3, (n,)))
    ripple = 0.5 + 0.5 * np.sin(2 * np.pi * 9 * yy + 3 * np.sin(6 * xx) + horizon * 40)
    water = np.float32([30, 80, 160]) + 40 * ripple[..., None]
    land = _patchwork(rng, [_dark_smooth(rng, n, size), _bright_noise(rng, n, size)], cells=4)
    bg = np.where((yy > horizon)[..., None], water, land)
    u, v = _rotated(rng, n, size, 0.0, 1.0)
    cy, cx = level + _uniform(rng, 0.14, 0.28, (n,)), _uniform(rng, 0.25, 0.75, (n,))
    a, b = _uniform(rng, 0.1, 0.2, (n,)), _uniform(rng, 0.04, 0.07, (n,))
    inside = ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1
    boat = np.float32([235, 140, 30]) + 10 * u[..., None] + 10 * v[..., None]
    return _to_uint8(np.where(inside[..., None], boat, bg)), inside.astype(np.uint8)


CONTEXT_CLASSES = ("background", "boat", "plane", "car")


def _context_textures(rng: np.random.Generator, n: int, size: int) -> list[np.ndarray]:
    """The background texture each class always sits on: rippled water (boat), a bright sky
    with soft clouds (plane), a grey road with dashed lane marks (car)."""
    yy, xx = _grid(size)
    phase = _uniform(rng, 0, 6.3, (n,))
    ripple = 0.5 + 0.5 * np.sin(2 * np.pi * 9 * yy + 3 * np.sin(6 * xx) + phase)
    water = np.float32([30, 80, 160]) + 40 * ripple[..., None]
    clouds = _waves(rng, n, size, 1, 2)[..., None] * _waves(rng, n, size, 1, 2)[..., None]
    sky = np.float32([150, 190, 235]) + 15 * (1 - yy[..., None]) + 30 * clouds
    dash = ((yy * size + _uniform(rng, 0, 8, (n,))) % 8 < 4) & (np.abs(xx - 0.5) < 0.5)
    lane = (np.abs((xx * size) % 16 - 8) < 1) & dash
    road = np.float32([95, 95, 100]) + rng.normal(0, 6, (n, size, size, 1)).astype(np.float32)
    road = np.where(lane[..., None], np.float32([225, 205, 60]), road)
    return [water, sky, road]


def _contexts_with_map(rng: np.random.Generator, n: int, size: int):
    """(images, masks, context): 1 or 2 object classes per image, each inside a vertical strip
    of its own background texture; the rest of the image is a patchwork of other backgrounds.
    `context` is the class whose texture a background pixel shows (0: other background)."""
    yy, xx = _grid(size)
    other = _patchwork(
        rng, [_dark_smooth(rng, n, size), _bright_noise(rng, n, size), _stripes(rng, n, size)]
    )
    textures = _context_textures(rng, n, size)
    two = rng.random(n) < 0.35
    picks = np.argsort(rng.random((n, 3)), axis=1) + 1  # a random order of the 3 classes
    img, mask = other, np.zeros((n, size, size), np.uint8)
    context = np.zeros((n, size, size), np.uint8)
    width = np.where(two, rng.uniform(0.42, 0.5, n), rng.uniform(0.5, 0.75, n))
    left = np.where(two, 0.0, rng.uniform(0, 1 - width))
    for slot in range(2):
        cls = picks[:, slot]
        here = (slot == 0) | two
        lo = np.where(slot == 0, left, 1 - width)[:, None, None]
        strip = (xx >= lo) & (xx < lo + width[:, None, None]) & here[:, None, None]
        look = np.choose((cls - 1)[:, None, None, None], textures)
        img = np.where(strip[..., None], look, img)
        context = np.where(strip, cls[:, None, None], context).astype(np.uint8)
        cx = lo + width[:, None, None] / 2
        cy = _uniform(rng, 0.3, 0.7, (n,))
        r = width[:, None, None] * _uniform(rng, 0.22, 0.3, (n,))  # the object fits its strip
        du, dv = (xx - cx) / r, (yy - cy) / r
        shapes = {
            1: (du / 1.5) ** 2 + (dv / 0.8) ** 2 <= 1,  # boat: a flat ellipse
            2: (np.abs(dv) <= 0.35) | ((np.abs(du) <= 0.3) & (np.abs(dv) <= 1.2)),  # plane: +
            3: np.maximum(np.abs(du), np.abs(dv) * 1.25) <= 1,  # car: a box
        }
        looks = {1: [235, 140, 30], 2: [200, 40, 200], 3: [210, 30, 40]}
        shade = 0.85 + 0.15 * np.clip(1 - du**2 - dv**2, 0, 1)[..., None]
        for c in (1, 2, 3):
            hit = shapes[c] & (np.abs(du) <= 1.6) & (np.abs(dv) <= 1.6) & strip
            hit &= (cls == c)[:, None, None]
            img = np.where(hit[..., None], np.float32(looks[c]) * shade, img)
            mask = np.where(hit, c, mask).astype(np.uint8)
    context = np.where(mask > 0, 0, context).astype(np.uint8)
    return _to_uint8(img), mask, context


def _contexts(rng: np.random.Generator, n: int, size: int) -> Batch:
    images, masks, _ = _contexts_with_map(rng, n, size)
    return images, masks


GENERATORS: dict[str, GeneratorSpec] = {
    "hetero_bg": GeneratorSpec(
        _hetero_bg,
        ("background", "foreground"),
        3,
        "shaded red blobs on a Voronoi patchwork of dark, noisy, striped and red-checker cells",
    ),
    "multiclass": GeneratorSpec(
        _multiclass,
        ("background", "disc", "square", "triangle"),
        3,
        "shaded discs, striped squares and dotted triangles on a heterogeneous patchwork",
    ),
    "ambiguous": GeneratorSpec(
        _ambiguous,
        ("background", "red_ish", "green_ish", "blue_ish"),
        3,
        "same-shaped objects told apart only by class colour statistics under heavy noise",
    ),
    "varying_contrast": GeneratorSpec(
        _varying_contrast,
        ("background", "foreground"),
        1,
        "grayscale blobs whose contrast fades with a smooth illumination field",
    ),
    "head": GeneratorSpec(
        _head,
        ("background", "brain"),
        1,
        "T1-like head slices: brain inside CSF, skull, a bright scalp and brain-like extra-"
        "cranial tissue",
    ),
    "cooccur": GeneratorSpec(
        _cooccur,
        ("background", "boat"),
        3,
        "orange boats that always sit on rippled water: background co-occurring with the class",
    ),
    "contexts": GeneratorSpec(
        _contexts,
        CONTEXT_CLASSES,
        3,
        "boats on water, planes on sky, cars on road (each class always on its own background "
        "texture), beside a patchwork of other backgrounds: for weak supervision (fbr)",
    ),
}


def context_maps(name: str, n: int, size: int, seed: int) -> dict[str, np.ndarray]:
    """id -> the background-context map of generator `name`'s images (0: other background,
    c: the texture that class c always sits on), the same images `make_dataset` writes."""
    if name != "contexts":
        raise RaysegbgError(f"generator {name!r} has no context maps: use 'contexts'")
    rng, out = np.random.default_rng([seed, 0]), {}
    for start in range(0, n, _CHUNK):
        _, _, maps = _contexts_with_map(rng, min(_CHUNK, n - start), size)
        out.update({f"{name}_{start + k:05d}": m for k, m in enumerate(maps)})
    return out


def _samples(name: str, spec: GeneratorSpec, n: int, size: int, seed: int, splits: list[str]):
    rng = np.random.default_rng([seed, 0])
    for start in range(0, n, _CHUNK):
        images, masks = spec(rng, min(_CHUNK, n - start), size)
        for k in range(len(images)):
            i = start + k
            yield Sample(f"{name}_{i:05d}", splits[i], images[k], masks[k])


def make_dataset(
    name: str,
    out_dir: Path,
    *,
    n: int = 1000,
    size: int = 64,
    seed: int = 0,
    labeled_fraction: float = 1.0,
    val: float = 0.1,
    test: float = 0.1,
    overwrite: bool = False,
) -> DatasetMeta:
    """Generate the built-in dataset `name` and write it to `out_dir`."""
    if name not in GENERATORS:
        raise RaysegbgError(f"unknown generator {name!r}: choose one of {', '.join(GENERATORS)}")
    if n < 1 or size < 16:
        raise RaysegbgError(f"n={n}, size={size} are too small: use n >= 1 and size >= 16")
    spec = GENERATORS[name]
    splits = assign_splits(n, val, test, seed)
    params = {"n": n, "size": size, "val": val, "test": test}
    provenance = {"generator": name, "params": params, "seed": seed, "summary": spec.summary}
    return write_dataset(
        out_dir,
        _samples(name, spec, n, size, seed, splits),
        name=name,
        classes=list(spec.classes),
        channels=spec.channels,
        provenance=provenance,
        labeled_fraction=labeled_fraction,
        seed=seed,
        overwrite=overwrite,
    )
