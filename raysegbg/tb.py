"""TensorBoard output of a run, written from world rank 0 only, with stable tag names.

A run in an object store (`logging.storage_path` a URI) gets its event files written to a
local folder and copied up to `<run>/tb` by `sync` (after every epoch, see `sync_all`) and at
`close`; copy that folder to view it (TensorBoard does not read pyarrow URI options).
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

from raysegbg import storage
from raysegbg.storage import Location

# Class colours for mask images: background black, then well-separated hues.
PALETTE = np.array(
    [
        [0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
        [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60],
        [250, 190, 212], [0, 128, 128], [220, 190, 255], [170, 110, 40], [255, 250, 200],
        [128, 0, 0], [170, 255, 195], [128, 128, 0], [255, 215, 180], [0, 0, 128],
    ],
    dtype=np.uint8,
)  # fmt: skip
IGNORE_COLOUR = np.array([128, 128, 128], dtype=np.uint8)


def colorize(mask: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """H×W class ids -> H×W×3 uint8; ids beyond the palette cycle through it."""
    rgb = PALETTE[np.asarray(mask) % len(PALETTE)]
    rgb[np.asarray(mask) == ignore_index] = IGNORE_COLOUR
    return rgb


def image_to_uint8(image: torch.Tensor) -> np.ndarray:
    """C×H×W in [-1, 1] -> H×W×3 uint8 (grey images repeated over RGB)."""
    arr = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
    arr = np.repeat(arr, 3, axis=0) if arr.shape[0] == 1 else arr[:3]
    return arr.transpose(1, 2, 0)


def triptych_grid(images, masks, preds, ignore_index: int) -> np.ndarray:
    """Rows of input | ground truth | prediction, as one H×W×3 uint8 image."""
    rows = []
    for img, m, p in zip(images, masks, preds, strict=True):
        sep = np.full((img.shape[1], 2, 3), 255, dtype=np.uint8)
        parts = [image_to_uint8(img), sep, colorize(m.cpu().numpy(), ignore_index), sep]
        rows.append(np.concatenate([*parts, colorize(p.cpu().numpy(), ignore_index)], axis=1))
        rows.append(np.full((2, rows[-1].shape[1], 3), 255, dtype=np.uint8))
    return np.concatenate(rows[:-1], axis=0)


_UPLOADING: weakref.WeakSet[RunWriter] = weakref.WeakSet()  # open writers with a URI logdir


def sync_all() -> None:
    """Upload what every open URI-backed writer of this process wrote so far (the Ray glue
    calls it at each epoch's report, so the store has an epoch's curves with its checkpoint)."""
    for writer in list(_UPLOADING):
        writer.sync()


class RunWriter:
    """The run's TensorBoard writer; a no-op on ranks other than 0 (`logdir` None)."""

    def __init__(self, logdir: Location | None, purge_step: int | None = None):
        self.remote = str(logdir) if logdir is not None and storage.is_uri(logdir) else None
        local = tempfile.mkdtemp(prefix="raysegbg-tb-") if self.remote else logdir
        self.writer = SummaryWriter(str(local), purge_step=purge_step) if logdir else None
        self._uploaded: dict[str, tuple[int, int]] = {}
        if self.remote:
            _UPLOADING.add(self)

    def sync(self) -> None:
        """Copy new or grown event files up to the URI logdir (no-op for a local one)."""
        if self.remote and self.writer is not None:
            self.writer.flush()
            storage.upload_changed(Path(self.writer.log_dir), self.remote, self._uploaded)

    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        if self.writer is None:
            return
        for key, value in values.items():
            if value == value:  # NaN (e.g. a class absent from the split) is left out
                self.writer.add_scalar(f"{prefix}{key}", value, step)

    def image(self, tag: str, hwc: np.ndarray, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, hwc, step, dataformats="HWC")

    def histogram(self, tag: str, values: np.ndarray, step: int) -> None:
        if self.writer is not None and len(values):
            self.writer.add_histogram(tag, values, step)

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        """One hparams record for the run (the HParams dashboard compares runs/trials)."""
        if self.writer is None:
            return
        clean = {
            k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()
        }
        self.writer.add_hparams(clean, metrics, run_name=".")

    def close(self) -> None:
        if self.writer is None:
            return
        self.writer.flush()
        self.writer.close()
        if self.remote:
            self.sync()
            _UPLOADING.discard(self)
            shutil.rmtree(self.writer.log_dir, ignore_errors=True)


def flat_hparams(cfg_dict: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {'optim.lr': 0.002, ...} for the hparams plugin."""
    out: dict[str, Any] = {}
    for key, value in cfg_dict.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_hparams(value, f"{name}."))
        else:
            out[name] = value
    return out
