"""`rrn`: semi-supervised segmentation with region relevance (Chen, Chen, Wang, Yao, ICME 2023).

Few images have masks; pseudo-labels on the others are noisy and their errors accumulate. Two
networks with different initialisations teach each other (cross pseudo supervision): each
network's argmax on an unlabeled image is the other's target, on CutMix-ed pairs of unlabeled
images. Two region discriminators, one per network, take an image and that network's class
probabilities and score every `region`×`region` cell: they learn, on labeled images, each
region's accuracy. After the warm-up (`warmup_share` of the epochs):

- local pseudo-label filtering: a region whose score (predicted accuracy) is not above
  `threshold` is dropped from the pseudo-label loss;
- dynamic region-loss correction: a kept region's loss weight is the share of its pixels on
  which the two networks agree, so where they disagree it counts less.

The authors' released code scores whole images (global pooling); this is the region-level
version the paper describes. Inference averages the two networks' probabilities (or uses one).
At the end of every epoch the unlabeled images are labelled (both networks, eval mode): their
pseudo-labels and region scores go to the run's store, and, where the dataset has the hidden
ground truth (`labeled_fraction` < 1), the accuracy of kept versus dropped regions is reported.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

from raysegbg import dist
from raysegbg.config import Config
from raysegbg.data.loader import SegDataset, check_rows, eval_batches, row_kinds
from raysegbg.errors import RaysegbgError
from raysegbg.methods.base import Batch, Method, Optim, Stage, StageRun, Step, Stream
from raysegbg.methods.losses import cross_entropy, upcast
from raysegbg.methods.rrn.params import RrnParams
from raysegbg.methods.rrn.regions import (
    RegionDiscriminator,
    agreement,
    cutmix_boxes,
    discriminator_loss,
    kept,
    mix,
    partners,
    region_accuracy,
    to_pixels,
)  # fmt: skip
from raysegbg.models import build_model

SHOWN = 4  # unlabeled images in the TensorBoard rows


class Rrn(Method):
    Params = RrnParams
    needs_shared_state = True  # the pseudo-label store
    control = {"threshold": 0.0, "correction": False}  # cross pseudo supervision, unfiltered
    supervision = "masks of a labeled share (method.rrn.labeled_fraction)"

    def __init__(self, cfg: Config, num_classes: int, in_channels: int, ignore_index: int):
        super().__init__(cfg, num_classes, in_channels, ignore_index)
        p = self.params
        self.net1 = build_model(cfg.model, in_channels, num_classes)
        self.net2 = build_model(cfg.model, in_channels, num_classes)  # the RNG moved on: new init
        disc = (in_channels, num_classes, p.region, p.disc_channels)
        self.disc1, self.disc2 = RegionDiscriminator(*disc), RegionDiscriminator(*disc)
        self.run: StageRun | None = None
        self.hidden: SegDataset | None = None  # the unlabeled rows, with hidden ground truth
        self.shown: list[tuple] = []
        self.scores: np.ndarray | None = None

    @classmethod
    def check_data(cls, cfg: Config, num_classes: int) -> None:
        p = cfg.method.rrn
        check_rows(cfg.data.path, "train", p.labeled_fraction, "labeled")
        # rows without a mask are the unlabeled kind even at labeled_fraction 1
        if p.filter == "oracle" and (
            p.labeled_fraction == 1 or "unlabeled" in row_kinds(cfg.data.path, "train", 1.0)
        ):
            raise RaysegbgError(
                "method.rrn.filter=oracle scores regions with the hidden masks of a fully "
                "labeled set (some training rows have none, or none is hidden): set "
                "method.rrn.labeled_fraction < 1 on a fully labeled dataset, or use "
                "method.rrn.filter=discriminator"
            )

    @functools.cached_property
    def unlabeled_rows(self) -> str:
        """`unlabeled`; on a set without unlabeled rows, `all`: the labeled images with their
        masks hidden (cross pseudo supervision also applies to labeled images), so rrn runs,
        and is searched, on any dataset."""
        kinds = row_kinds(self.cfg.data.path, "train", self.params.labeled_fraction)
        return "unlabeled" if "unlabeled" in kinds else "all"

    # -- what the training loop sees ------------------------------------------------------
    def streams(self) -> dict[str, Stream]:
        p = self.params
        oracle = p.filter == "oracle"  # only the oracle's stream carries the hidden masks
        return {
            "train": Stream("labeled", labeled_fraction=p.labeled_fraction),
            "unlabeled": Stream(self.unlabeled_rows, batch_size=p.unlabeled_batch,
                                masks=oracle, labeled_fraction=p.labeled_fraction,
                                hidden_masks=oracle),
        }  # fmt: skip

    def optimizers(self, stage: Stage) -> list[Optim]:
        """Both networks on the run's optimiser and schedule; both discriminators on Adam at a
        constant lr. All four DDP-wrapped."""
        disc = {"lr": self.params.disc_lr, "kind": "adam", "weight_decay": 0.0, "schedule": False}
        return [Optim("net1", self.net1), Optim("net2", self.net2),
                Optim("disc1", self.disc1, **disc), Optim("disc2", self.disc2, **disc)]  # fmt: skip

    def enter_stage(self, stage: Stage, run: StageRun) -> None:
        self.run = run
        rows = self.unlabeled_rows
        if rows == "all":
            run.log("rrn: no unlabeled rows (method.rrn.labeled_fraction=1): the labeled images, "
                    "masks hidden, are the unlabeled stream")  # fmt: skip
        if self.params.label_images:
            p, data = self.params, self.cfg.data
            self.hidden = SegDataset(
                data.path, "train", rows=rows, cache=data.cache, reader=data.reader,
                labeled_fraction=p.labeled_fraction, hidden_masks=True,
            )  # fmt: skip
            if p.label_images > 0:
                keep = set(self.hidden.ids[: p.label_images])
                self.hidden = self.hidden.subset(keep.__contains__)
            self.hidden_index = {image_id: i for i, image_id in enumerate(self.hidden.ids)}

    def epochs(self, share: float) -> int:
        """`share` of the run's epochs, rounded (the ramp-up and the warm-up)."""
        return round(share * self.cfg.train.epochs)

    # -- pseudo-labels --------------------------------------------------------------------
    @torch.no_grad()
    def pseudo_labels(self, images: torch.Tensor, masks: torch.Tensor | None):
        """Each network's argmax, and its region score logits: its discriminator's, or with
        `filter=oracle` the logit of the region's true accuracy against the hidden `masks`."""
        probs = [upcast(net(images)).softmax(1) for net in (self.net1, self.net2)]
        labels = [q.argmax(1) for q in probs]
        if self.params.filter == "oracle":
            region = self.params.region
            right = [region_accuracy(x, masks, region, self.ignore_index)[0] for x in labels]
            return labels, [torch.logit(r, eps=1e-6) for r in right]
        return labels, [self.disc1(images, probs[0]), self.disc2(images, probs[1])]

    def region_weights(self, labels, scores, filtering: bool) -> list[torch.Tensor]:
        """Per pixel, the weight of each network's pseudo-labels in the other's loss: 0 in a
        dropped region, else the region's agreement (correction) or 1; all 1 before filtering."""
        p = self.params
        if not filtering:
            return [torch.ones_like(labels[0], dtype=torch.float32) for _ in labels]
        weights = [kept(s, p.threshold).float() for s in scores]
        if p.correction:
            agree = agreement(labels[0], labels[1], p.region)
            weights = [w * agree for w in weights]
        return [to_pixels(w, p.region) for w in weights]

    def pseudo_loss(self, logits, target, weight) -> torch.Tensor:
        """Weighted cross entropy, averaged over every unlabeled pixel of the global batch."""
        ce = F.cross_entropy(upcast(logits), target, reduction="none")
        return dist.global_mean((ce * weight).sum(), torch.tensor(float(target.numel())))

    def disc_loss(self, disc, images, logits, masks) -> torch.Tensor:
        """A discriminator learns each region's accuracy of its network's labeled prediction."""
        accuracy, weight = region_accuracy(
            logits.argmax(1), masks, self.params.region, self.ignore_index
        )
        return discriminator_loss(disc(images, upcast(logits).softmax(1)), accuracy, weight)

    # -- one step -------------------------------------------------------------------------
    def training_step(self, batch: Batch, step: Step) -> dict[str, torch.Tensor]:
        p, info = self.params, step.info
        n, images = len(batch.ids), batch.images
        if p.cps_weight > 0:
            unl = batch.unlabeled
            labels, scores = self.pseudo_labels(unl.images, unl.masks)
            weights = self.region_weights(labels, scores, info.epoch >= self.epochs(p.warmup_share))
            u_images = unl.images
            if p.cutmix:
                boxes = cutmix_boxes(unl.ids, self.cfg.train.seed, info.step, u_images.shape[-2:])
                pair = partners(len(unl.ids))
                u_images = mix(u_images, boxes, pair)
                labels = [mix(x, boxes, pair) for x in labels]
                weights = [mix(w, boxes, pair) for w in weights]
            step.log(kept_pixels=float(sum(w.gt(0).float().mean() for w in weights) / 2))
            if u_images.shape[-2:] == images.shape[-2:]:
                images = torch.cat([images, u_images])  # one forward per network
        outputs = []
        for name in ("net1", "net2"):
            out = step.module(name)(images)
            if len(out) == n and p.cps_weight > 0:  # sizes differ: a second forward
                out = torch.cat([out, step.module(name)(u_images)])
            outputs.append(out)
        losses = {"sup": sum(cross_entropy(o[:n], batch.masks, self.ignore_index) for o in outputs)}
        total = losses["sup"]
        if p.cps_weight > 0:  # each network learns the other's (kept, weighted) pseudo-labels
            losses["cps"] = self.pseudo_loss(outputs[0][n:], labels[1], weights[1])
            losses["cps"] = losses["cps"] + self.pseudo_loss(outputs[1][n:], labels[0], weights[0])
            ramp = rampup(info.epoch, self.epochs(p.rampup_share))
            total = total + ramp * p.cps_weight * losses["cps"]
        losses["loss"] = total
        step.optimize(total, "net1", "net2")
        losses["disc"] = sum(
            self.disc_loss(step.module(d), batch.images, o[:n].detach(), batch.masks)
            for d, o in zip(("disc1", "disc2"), outputs, strict=True)
        )
        step.optimize(losses["disc"], "disc1", "disc2")
        return losses

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        how = self.params.inference
        if how != "average":
            return (self.net1 if how == "net1" else self.net2)(images)
        probs = (upcast(self.net1(images)).softmax(1) + upcast(self.net2(images)).softmax(1)) / 2
        return probs.clamp_min(1e-12).log()

    # -- end of epoch: label the unlabeled images -----------------------------------------
    def after_epoch(self, val_batches) -> dict[str, float]:
        """Every rank labels its share of the unlabeled images and stores them (key
        `<id>@net1` / `@net2`: that network's pseudo-label, with its discriminator's region
        scores, row-major over the ceil(H/region) × ceil(W/region) grid). Returns the accuracy
        of kept and of dropped regions against the hidden ground truth."""
        if self.hidden is None or self.run is None:
            return {}
        p, run = self.params, self.run
        self.eval()
        counts = torch.zeros(4, dtype=torch.float64)  # kept right, kept, dropped right, dropped
        items, shown, scores_seen = [], [], []
        for batch in eval_batches(self.hidden, self.cfg.train.val_batch_size, run.rank,
                                  run.world_size):  # fmt: skip
            images, masks = batch.images.to(run.device), batch.masks.to(run.device)
            labels, scores = self.pseudo_labels(images, masks)
            known = masks != self.ignore_index
            for k in (0, 1):
                keep = to_pixels(kept(scores[k], p.threshold), p.region)
                right = labels[k] == masks
                counts += torch.tensor([(right & keep & known).sum(), (keep & known).sum(),
                                        (right & ~keep & known).sum(), (~keep & known).sum()],
                                       dtype=torch.float64)  # fmt: skip
                scores_seen.append(torch.sigmoid(scores[k]).flatten().cpu())
                if p.store_labels:
                    items += self._items(batch, labels[k], scores[k], f"net{k + 1}")
            if len(shown) < SHOWN:
                first = kept(scores[1], p.threshold)
                shown += list(zip(images, labels[1], first, masks, strict=True))
        self.shown, self.scores = shown[:SHOWN], torch.cat(scores_seen).numpy()
        if p.store_labels:
            self._store(items)
        dist.all_reduce_sum(counts)
        return _accuracy_report(counts.tolist())

    def _items(self, batch: Batch, labels: torch.Tensor, scores: torch.Tensor, net: str) -> list:
        out = []
        region = self.params.region
        for j, image_id in enumerate(batch.ids):
            h, w = self.hidden[self.hidden_index[image_id]][1].shape
            grid = scores[j, : -(-h // region), : -(-w // region)]
            label = labels[j, :h, :w].to(torch.uint8).cpu().numpy()
            out.append((f"{image_id}@{net}", label, torch.sigmoid(grid).flatten().cpu().numpy()))
        return out

    def _store(self, items: list) -> None:
        """Each rank puts its own images' pseudo-labels in the run's store."""
        run = self.run
        if run.state is None:
            if run.rank == 0:
                run.log("rrn: no shared state, pseudo-labels not stored")
            return
        run.state.put_many(items)

    # -- TensorBoard ----------------------------------------------------------------------
    def tb_images(self) -> dict[str, np.ndarray]:
        """Rows of image | net2's pseudo-label, dropped regions dimmed | hidden ground truth."""
        if not self.shown:
            return {}
        from raysegbg.tb import colorize, image_to_uint8

        rows = []
        for image, label, keep, mask in self.shown:
            pixels = to_pixels(keep[None].float(), self.params.region)[0].cpu().numpy()
            pseudo = colorize(label.cpu().numpy(), self.ignore_index).astype(np.float32)
            pseudo = (pseudo * (0.25 + 0.75 * pixels[..., None])).astype(np.uint8)
            truth = colorize(mask.cpu().numpy(), self.ignore_index)
            rows.append(np.concatenate([image_to_uint8(image), pseudo, truth], axis=1))
        return {"rrn/kept_regions": np.concatenate(rows, axis=0)}

    def tb_histograms(self) -> dict[str, np.ndarray]:
        return {} if self.scores is None else {"rrn/region_scores": self.scores}


def rampup(epoch: int, epochs: int) -> float:
    """exp(-5 (1 - t)^2) at t = epoch / epochs, 1 from then on (Laine & Aila's ramp-up)."""
    return 1.0 if epoch >= epochs else math.exp(-5 * (1 - epoch / epochs) ** 2)


def _accuracy_report(c: list[float]) -> dict[str, float]:
    """Pixel accuracy of pseudo-labels in kept and in dropped regions (NaN: none there)."""
    nan = float("nan")
    total = c[1] + c[3]
    return {
        "rrn/kept_acc": c[0] / c[1] if c[1] else nan,
        "rrn/dropped_acc": c[2] / c[3] if c[3] else nan,
        "rrn/kept_share": c[1] / total if total else nan,
        "rrn/pseudo_acc": (c[0] + c[2]) / total if total else nan,
    }
