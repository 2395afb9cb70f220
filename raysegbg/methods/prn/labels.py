"""prn's pseudo-labels: every p×p patch of a held-out image binarized at the threshold that
maximises the patch's IoU with the ground truth, made once (stage 2) into the run's
pseudo-label store, and turned into each refiner batch's targets."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from raysegbg import dist
from raysegbg.data.batch import Batch
from raysegbg.data.loader import eval_batches
from raysegbg.errors import RaysegbgError
from raysegbg.methods.base import StageRun
from raysegbg.methods.patch_thresholds import (
    WHOLE_IMAGE,
    foreground_iou,
    patch_pseudo_labels,
    threshold_grid,
)

LABEL_CHUNK = 256  # images per call to the store
SHOWN = 4  # training images per TensorBoard row set
Labels = dict[str, tuple[np.ndarray, np.ndarray]]  # key -> (label, per-pixel thresholds)


def head_name(head: int) -> str:
    """image: the global head; p8: the pixel head of 8×8 patches; t8: their threshold head."""
    return "image" if head == WHOLE_IMAGE else f"p{head}" if head > 0 else f"t{-head}"


def label_key(image_id: str, head: int) -> str:
    return f"{image_id}@{head_name(head)}"


def _need_store(run: StageRun) -> None:
    if run.state is None:
        raise RaysegbgError("prn needs the run's shared state for its pseudo-label store")


@torch.no_grad()
def make_labels(probability: Callable[[torch.Tensor], torch.Tensor], run: StageRun,
                sizes: list[int], steps: int, batch_size: int) -> dict[str, float]:  # fmt: skip
    """Every rank labels its share of the stage's images with the base `probability` and puts
    them in the store. Returns the base's IoU at 0.5 and each patch size's optimum."""
    grid = threshold_grid(steps, run.device)
    searched = [WHOLE_IMAGE, *sizes]  # the image-level optimum is measured, not stored
    counts = torch.zeros(len(searched) + 1, 2, dtype=torch.float64)  # base@0.5, searched
    mine = []
    index = {image_id: i for i, image_id in enumerate(run.dataset.ids)}
    for batch in eval_batches(run.dataset, batch_size, run.rank, run.world_size):
        images, masks = batch.images.to(run.device), batch.masks.to(run.device)
        prob = probability(images)[:, 0]
        valid, fg = masks != run.dataset.meta.ignore_index, masks == 1
        counts[0] += torch.tensor(foreground_iou(prob >= 0.5, fg, valid))
        per_size = []
        for k, patch in enumerate(searched, 1):
            labels, thresholds = patch_pseudo_labels(prob, fg, valid, patch, grid)
            counts[k] += torch.tensor(foreground_iou(labels, fg, valid))
            if patch != WHOLE_IMAGE:
                per_size.append((labels.cpu().numpy(), thresholds.cpu().numpy()))
        for j, image_id in enumerate(batch.ids):
            h, w = run.dataset[index[image_id]][1].shape
            for patch, (labels, thresholds) in zip(sizes, per_size, strict=True):
                mine.append((label_key(image_id, patch), labels[j, :h, :w], thresholds[j, :h, :w]))
    _need_store(run)
    run.state.put_many(mine, chunk=LABEL_CHUNK)  # returns once they are in
    dist.all_reduce_sum(counts)  # (and no rank reads the labels before every rank put them)
    return _label_report(counts, searched, len(run.dataset), run.log)


def _label_report(counts: torch.Tensor, searched: list[int], images: int, log) -> dict:
    iou = (counts[:, 0] / counts[:, 1].clamp_min(1)).tolist()
    out = {"pseudo/base_iou@0.5": iou[0], "pseudo/images": float(images)}
    for patch, value in zip(searched, iou[1:], strict=True):
        out[f"pseudo/oracle_iou_{head_name(patch)}"] = value
    log(
        "pseudo-labels: base IoU at 0.5 "
        f"{iou[0]:.4f}; per-patch optimum "
        + ", ".join(f"{k.split('_')[-1]} {v:.4f}" for k, v in out.items() if "oracle" in k)
    )
    return out


def read_labels(run: StageRun, ids: list[str], sizes: list[int]) -> Labels:
    """The pseudo-labels of `ids` (a batch) from the store: each rank reads only its own."""
    _need_store(run)
    keys = [label_key(i, size) for i in ids for size in sizes]
    got = run.state.get_many(keys, chunk=LABEL_CHUNK)
    return {k: (mask, conf) for k, (mask, conf, _) in zip(keys, got, strict=True)}


def stored_targets(batch: Batch, prob: torch.Tensor, labels: Labels, sizes: list[int],
                   ignore_index: int) -> tuple[dict[int, torch.Tensor], torch.Tensor]:  # fmt: skip
    """({patch size: the batch's stored pseudo-labels}, the smallest size's threshold map of
    the first `SHOWN` images), padded like the batch (ignored where the batch is)."""
    shown = min(sizes)
    out = {}
    thresholds = torch.zeros_like(prob[:SHOWN, 0])
    for size in sizes:
        out[size] = torch.full_like(batch.masks, ignore_index)
        for j, image_id in enumerate(batch.ids):
            label, t = labels[label_key(image_id, size)]
            h, w = label.shape
            out[size][j, :h, :w] = torch.tensor(label).to(batch.masks.device)
            if size == shown and j < SHOWN:
                thresholds[j, :h, :w] = torch.tensor(t).to(prob.device)
    return _where_known(batch, out, ignore_index), thresholds


def searched_targets(
    batch: Batch, prob: torch.Tensor, sizes: list[int], steps: int, ignore_index: int
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Like `stored_targets`, searched on the (augmented) batch itself from `prob`."""
    grid = threshold_grid(steps, prob.device)
    valid, fg = batch.masks != ignore_index, batch.masks == 1
    searched = {s: patch_pseudo_labels(prob[:, 0], fg, valid, s, grid) for s in sizes}
    labels = {size: label for size, (label, _) in searched.items()}
    return _where_known(batch, labels, ignore_index), searched[min(sizes)][1][:SHOWN]


def _where_known(batch: Batch, labels: dict, ignore_index: int) -> dict[int, torch.Tensor]:
    ignored = batch.masks == ignore_index
    return {
        k: torch.where(ignored, batch.masks, v.to(batch.masks.dtype)) for k, v in labels.items()
    }
