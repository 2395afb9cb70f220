"""TensorBoard output of a run, written from world rank 0 only, with stable tag names.

Every tag has one x axis. Per optimiser step (every few steps): `train/<loss term>`, `lr` and
the method's step scalars (`train/<name>`). Per epoch (1-based): the epoch's mean loss terms
as `train_epoch/<loss term>`, `val/*`, `perf/*` and the method's epoch metrics. The HParams
session (`hparams`) goes into an event file of its own (`*.hparams`), so a search can replace
it with the trial's (`write_session`, `clear_sessions`).

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
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summaries

from raysegbg import storage
from raysegbg.hparams import METRIC_PREFIX
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
HPARAMS_SUFFIX = ".hparams"  # the event file holding a run's HParams session


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
    """The run's TensorBoard writer; a no-op on ranks other than 0 (`logdir` None).

    A run resumed after step `resumed_at` (its checkpoint's last step) hides the step-level
    points an interrupted attempt wrote after that step (TensorBoard's purge step)."""

    def __init__(self, logdir: Location | None, resumed_at: int | None = None):
        self.remote = str(logdir) if logdir is not None and storage.is_uri(logdir) else None
        local = tempfile.mkdtemp(prefix="raysegbg-tb-") if self.remote else logdir
        purge = resumed_at + 1 if resumed_at else None
        self.writer = SummaryWriter(str(local), purge_step=purge) if logdir else None
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

    def epoch_scalars(self, metrics: dict[str, float], epoch: int) -> None:
        """An epoch's metrics (those with a `/` in their name) at x = the epoch."""
        self.scalars({epoch_tag(k): v for k, v in metrics.items() if "/" in k}, epoch)

    def image(self, tag: str, hwc: np.ndarray, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, hwc, step, dataformats="HWC")

    def histogram(self, tag: str, values: np.ndarray, step: int) -> None:
        if self.writer is not None and len(values):
            self.writer.add_histogram(tag, values, step)

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        """The run's HParams session (see `raysegbg.hparams` for what it holds)."""
        if self.writer is not None:
            clear_sessions(self.remote or self.writer.log_dir)  # a resumed run's earlier one
            write_session(Path(self.writer.log_dir), hparams, metrics)

    def close(self) -> None:
        if self.writer is None:
            return
        self.writer.flush()
        self.writer.close()
        if self.remote:
            self.sync()
            _UPLOADING.discard(self)
            shutil.rmtree(self.writer.log_dir, ignore_errors=True)


def epoch_tag(key: str) -> str:
    """The tag of an epoch-level metric: an epoch's mean loss terms go from `train/` (the
    per-step curves) to `train_epoch/`, so no tag mixes steps and epochs on its x axis."""
    return "train_epoch/" + key.removeprefix("train/") if key.startswith("train/") else key


def write_session(
    logdir: Path, hparams: dict[str, Any], metrics: dict[str, float], experiment: bool = True
) -> None:
    """One HParams session in `logdir` (the run whose curves it belongs to), in an event file
    of its own: the hyperparameters, and the metrics as scalars at step 0. `experiment`
    also declares the table's columns (a search declares them once for all its sessions,
    `write_experiment`: the dashboard takes the first declaration it finds)."""
    _, start, end = hparams_summaries(hparams, metrics)
    with SummaryWriter(str(logdir), filename_suffix=HPARAMS_SUFFIX) as writer:
        if experiment:
            writer.file_writer.add_summary(experiment_summary([hparams], list(metrics)))
        writer.file_writer.add_summary(start)
        writer.file_writer.add_summary(end)
        for tag, value in metrics.items():
            writer.add_scalar(tag, value, 0)


def write_experiment(logdir: Path, sessions: list[dict[str, Any]], metric_tags: list[str]) -> None:
    """The HParams table's columns for sessions written with `experiment=False`."""
    with SummaryWriter(str(logdir), filename_suffix=HPARAMS_SUFFIX) as writer:
        writer.file_writer.add_summary(experiment_summary(sessions, metric_tags))


def experiment_summary(sessions: list[dict[str, Any]], metric_tags: list[str]) -> Any:
    """The HParams table's columns: every hyperparameter of `sessions` (those whose values
    differ come first, so the dashboard shows them; text ones with their values to filter
    by) and the metrics in this order, each shown by the name it is reported under."""
    values: dict[str, list[Any]] = {}
    for hparams in sessions:
        for key, value in hparams.items():
            values.setdefault(key, []).append(value)
    texts = {k: sorted(set(v)) for k, v in values.items() if all(isinstance(x, str) for x in v)}
    columns = {k: v[0] for k, v in values.items()}  # a value for the column's type
    summary, _, _ = hparams_summaries(columns, dict.fromkeys(metric_tags, 0.0), texts)
    content = summary.value[0].metadata.plugin_data
    data = HParamsPluginData.FromString(content.content)
    for info in data.experiment.hparam_infos:
        seen = values[info.name]
        info.differs = len(seen) < len(sessions) or len(set(seen)) > 1
    for info in data.experiment.metric_infos:
        info.display_name = info.name.tag.removeprefix(METRIC_PREFIX)
    content.content = data.SerializeToString()
    return summary


def clear_sessions(logdir: Location) -> None:
    """Delete the HParams sessions written into `logdir` (a folder or a URI)."""
    for name in storage.listdir(logdir):
        if name.endswith(HPARAMS_SUFFIX):
            storage.delete_file(storage.join(logdir, name))
