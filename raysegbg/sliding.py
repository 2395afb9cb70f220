"""Sliding-window inference: the class probabilities of an image larger than the model was
trained on, from overlapping square windows of about the training size, blended by a
weighted average.

Pure torch. The model is any function from images (N, C, h, w) to class probabilities
(N, K, h, w) of the same size (`raysegbg.predictor.Predictor` passes its padded softmax).
Windows step by `window × (1 - overlap)` pixels and the last one on each side is flush with
the border, so every pixel is covered; an image narrower or lower than a window is padded
with 0 right and below (the value the predictor pads with) and the padding cut off again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from raysegbg.config import BLENDS

# Gaussian weights: the standard deviation as a fraction of the window. A pixel near a
# window's edge saw little context there, so the windows that hold it nearer their centre
# decide; 1/8 keeps the edge weights small (e^-8 of the centre's) but never zero.
SIGMA = 1 / 8

Probabilities = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Windows:
    """How images are split: windows of `size` pixels once a side exceeds `max_whole`."""

    size: int
    max_whole: int
    overlap: float = 0.25
    blend: str = "gaussian"
    batch_size: int = 8  # windows per call of the model

    def needed(self, height: int, width: int) -> bool:
        return max(height, width) > self.max_whole


def starts(size: int, window: int, stride: int) -> list[int]:
    """Window offsets along a side: every `stride` pixels, the last flush with the border."""
    last = max(size - window, 0)
    return [*range(0, last, stride), last]


def blend_weights(window: int, blend: str) -> torch.Tensor:
    """(window, window): the weight of each pixel of a window's prediction in the average."""
    if blend not in BLENDS:
        raise ValueError(f"blend {blend!r} is not one of: {', '.join(BLENDS)}")
    if blend == "constant":
        return torch.ones(window, window)
    offset = torch.arange(window, dtype=torch.float32) - (window - 1) / 2
    g = torch.exp(-0.5 * (offset / (SIGMA * window)) ** 2)
    return g[:, None] * g[None, :]


@torch.no_grad()
def sliding_window(model: Probabilities, images: torch.Tensor, windows: Windows) -> torch.Tensor:
    """(N, K, H, W) class probabilities of `images` (N, C, H, W): the weighted average, per
    pixel, of the probabilities of every window that holds it."""
    n, _, height, width = images.shape
    size = windows.size
    padded = F.pad(images, (0, max(size - width, 0), 0, max(size - height, 0)))
    stride = max(1, round(size * (1 - windows.overlap)))
    ys = starts(padded.shape[-2], size, stride)
    xs = starts(padded.shape[-1], size, stride)
    spots = [(i, y, x) for i in range(n) for y in ys for x in xs]
    weights = blend_weights(size, windows.blend).to(images.device)
    total = None
    for first in range(0, len(spots), windows.batch_size):
        chunk = spots[first : first + windows.batch_size]
        crops = torch.stack([padded[i, :, y : y + size, x : x + size] for i, y, x in chunk])
        probs = model(crops).float() * weights
        if total is None:  # the number of classes is known from the first answer
            total = probs.new_zeros(n, probs.shape[1], *padded.shape[-2:])
        for p, (i, y, x) in zip(probs, chunk, strict=True):
            total[i, :, y : y + size, x : x + size] += p
    coverage = _coverage(weights, ys, xs, (padded.shape[-2], padded.shape[-1]))
    return (total / coverage)[:, :, :height, :width]


def _coverage(
    weights: torch.Tensor, ys: list[int], xs: list[int], shape: tuple[int, int]
) -> torch.Tensor:
    """(H, W): the sum of the weights of the windows over each pixel (the same per image)."""
    size = weights.shape[0]
    out = weights.new_zeros(shape)
    for y in ys:
        for x in xs:
            out[y : y + size, x : x + size] += weights
    return out
