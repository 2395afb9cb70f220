"""`prn`: PatchRefineNet (Nagendra, Kifer, Shen, WACV 2024).

A base model's logits are spatially biased: too high in some patches, too low in others. Three
stages, run in order by the one entry point and each checkpointed:

1. `base`: train the base model on part of the training split (or load one).
2. `pseudo-labels`: on the held-out part, find for every p×p patch the threshold that
   maximises the patch's IoU with the ground truth; binarizing each patch at its own threshold
   is the pseudo-label. Labels and per-pixel threshold maps go to the run's pseudo-label store.
3. `refine`: a small refiner reads the base probability map (optionally the image) through an
   smp encoder/decoder into a global head and one local head per patch size (a decoder shared
   by every patch, blind across patch borders); a local head learns its patch size's
   pseudo-labels, the global head those of every patch size, as in the reference code
   (`pseudo_weight`), and every head the ground truth (`gt_weight`). With `threshold_heads`,
   each patch size also gets a head that predicts the patch's threshold itself, trained on the
   expected patch IoU. Inference averages the heads
   (`inference=mean`), or uses the head, or the mean, that is best on the validation split
   (`inference=best`, re-chosen after every refine epoch).

With `cross_fit`, stages 1-2 run twice, once per fold (the held-out share and the rest): each
fold base trains on the other fold and labels its own, so every training image gets a
pseudo-label and a refiner input from a base that never saw it; then the base that is refined at
inference trains on the whole training split, and the refiner on all of it.

While the refiner trains, `bias_augment` adds a seeded random offset to each image's base logit,
one per largest patch plus one per image: made-up regional bias, which the refiner learns to
undo on top of the base's own (small, on images like its training set) biases. The stored
labels stay exact targets, since a constant shift only moves a patch's optimal threshold.
`refine_augment` trains the refiner on augmented crops, with labels searched per batch.
"""

from __future__ import annotations

import dataclasses
import zlib
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raysegbg import dist, storage
from raysegbg.checkpoint import load_state, pick_checkpoint
from raysegbg.config import Config
from raysegbg.data.loader import eval_batches, in_holdout, not_in_holdout
from raysegbg.errors import RaysegbgError
from raysegbg.methods.base import Batch, Method, Stage, StageRun, StepInfo
from raysegbg.methods.losses import cross_entropy, soft_dice
from raysegbg.methods.patch_thresholds import (
    WHOLE_IMAGE,
    foreground_iou,
    iou_of_counts,
    patch_counts,
    patch_map,
    patch_pseudo_labels,
    threshold_grid,
)
from raysegbg.models import build_model
from raysegbg.tb import colorize, image_to_uint8

LABEL_CHUNK = 256  # images per call to the store
SHOWN = 4  # training images per TensorBoard row set


def head_name(head: int) -> str:
    """image: the global head; p8: the pixel head of 8×8 patches; t8: their threshold head."""
    return "image" if head == WHOLE_IMAGE else f"p{head}" if head > 0 else f"t{-head}"


def label_key(image_id: str, head: int) -> str:
    return f"{image_id}@{head_name(head)}"


def _need_store(run: StageRun) -> None:
    if run.state is None:
        raise RaysegbgError("prn needs the run's shared state for its pseudo-label store")


def two_class(logit: torch.Tensor) -> torch.Tensor:
    """One foreground logit -> (background 0, foreground) logits: softmax = sigmoid."""
    return torch.cat([torch.zeros_like(logit), logit], dim=1)


def _head_body(cin: int, width: int, cout: int) -> nn.Sequential:
    """Two 3×3 conv-BN-ReLU blocks and a 1×1 output conv that starts at zero."""
    body = nn.Sequential(
        nn.Conv2d(cin, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.Conv2d(width, cout, 1),
    )  # fmt: skip
    _zero(body[-1])
    return body


class LocalHead(nn.Module):
    """A decoder shared by every patch: it sees one p×p tile of the features plus the tile's
    mean (so it can shift a whole patch), and nothing across the tile's border."""

    def __init__(self, channels: int, patch: int, width: int = 16):
        super().__init__()
        self.patch = patch
        self.body = _head_body(2 * channels, width, 1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        b, c, h, w = feats.shape
        p = self.patch
        gh, gw = -(-h // p), -(-w // p)
        x = F.pad(feats, (0, gw * p - w, 0, gh * p - h))
        tiles = x.view(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(-1, c, p, p)
        mean = tiles.mean((2, 3), keepdim=True).expand_as(tiles)
        out = self.body(torch.cat([tiles, mean], dim=1))
        out = out.view(b, gh, gw, 1, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, 1, gh * p, gw * p)
        return out[:, :, :h, :w]


class ThresholdHead(nn.Module):
    """Scores every threshold of the grid for every p×p patch: the patch-wise binarization the
    pseudo-labels come from, predicted instead of searched. Each tile's features are pooled
    (mean, max), then convolved over the patch grid so a patch sees its neighbours. Starts
    peaked at 0.5 (the base model's own threshold)."""

    def __init__(self, channels: int, patch: int, grid: torch.Tensor, width: int = 32):
        super().__init__()
        self.patch = patch
        self.body = _head_body(2 * channels, width, grid.numel())
        with torch.no_grad():
            self.body[-1].bias.copy_(-10 * (grid - 0.5).abs())

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, T, gh, gw) threshold scores."""
        p = self.patch
        pooled = [F.avg_pool2d(feats, p, ceil_mode=True), F.max_pool2d(feats, p, ceil_mode=True)]
        return self.body(torch.cat(pooled, dim=1))


def _foreground_logit(logits: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W) two-class logits -> (B, 1, H, W) foreground logit."""
    logits = logits.float()
    return logits[:, 1:] - logits[:, :1]


def _zero(conv: nn.Conv2d) -> None:
    """A residual head starts as "no correction": the refiner begins at the base model."""
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)


class Refiner(nn.Module):
    """smp encoder/decoder over the base probability map; global head + one local head per
    patch size (and, with `threshold_heads`, a `ThresholdHead` per patch size). Returns
    ({head: foreground logit (B, 1, H, W)} (head 0 = global), {patch: threshold scores});
    with `residual`, each head's output is a correction added to the base's foreground
    logit."""

    def __init__(self, cfg: Config, in_channels: int):
        super().__init__()
        p = cfg.method.prn
        trunk_cfg = dataclasses.replace(
            cfg.model, arch="Unet", encoder=p.refiner_encoder, encoder_depth=p.refiner_depth,
            decoder_channels=(64, 32, 16, 16, 16)[: p.refiner_depth], encoder_weights=None,
            weights_path="",
        )  # fmt: skip
        self.trunk = build_model(trunk_cfg, in_channels, 1)  # its head is the global head
        width = trunk_cfg.decoder_channels[-1]
        self.local = nn.ModuleDict({str(s): LocalHead(width, s) for s in p.patch_sizes})
        grid = threshold_grid(p.thresholds).float()
        sizes = p.patch_sizes if p.threshold_heads else ()
        self.thresholds = nn.ModuleDict({str(s): ThresholdHead(width, s, grid) for s in sizes})
        self.residual = p.residual
        if self.residual:
            _zero(next(m for m in self.trunk.segmentation_head if isinstance(m, nn.Conv2d)))

    def forward(self, x: torch.Tensor, base_logit: torch.Tensor):
        feats = self.trunk.decoder(self.trunk.encoder(x))
        out = {WHOLE_IMAGE: self.trunk.segmentation_head(feats)}
        out.update({int(s): head(feats) for s, head in self.local.items()})
        if self.residual:  # binarizing a patch at t = shifting its logit by -logit(t)
            out = {head: base_logit + v for head, v in out.items()}
        return out, {int(s): head(feats) for s, head in self.thresholds.items()}


class Prn(Method):
    needs_shared_state = True  # the pseudo-label store

    def __init__(self, cfg: Config, num_classes: int, in_channels: int, ignore_index: int):
        super().__init__(cfg, num_classes, in_channels, ignore_index)
        self.check_data(cfg, num_classes)
        self.params = p = cfg.method.prn
        self.split = {"fraction": p.holdout, "group": p.holdout_group}  # the held-out share
        self.base = build_model(cfg.model, in_channels, 2)
        # cross_fit: fold base k trains without fold k and labels it (fold 1 = the held-out share)
        folds = range(2 if p.cross_fit else 0)
        self.fold_bases = nn.ModuleList(build_model(cfg.model, in_channels, 2) for _ in folds)
        self.refiner = Refiner(cfg, 1 + (in_channels if p.use_image else 0))
        self.heads = [WHOLE_IMAGE, *p.patch_sizes]  # pixel heads
        self.label_sizes = list(p.patch_sizes)  # pseudo-label sets in the store
        self.all_heads = [*self.heads, *(-s for s in p.patch_sizes if p.threshold_heads)]
        # parameters the forward pass reaches (build_model froze the others for DDP)
        self.trainable = {n for n, q in self.named_parameters() if q.requires_grad}
        self.stage_name = "base"
        self.inference_head: int | None = None  # None: the mean of every head
        self.labels: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # key -> (label, thresholds)
        self.shown: dict[str, torch.Tensor] = {}

    @classmethod
    def check_data(cls, cfg: Config, num_classes: int) -> None:
        if num_classes != 2:
            raise RaysegbgError(
                f"prn refines binary segmentation but the dataset has {num_classes} classes: "
                "use a binary dataset (e.g. `raysegbg data make varying_contrast`) or another "
                "method"
            )

    # -- stages ---------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        p = self.params
        held = partial(in_holdout, **self.split) if p.holdout > 0 else None
        rest = partial(not_in_holdout, **self.split) if p.holdout > 0 else None
        refine = Stage("refine", self.cfg.train.epochs, keep=held, augment=p.refine_augment)
        if not p.cross_fit:
            return [
                Stage("base", 0 if p.base_checkpoint else p.base_epochs, keep=rest),
                Stage("pseudo-labels", 0, keep=held, augment=False),
                refine,
            ]
        stages = []
        for k, (labeled, trained) in enumerate([(held, rest), (rest, held)], 1):
            stages.append(Stage(f"fold {k} base", p.base_epochs, keep=trained))
            stages.append(Stage(f"fold {k} pseudo-labels", 0, keep=labeled, augment=False))
        return [*stages, Stage("base", p.base_epochs), dataclasses.replace(refine, keep=None)]

    def _bases(self) -> dict[str, nn.Module]:
        """Parameter prefix -> base model: the one refined at inference and any fold bases."""
        folds = {f"fold_bases.{k}.": base for k, base in enumerate(self.fold_bases)}
        return {"base.": self.base, **folds}

    def _stage_base(self) -> tuple[str, nn.Module]:
        """The base the current stage trains, labels with or predicts with."""
        if self.stage_name.startswith("fold "):
            k = int(self.stage_name.split()[1]) - 1
            return f"fold_bases.{k}.", self.fold_bases[k]
        return "base.", self.base

    def enter_stage(self, stage: Stage, run: StageRun) -> None:
        self.stage_name = stage.name
        if stage.name == "refine":
            prefix = "refiner."
        elif stage.name.endswith("base") and stage.epochs:
            prefix = self._stage_base()[0]
        else:
            prefix = None
        for name, param in self.named_parameters():
            on = prefix is not None and name.startswith(prefix) and name in self.trainable
            param.requires_grad_(on)
        if stage.name == "refine":
            self.labels = self._read_labels(run)

    def run_stage(self, stage: Stage, run: StageRun) -> dict[str, float]:
        if stage.name == "base":  # a one-shot base stage loads `base_checkpoint`
            return self._load_base(self.params.base_checkpoint)
        return self._make_labels(run)

    def train(self, mode: bool = True) -> Prn:
        super().train(mode)
        training = self._stage_base()[0] if self.stage_name.endswith("base") else None
        for prefix, base in self._bases().items():
            if prefix != training:
                base.eval()  # frozen once trained: its BatchNorm statistics stay fixed
        return self

    def get_extra_state(self) -> dict:
        # a checkpoint predicts the way its stage (and its chosen head) did
        return {"stage": self.stage_name, "inference_head": self.inference_head}

    def set_extra_state(self, state: dict) -> None:
        self.stage_name = state["stage"]
        self.inference_head = state.get("inference_head")

    # -- stage 1 ------------------------------------------------------------------------------
    def _load_base(self, path: str) -> dict[str, float]:
        """Base weights from a run or checkpoint folder (a local path or an object-store URI)."""
        from raysegbg.inference import run_config

        folder = storage.location(path)
        if storage.is_file(storage.join(folder, "config.yaml")):  # a run folder
            # a prn run's final base is in its last checkpoint; a baseline's best is its best
            prn = run_config(folder).method.name == "prn"
            folder = pick_checkpoint(folder, "last" if prn else "best", self.cfg.logging.score)
        state = load_state(folder)["method"]
        prefixes = ("base.", "net.")  # a prn or a baseline run
        weights = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(prefixes)}
        try:
            self.base.load_state_dict(weights)
        except RuntimeError as exc:
            raise RaysegbgError(
                f"method.prn.base_checkpoint {path} does not fit the base model "
                f"({str(exc).splitlines()[0]}): use a binary baseline or prn run with the same "
                "model.* settings"
            ) from None
        return {}

    # -- stage 2 ------------------------------------------------------------------------------
    def base_probability(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) foreground probability of the frozen base model."""
        return self.base_logit(images).sigmoid()

    def base_logit(self, images: torch.Tensor, ids: list[str] | None = None) -> torch.Tensor:
        """(B, 1, H, W) foreground logit (softmax = its sigmoid) of the stage's frozen base: the
        fold base in a fold's stages, else the base refined at inference. With cross_fit and the
        `ids` of refiner training images: each image's logit from the fold base that labeled it
        (and never trained on it)."""
        with torch.no_grad():
            if ids is None or not len(self.fold_bases):
                return _foreground_logit(self._stage_base()[1](images))
            held = [in_holdout(i, **self.split) for i in ids]
            held = torch.tensor(held, device=images.device)
            out = torch.empty_like(images[:, :1], dtype=torch.float32)
            for fold, base in zip((held, ~held), self.fold_bases, strict=True):
                if fold.any():
                    out[fold] = _foreground_logit(base(images[fold]))
            return out

    @torch.no_grad()
    def _make_labels(self, run: StageRun) -> dict[str, float]:
        """Every rank labels its share of the held-out images; rank 0 stores them all."""
        self.eval()
        grid = threshold_grid(self.params.thresholds, run.device)
        # the image-level optimum is measured (its IoU is logged) but not stored
        searched = [WHOLE_IMAGE, *self.label_sizes]
        counts = torch.zeros(len(searched) + 1, 2, dtype=torch.float64)  # base@0.5, searched
        mine = []
        size = {image_id: i for i, image_id in enumerate(run.dataset.ids)}
        for batch in eval_batches(run.dataset, self.cfg.train.val_batch_size, run.rank,
                                  run.world_size):  # fmt: skip
            images, masks = batch.images.to(run.device), batch.masks.to(run.device)
            prob = self.base_probability(images)[:, 0]
            valid, fg = masks != self.ignore_index, masks == 1
            counts[0] += torch.tensor(foreground_iou(prob >= 0.5, fg, valid))
            per_size = []
            for k, patch in enumerate(searched, 1):
                labels, thresholds = patch_pseudo_labels(prob, fg, valid, patch, grid)
                counts[k] += torch.tensor(foreground_iou(labels, fg, valid))
                if patch != WHOLE_IMAGE:
                    per_size.append((labels.cpu().numpy(), thresholds.cpu().numpy()))
            for j, image_id in enumerate(batch.ids):
                h, w = run.dataset[size[image_id]][1].shape
                for patch, (labels, thresholds) in zip(self.label_sizes, per_size, strict=True):
                    mine.append((label_key(image_id, patch), labels[j, :h, :w],
                                 thresholds[j, :h, :w]))  # fmt: skip
        gathered = dist.gather_objects(mine)
        if gathered is not None:
            self._write_labels([item for part in gathered for item in part], run)
        dist.all_reduce_sum(counts)
        iou = (counts[:, 0] / counts[:, 1].clamp_min(1)).tolist()
        out = {"pseudo/base_iou@0.5": iou[0], "pseudo/images": float(len(run.dataset))}
        for patch, value in zip(searched, iou[1:], strict=True):
            out[f"pseudo/oracle_iou_{head_name(patch)}"] = value
        run.log(
            "pseudo-labels: base IoU at 0.5 "
            f"{iou[0]:.4f}; per-patch optimum "
            + ", ".join(f"{k.split('_')[-1]} {v:.4f}" for k, v in out.items() if "oracle" in k)
        )
        return out

    def _write_labels(self, items: list, run: StageRun) -> None:
        _need_store(run)
        for start in range(0, len(items), LABEL_CHUNK):
            keys, labels, thresholds = zip(*items[start : start + LABEL_CHUNK], strict=True)
            run.state.put_labels(keys, labels, thresholds, step=0)
        run.state.flush()

    def _read_labels(self, run: StageRun) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """All held-out pseudo-labels from the store, read once by rank 0, sent to all."""
        labels = None
        if run.rank == 0:
            _need_store(run)
            keys = [label_key(i, size) for i in run.dataset.ids for size in self.label_sizes]
            got = []
            for start in range(0, len(keys), LABEL_CHUNK):
                got += run.state.get_labels(keys[start : start + LABEL_CHUNK])
            labels = {k: (mask, conf) for k, (mask, conf, _) in zip(keys, got, strict=True)}
        return dist.broadcast_object(labels)

    # -- stage 1 and 3: training steps ----------------------------------------------------
    def forward(self, batch: Batch, info: StepInfo) -> dict[str, torch.Tensor]:
        if self.stage_name.endswith("base"):
            losses = self._binary_losses(self._stage_base()[1](batch.images), batch.masks)
            losses["loss"] = losses.pop("total")
            return losses
        offset = self._bias(batch, info) if self.params.bias_augment > 0 else None
        logits, scores, prob = self._refine(batch.images, batch.ids, offset)
        pseudo, thresholds = self._targets(batch, prob)
        sums = {"pseudo": 0.0, "gt": 0.0}
        for head in self.heads:
            targets = [pseudo[head]] if head in pseudo else list(pseudo.values())  # global: all
            for target in targets:
                loss = self._binary_losses(logits[head], target)["total"]
                sums["pseudo"] = sums["pseudo"] + loss / len(targets)
            sums["gt"] = sums["gt"] + self._binary_losses(logits[head], batch.masks)["total"]
        losses = {k: v / len(self.heads) for k, v in sums.items()}
        p = self.params
        losses["loss"] = p.pseudo_weight * losses["pseudo"] + p.gt_weight * losses["gt"]
        if scores:
            each = [self.threshold_loss(prob, batch.masks, s, v) for s, v in scores.items()]
            losses["thresholds"] = sum(each) / len(each)
            losses["loss"] = losses["loss"] + p.threshold_weight * losses["thresholds"]
        self._stash(batch, prob, pseudo, thresholds, logits)
        return losses

    def threshold_loss(self, prob, masks, patch: int, scores: torch.Tensor) -> torch.Tensor:
        """1 - the expected IoU of every patch when its threshold is drawn from the head's
        softmax over the grid; patches weighted by the pixels at stake in them (their largest
        union over thresholds), so empty or settled patches weigh nothing."""
        grid = threshold_grid(self.params.thresholds, prob.device)
        valid, fg = masks != self.ignore_index, masks == 1
        correct, union = patch_counts(prob[:, 0], fg, valid, patch, grid)
        iou, weight = iou_of_counts(correct, union), union.amax(-1).float()
        expected = (scores.float().softmax(1).permute(0, 2, 3, 1) * iou.float()).sum(-1)
        return 1 - (weight * expected).sum() / weight.sum().clamp_min(1)

    def _binary_losses(self, logits: torch.Tensor, target: torch.Tensor):
        if logits.shape[1] == 1:
            logits = two_class(logits)
        out = {"ce": cross_entropy(logits, target, self.ignore_index)}
        out["total"] = out["ce"]
        if self.params.dice_weight > 0:
            out["dice"] = soft_dice(logits, target, self.ignore_index)
            out["total"] = out["ce"] + self.params.dice_weight * out["dice"]
        return out

    def refiner_logits(self, images: torch.Tensor):
        """({head: foreground logit}, base probability) of the refiner on `images`."""
        logits, _, prob = self._refine(images)
        return logits, prob

    def _bias(self, batch: Batch, info: StepInfo) -> torch.Tensor:
        """(B, 1, H, W) `bias_augment` logit offsets: per image, one normal draw per largest
        patch plus one for the whole image, seeded by (run seed, step, image id) so a resumed or
        multi-worker run draws the same."""
        h, w = batch.images.shape[-2:]
        p = max(self.params.patch_sizes)
        grid = (-(-h // p), -(-w // p))
        draws = []
        for image_id in batch.ids:
            key = f"{self.cfg.train.seed}:{info.step}:{image_id}".encode()
            gen = torch.Generator().manual_seed(zlib.crc32(key))
            draws.append(torch.randn(1, 1 + grid[0] * grid[1], generator=gen))
        draws = torch.cat(draws).to(batch.images.device) * self.params.bias_augment
        field = draws[:, 1:].view(-1, 1, *grid)
        field = F.interpolate(field, size=(grid[0] * p, grid[1] * p), mode="nearest")[..., :h, :w]
        return field + draws[:, :1, None, None]

    def _refine(self, images: torch.Tensor, ids: list[str] | None = None, offset=None):
        """({head: foreground logit}, {patch: threshold scores}, base probability); `ids` of
        training images (see `base_logit`), `offset` added to the base logit (`_bias`).
        Threshold head -p's logit is the base logit shifted by -logit(t), t the best-scored
        threshold of each p×p patch: it is positive where the base probability reaches t."""
        base_logit = self.base_logit(images, ids)
        if offset is not None:
            base_logit = base_logit + offset
        prob = base_logit.sigmoid()
        x = torch.cat([prob, images], dim=1) if self.params.use_image else prob
        logits, scores = self.refiner(x, base_logit)
        grid = threshold_grid(self.params.thresholds, images.device).float()
        h, w = images.shape[-2:]
        for patch, score in scores.items():
            t = patch_map(grid[score.argmax(1)], h, w, patch)
            logits[-patch] = base_logit - torch.logit(t[:, None], eps=1e-4)
        return logits, scores, prob

    def _targets(self, batch: Batch, prob: torch.Tensor):
        """({patch size: the batch's pseudo-labels}, the smallest size's threshold map of the
        first `SHOWN` images, for TensorBoard), padded like the batch and ignored where the
        ground truth is. From the store; with `refine_augment`, searched on the augmented batch
        itself (the stored labels are of the unaugmented images), from the same base
        probability the refiner reads. A `bias_augment` offset needs no new search: it is
        constant on each patch, and shifting a patch's logits by a constant only moves its
        optimal threshold, so the stored label stays its best binarization."""
        ignored = batch.masks == self.ignore_index
        shown = min(self.label_sizes)
        if self.params.refine_augment:
            grid = threshold_grid(self.params.thresholds, prob.device)
            fg = batch.masks == 1
            searched = {
                size: patch_pseudo_labels(prob[:, 0], fg, ~ignored, size, grid)
                for size in self.label_sizes
            }
            labels = {size: label for size, (label, _) in searched.items()}
            thresholds = searched[shown][1][:SHOWN]
        else:
            labels = {}
            thresholds = torch.zeros_like(prob[:SHOWN, 0])
            for size in self.label_sizes:
                labels[size] = torch.full_like(batch.masks, self.ignore_index)
                for j, image_id in enumerate(batch.ids):
                    label, t = self.labels[label_key(image_id, size)]
                    h, w = label.shape
                    labels[size][j, :h, :w] = torch.tensor(label).to(batch.masks.device)
                    if size == shown and j < SHOWN:
                        thresholds[j, :h, :w] = torch.tensor(t).to(prob.device)
        out = {
            k: torch.where(ignored, batch.masks, v.to(batch.masks.dtype)) for k, v in labels.items()
        }
        return out, thresholds

    # -- inference ------------------------------------------------------------------------
    @staticmethod
    def combine(logits: dict[int, torch.Tensor], head: int | None) -> torch.Tensor:
        """(B, 1, H, W) probability of one head, or the mean over heads when `head` is None."""
        if head is not None:
            return logits[head].float().sigmoid()
        return torch.stack([v.float().sigmoid() for v in logits.values()]).mean(0)

    def refined_probability(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W): the chosen head's probability (by default the mean of the heads)."""
        logits, _ = self.refiner_logits(images)
        return self.combine(logits, self.inference_head)

    @torch.no_grad()
    def after_epoch(self, val_batches) -> dict[str, float]:
        """After each refine epoch: validation IoU of every head and of their mean, summed over
        ranks; with `inference=best` the best one predicts from now on (ties: the mean)."""
        if self.stage_name != "refine":
            return {}
        was_training = self.training
        self.eval()
        choices: list[int | None] = [None, *self.all_heads]
        counts = torch.zeros(len(choices), 2, dtype=torch.float64)
        for batch in val_batches():
            logits, _ = self.refiner_logits(batch.images)
            valid, fg = batch.masks != self.ignore_index, batch.masks == 1
            for k, head in enumerate(choices):
                pred = self.combine(logits, head)[:, 0] >= 0.5
                counts[k] += torch.tensor(foreground_iou(pred, fg, valid))
        dist.all_reduce_sum(counts)
        iou = (counts[:, 0] / counts[:, 1].clamp_min(1)).tolist()
        if self.params.inference == "best":
            self.inference_head = choices[max(range(len(choices)), key=lambda k: (iou[k], -k))]
        self.train(was_training)
        names = ["mean", *(head_name(h) for h in self.all_heads)]
        out = {f"refine/val_iou_{name}": value for name, value in zip(names, iou, strict=True)}
        head = self.inference_head
        out["refine/chosen_head"] = -1.0 if head is None else float(head)
        return out

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        if self.stage_name != "refine":
            return self._stage_base()[1](images)
        q = self.refined_probability(images).clamp(1e-6, 1 - 1e-6)
        return torch.cat([torch.log1p(-q), torch.log(q)], dim=1)

    # -- TensorBoard ----------------------------------------------------------------------
    def _stash(self, batch, prob, pseudo, thresholds, logits) -> None:
        n = min(SHOWN, len(batch.ids))
        head = min(self.label_sizes)
        refined = self.combine({k: v.detach() for k, v in logits.items()}, self.inference_head)
        self.shown = {
            "image": batch.images[:n].detach(), "base": prob[:n, 0].detach(),
            "thresholds": thresholds, "pseudo": pseudo[head][:n], "refined": refined[:n, 0],
            "truth": batch.masks[:n],
        }  # fmt: skip

    def tb_images(self) -> dict:
        """Rows of image | base (0.5) | per-patch threshold map | pseudo-label | refined | truth."""
        if not self.shown:
            return {}
        s = {k: v.cpu() for k, v in self.shown.items()}
        rows = []
        for j in range(len(s["image"])):
            grey = (s["thresholds"][j].numpy() * 255).round().astype(np.uint8)
            parts = [
                image_to_uint8(s["image"][j]),
                colorize((s["base"][j] >= 0.5).numpy().astype(np.uint8)),
                np.repeat(grey[:, :, None], 3, axis=2),
                colorize(s["pseudo"][j].numpy(), self.ignore_index),
                colorize((s["refined"][j] >= 0.5).numpy().astype(np.uint8)),
                colorize(s["truth"][j].numpy(), self.ignore_index),
            ]
            sep = np.full((parts[0].shape[0], 2, 3), 255, np.uint8)
            rows.append(np.concatenate([x for part in parts for x in (part, sep)][:-1], axis=1))
        return {"prn/base_thresholds_pseudo_refined": np.concatenate(rows, axis=0)}
