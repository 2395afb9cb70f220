"""`prn`: PatchRefineNet (Nagendra, Kifer, Shen, WACV 2024).

A base model's logits are spatially biased: too high in some patches, too low in others. Three
stages, run in order by the one entry point and each checkpointed:

1. `base`: train the base model on part of the training split (or load one).
2. `pseudo-labels`: on the held-out part, find for every p×p patch the threshold that
   maximises the patch's IoU with the ground truth; binarizing each patch at its own threshold
   is the pseudo-label (`labels`). Labels and per-pixel threshold maps go to the run's store.
3. `refine`: a small refiner (`refiner`) reads the base probability map (optionally the image)
   into a global head and one local head per patch size; a local head learns its patch size's
   pseudo-labels, the global head those of every size, as in the reference code
   (`pseudo_weight`), and every head the ground truth (`gt_weight`). With `threshold_heads`,
   each patch size also gets a head that predicts the patch's threshold itself, trained on the
   expected patch IoU. Inference averages the heads (`inference=mean`), or uses the head, or
   the mean, that is best on the validation split (`inference=best`, re-chosen every epoch).

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
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from raysegbg import dist
from raysegbg.config import Config
from raysegbg.data.loader import in_holdout, not_in_holdout
from raysegbg.errors import RaysegbgError
from raysegbg.methods.base import (
    Batch,
    Method,
    SharedStage,
    Stage,
    StageRun,
    StepInfo,
    training_settings,
)
from raysegbg.methods.losses import cross_entropy, soft_dice
from raysegbg.methods.patch_thresholds import WHOLE_IMAGE, foreground_iou, patch_map, threshold_grid
from raysegbg.methods.prn.bases import load_base, tb_rows
from raysegbg.methods.prn.labels import (
    SHOWN,
    head_name,
    make_labels,
    read_labels,
    searched_targets,
    stored_targets,
)  # fmt: skip
from raysegbg.methods.prn.params import PrnParams
from raysegbg.methods.prn.refiner import (
    Refiner,
    bias_offsets,
    combine,
    foreground_logit,
    threshold_loss,
    two_class,
)  # fmt: skip
from raysegbg.models import build_model


@dataclass(frozen=True)
class PrnStage(Stage):
    """A prn stage: which part of the method it runs, and with which base."""

    part: str = "base"  # base (train or load a base) | labels (pseudo-labels) | refine
    fold: int | None = None  # cross_fit: the fold base (0, 1); None: the base refined at the end


class Prn(Method):
    Params = PrnParams
    needs_shared_state = True  # the pseudo-label store
    control = {"pseudo_weight": 0.0, "gt_weight": 1.0}  # refiner from the ground truth only

    def __init__(self, cfg: Config, num_classes: int, in_channels: int, ignore_index: int):
        super().__init__(cfg, num_classes, in_channels, ignore_index)
        self.check_data(cfg, num_classes)
        p = self.params
        self.split = {"fraction": p.holdout, "group": p.holdout_group}  # the held-out share
        self.base = build_model(cfg.model, in_channels, 2)
        # cross_fit: fold base k trains without fold k and labels it (fold 0 = the held-out share)
        folds = range(2 if p.cross_fit else 0)
        self.fold_bases = nn.ModuleList(build_model(cfg.model, in_channels, 2) for _ in folds)
        self.refiner = Refiner(cfg, 1 + (in_channels if p.use_image else 0))
        self.heads = [WHOLE_IMAGE, *p.patch_sizes]  # pixel heads
        self.label_sizes = list(p.patch_sizes)  # pseudo-label sets in the store
        self.all_heads = [*self.heads, *(-s for s in p.patch_sizes if p.threshold_heads)]
        # parameters the forward pass reaches (build_model froze the others for DDP)
        self.trainable = {n for n, q in self.named_parameters() if q.requires_grad}
        self.stage: PrnStage = self.stages()[0]
        self.inference_head: int | None = None  # None: the mean of every head
        self.run: StageRun | None = None  # the refine stage's: its store serves the labels
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
    def stages(self) -> list[PrnStage]:
        p = self.params
        held = partial(in_holdout, **self.split) if p.holdout > 0 else None
        rest = partial(not_in_holdout, **self.split) if p.holdout > 0 else None
        refine = PrnStage("refine", self.cfg.train.epochs, held, p.refine_augment, "refine")
        if not p.cross_fit:
            base_epochs = 0 if p.base_checkpoint else p.base_epochs  # 0: load base_checkpoint
            return [
                PrnStage("base", base_epochs, rest, part="base"),
                PrnStage("pseudo-labels", 0, held, augment=False, part="labels"),
                refine,
            ]
        stages = []
        for k, (labeled, trained) in enumerate([(held, rest), (rest, held)]):
            stages.append(PrnStage(f"fold {k + 1} base", p.base_epochs, trained, fold=k))
            stages.append(PrnStage(f"fold {k + 1} pseudo-labels", 0, labeled, False, "labels", k))
        final = PrnStage("base", p.base_epochs, part="base")
        return [*stages, final, dataclasses.replace(refine, keep=None)]

    BASE_VERSION = "1"  # raise when what the base stage trains changes

    def shared_stage(self, stage: Stage) -> SharedStage | None:
        """A trained base (the refined one, or a cross-fit fold's): trials of a search over the
        refiner's settings, and later runs, reuse it. Its key holds every setting it trains by."""
        if stage.part != "base" or not stage.epochs:
            return None
        p = self.params
        settings = training_settings(self.cfg)
        settings.update({
            "method.prn.base_epochs": p.base_epochs, "method.prn.holdout": p.holdout,
            "method.prn.holdout_group": p.holdout_group, "method.prn.dice_weight": p.dice_weight,
            "method.prn.cross_fit": p.cross_fit,
        })  # fmt: skip
        if stage.fold is None:
            return SharedStage("prn-base", settings, ("base.",), self.BASE_VERSION)
        k = stage.fold
        return SharedStage(f"prn-fold{k + 1}-base", {**settings, "fold": k},
                           (f"fold_bases.{k}.",), self.BASE_VERSION)  # fmt: skip

    def use_stage(self, name: str) -> None:
        """Predict, label and train as stage `name` does (checkpoints, tests)."""
        self.stage = next(s for s in self.stages() if s.name == name)

    def _bases(self) -> dict[str, nn.Module]:
        """Parameter prefix -> base model: the one refined at inference and any fold bases."""
        folds = {f"fold_bases.{k}.": base for k, base in enumerate(self.fold_bases)}
        return {"base.": self.base, **folds}

    def _stage_base(self) -> tuple[str, nn.Module]:
        """The base the current stage trains, labels with or predicts with."""
        k = self.stage.fold
        return ("base.", self.base) if k is None else (f"fold_bases.{k}.", self.fold_bases[k])

    def enter_stage(self, stage: PrnStage, run: StageRun) -> None:
        self.stage = stage
        prefix = None
        if stage.part == "refine":
            prefix = "refiner."
        elif stage.part == "base" and stage.epochs:
            prefix = self._stage_base()[0]
        for name, param in self.named_parameters():
            on = prefix is not None and name.startswith(prefix) and name in self.trainable
            param.requires_grad_(on)
        self.run = run if stage.part == "refine" else None

    def run_stage(self, stage: PrnStage, run: StageRun) -> dict[str, float]:
        if stage.part == "base":  # a one-shot base stage loads `base_checkpoint`
            return self._load_base(self.params.base_checkpoint)
        self.eval()
        return make_labels(self.base_probability, run, self.label_sizes, self.params.thresholds,
                           self.cfg.train.val_batch_size)  # fmt: skip

    def train(self, mode: bool = True) -> Prn:
        super().train(mode)
        training = self._stage_base()[0] if self.stage.part == "base" else None
        for prefix, base in self._bases().items():
            if prefix != training:
                base.eval()  # frozen once trained: its BatchNorm statistics stay fixed
        return self

    def get_extra_state(self) -> dict:
        # a checkpoint predicts the way its stage (and its chosen head) did
        return {"stage": self.stage.name, "inference_head": self.inference_head}

    def set_extra_state(self, state: dict) -> None:
        self.use_stage(state["stage"])
        self.inference_head = state.get("inference_head")

    # -- the base -------------------------------------------------------------------------
    def _load_base(self, path: str) -> dict[str, float]:
        load_base(self.base, path, self.cfg.logging.score)
        return {}

    def base_probability(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) foreground probability of the stage's frozen base model."""
        return self.base_logit(images).sigmoid()

    def base_logit(self, images: torch.Tensor, ids: list[str] | None = None) -> torch.Tensor:
        """(B, 1, H, W) foreground logit (softmax = its sigmoid) of the stage's frozen base: the
        fold base in a fold's stages, else the base refined at inference. With cross_fit and the
        `ids` of refiner training images: each image's logit from the fold base that labeled it
        (and never trained on it)."""
        with torch.no_grad():
            if ids is None or not len(self.fold_bases):
                return foreground_logit(self._stage_base()[1](images))
            held = [in_holdout(i, **self.split) for i in ids]
            held = torch.tensor(held, device=images.device)
            out = torch.empty_like(images[:, :1], dtype=torch.float32)
            for fold, base in zip((held, ~held), self.fold_bases, strict=True):
                if fold.any():
                    out[fold] = foreground_logit(base(images[fold]))
            return out

    # -- training steps (stages 1 and 3) ----------------------------------------------------
    def forward(self, batch: Batch, info: StepInfo) -> dict[str, torch.Tensor]:
        if self.stage.part == "base":
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
        """See `refiner.threshold_loss`."""
        return threshold_loss(prob, masks, patch, scores, self.params.thresholds,
                              self.ignore_index)  # fmt: skip

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
        """The `bias_augment` offsets of a refiner training batch (`refiner.bias_offsets`)."""
        p = self.params
        images = batch.images
        return bias_offsets(batch.ids, info.step, self.cfg.train.seed, p.bias_augment,
                            max(p.patch_sizes), images.shape[-2:], images.device)  # fmt: skip

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
        first images, for TensorBoard). From the store; with `refine_augment`, searched on the
        augmented batch itself (the stored labels are of the unaugmented images), from the same
        base probability the refiner reads. A `bias_augment` offset needs no new search: it is
        constant on each patch, and shifting a patch's logits by a constant only moves its
        optimal threshold, so the stored label stays its best binarization."""
        if self.params.refine_augment:
            return searched_targets(batch, prob, self.label_sizes, self.params.thresholds,
                                    self.ignore_index)  # fmt: skip
        labels = read_labels(self.run, batch.ids, self.label_sizes)
        return stored_targets(batch, prob, labels, self.label_sizes, self.ignore_index)

    # -- inference ------------------------------------------------------------------------
    combine = staticmethod(combine)

    def refined_probability(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W): the chosen head's probability (by default the mean of the heads)."""
        logits, _ = self.refiner_logits(images)
        return self.combine(logits, self.inference_head)

    @torch.no_grad()
    def after_epoch(self, val_batches) -> dict[str, float]:
        """After each refine epoch: validation IoU of every head and of their mean, summed over
        ranks; with `inference=best` the best one predicts from now on (ties: the mean)."""
        if self.stage.part != "refine":
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
        if self.stage.part != "refine":
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
        return {"prn/base_thresholds_pseudo_refined": tb_rows(self.shown, self.ignore_index)}
