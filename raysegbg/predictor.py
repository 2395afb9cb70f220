"""How `predict` applies a loaded method to one image, and the files it writes for it.

Per input image `<stem>.<ext>`, under the output folder:

- `<stem>.png`: the class-id mask (uint8, H×W), always;
- `probs/<stem>.npy` (`--probs`): the class probabilities, float16 (C, H, W), channel c for
  class c of the run (the order `classes` lists in `raysegbg export`'s sidecar);
- `overlay/<stem>.png` (`--overlay`): the image with every non-background pixel tinted by its
  class colour (the palette of the TensorBoard images), RGB uint8 (H, W, 3).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from raysegbg.methods.base import Method
from raysegbg.sliding import Windows, sliding_window
from raysegbg.tb import PALETTE

MASKS, PROBS, OVERLAY = "", "probs", "overlay"  # the subfolder of each kind of output
SUFFIX = {MASKS: ".png", PROBS: ".npy", OVERLAY: ".png"}
OVERLAY_ALPHA = 0.5  # weight of the class colour over the image


def output_kinds(probs: bool = False, overlay: bool = False) -> list[str]:
    return [MASKS] + [PROBS] * probs + [OVERLAY] * overlay


def output_path(folder: Path, kind: str, stem: str) -> Path:
    return folder / kind / f"{stem}{SUFFIX[kind]}"


class Predictor:
    """A loaded method as `eval` and `predict` apply it: the checkpoint's normalisation,
    padding right and below to the encoder's stride, softmax. An image with a side above
    `windows.max_whole` is predicted in overlapping windows (`raysegbg.sliding`); with `tta`,
    the result is averaged with that of the mirrored image, mirrored back."""

    def __init__(
        self,
        method: Method,
        record: dict[str, Any],
        tta: bool = False,
        windows: Windows | None = None,
    ):
        self.method, self.tta, self.windows = method, tta, windows
        norm = record["normalize"]
        self.std = torch.tensor(norm["std"], dtype=torch.float32).view(-1, 1, 1)
        self.shift = torch.tensor(norm["mean"], dtype=torch.float32).view(-1, 1, 1) / self.std
        self.multiple = int(record["pad_multiple"])

    @torch.no_grad()
    def probabilities(self, arr: np.ndarray) -> np.ndarray:
        """(C, H, W) float32 class probabilities of an H×W (grey) or H×W×C uint8 image."""
        img = arr[:, :, None] if arr.ndim == 2 else arr
        x = torch.from_numpy(np.array(img, dtype=np.float32)).permute(2, 0, 1)
        x = (x / self.std - self.shift)[None]  # = the loader's value / 127.5 - 1, bit for bit
        return self.batch(x)[0].numpy()

    @torch.no_grad()
    def batch(self, images: torch.Tensor) -> torch.Tensor:
        """(N, K, H, W) class probabilities of normalised images (N, C, H, W)."""
        probs = self._windowed(images)
        if self.tta:  # around the whole sliding call: windows of the mirror image mirror too
            probs = (probs + self._windowed(images.flip(-1)).flip(-1)) / 2
        return probs

    def uses_windows(self, height: int, width: int) -> bool:
        return self.windows is not None and self.windows.needed(height, width)

    def _windowed(self, images: torch.Tensor) -> torch.Tensor:
        if self.uses_windows(*images.shape[-2:]):
            return sliding_window(self._softmax, images, self.windows)
        return self._softmax(images)

    def _softmax(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        x = F.pad(images, (0, -w % self.multiple, 0, -h % self.multiple))
        return self.method.predict(x)[:, :, :h, :w].float().softmax(1)


def overlay(arr: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """H×W×3 uint8: the image (grey repeated over RGB), tinted where the mask is not 0."""
    rgb = np.repeat(arr[:, :, None], 3, axis=2) if arr.ndim == 2 else arr[:, :, :3]
    colours = PALETTE[mask % len(PALETTE)].astype(np.float32)
    tinted = rgb * (1 - OVERLAY_ALPHA) + colours * OVERLAY_ALPHA
    return np.where((mask != 0)[:, :, None], tinted.round(), rgb).astype(np.uint8)


def write_outputs(folder: Path, stem: str, arr: np.ndarray, probs: np.ndarray,
                  kinds: list[str]) -> None:  # fmt: skip
    """The outputs of one image (see the module docstring) under `folder`."""
    mask = probs.argmax(0).astype(np.uint8)
    for kind in kinds:
        path = output_path(folder, kind, stem)
        path.parent.mkdir(exist_ok=True)
        if kind == PROBS:
            np.save(path, probs.astype(np.float16))
        else:
            Image.fromarray(overlay(arr, mask) if kind == OVERLAY else mask).save(path)
