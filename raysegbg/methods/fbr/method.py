"""`fbr`: weakly supervised segmentation from image-level labels with a fine-grained background
representation (Yin, Im, Min, Huo, Pan, Yoon, TCSVT 2024).

A classifier's class activation maps (CAMs) confuse an object with the background it always
sits on (a boat with water). Three stages, run in order by the one entry point and each
checkpointed:

1. `cam`: a multi-label classifier on the model's deepest encoder features (its score maps,
   upsampled, are the CAMs) and two projection heads on the decoder's full-resolution
   features, foreground (`fg_head`) and background (`bg_head`). At every
   step the CAMs give pseudo-labels (background where no present class reaches `bg_score`);
   - each image's background features are clustered (k-means, `nrois` centres) into negative
     regions of interest (NROIs), kept in a memory bank (a ring buffer identical on every rank);
   - uncertain foreground pixels (CAM below `sure`) are pulled to their class prototype and
     pushed from the NROIs (the bank's and this batch's: the pixel-to-NROI contrast, with
     gradient to the backbone and both heads) and from other classes' pixels, drawn more often
     from classes whose prototype is close (intra-foreground contrast, active sampling);
   - the background head also learns where no class is active at all.
2. `pseudo-masks`: the CAMs of every training image, gated by its image-level labels and cut at
   `cam_threshold` (by default the one whose CAMs score best on the validation split), become
   its pseudo mask (key `<id>@fbr` in the run's pseudo-label store,
   with the peak CAM as confidence); their quality against any hidden masks is reported.
3. `segment`: a segmentation network (the baseline: cross entropy + soft Dice) trains on the
   pseudo masks, with the run's augmentation; it is what predicts afterwards.

The authors' code computes the pixel-to-NROI term on detached features along the wrong axis,
so it gives no gradient; here it does (tested). Not ported: saliency maps (PPC/EPS), the
cross-view prototype loss and CRF post-processing.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raysegbg import dist
from raysegbg.config import Config, to_dict
from raysegbg.data.format import read_split
from raysegbg.data.loader import SegDataset, eval_batches
from raysegbg.errors import RaysegbgError
from raysegbg.methods.base import (
    Batch,
    Method,
    Optim,
    SharedStage,
    Stage,
    StageRun,
    Step,
    Stream,
    training_settings,
)
from raysegbg.methods.fbr.contrast import (
    BG_CAM,
    cam_labels,
    cam_logits,
    intra_loss,
    kmeans,
    normalized_cams,
    nroi_loss,
    pixel_rows,
    prototypes,
    sample,
)  # fmt: skip
from raysegbg.methods.fbr.params import FbrParams
from raysegbg.methods.losses import cross_entropy, soft_dice, upcast
from raysegbg.metrics import confusion, f1_scores, summarize
from raysegbg.models import build_model
from raysegbg.state.memory import RingBank

GRID = [round(0.05 * k, 2) for k in range(1, 20)]  # cam_threshold=0: chosen among these
POINTS = 512  # background pixels per image that the k-means clusters
POOL = 256  # foreground pixels per image that intra-foreground negatives are drawn from
SHOWN = 4  # validation images in the TensorBoard rows
CHUNK = 256  # pseudo masks per call to the store


def label_key(image_id: str) -> str:
    return f"{image_id}@fbr"


def projection(cin: int, dims: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, dims, 1), nn.ReLU(inplace=True), nn.Conv2d(dims, dims, 1))


class CamNet(nn.Module):
    """The model's encoder-decoder: a CAM classifier on the encoder's deepest features (the
    class activation maps, upsampled to the image), and the two projection heads on the
    decoder's full-resolution features."""

    def __init__(self, cfg: Config, in_channels: int, num_classes: int, dims: int):
        super().__init__()
        self.net = build_model(cfg.model, in_channels, num_classes)
        width = self.net.segmentation_head[0].in_channels  # the decoder's output width
        del self.net.segmentation_head  # replaced by the heads below
        deepest = self.net.encoder.out_channels[-1]
        self.classifier = nn.Conv2d(deepest, num_classes - 1, 1)  # foreground classes only
        self.fg_head, self.bg_head = projection(width, dims), projection(width, dims)
        self.bg_classifier = nn.Conv2d(dims, 1, 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.net.encoder(images)
        scores = self.classifier(features[-1])
        feats = self.net.decoder(features)
        feats = feats[-1] if isinstance(feats, (list, tuple)) else feats
        zb = F.normalize(self.bg_head(feats), dim=1)
        return {
            # (B, K, H, W): CAMs before ReLU
            "scores": F.interpolate(
                scores, size=images.shape[-2:], mode="bilinear", align_corners=False
            ),  # fmt: skip
            "zf": F.normalize(self.fg_head(feats), dim=1),
            "zb": zb,
            "bg_logit": self.bg_classifier(zb)[:, 0],
        }


def label_counts(found: torch.Tensor, masks: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(true positives, false positives, false negatives) of image-level decisions `found`
    (B, K: foreground classes 1..K) against the classes present in `masks`."""
    present = torch.stack([(masks == k).flatten(1).any(1) for k in range(1, num_classes)], 1)
    found = found.to(present.device)
    return torch.tensor([(found & present).sum(), (found & ~present).sum(),
                         (~found & present).sum()], dtype=torch.float64)  # fmt: skip


def class_logits(scores: torch.Tensor, top: float) -> torch.Tensor:
    """Image-level class logits (B, K): the mean of each score map's highest `top` share of
    pixels (1: the global average)."""
    flat = upcast(scores).flatten(2)
    if top >= 1:
        return flat.mean(2)
    return flat.topk(max(1, round(top * flat.shape[2])), dim=2).values.mean(2)


class Fbr(Method):
    Params = FbrParams
    needs_shared_state = True  # the pseudo-label store
    control = {"nroi_weight": 0.0, "intra_weight": 0.0}  # CAMs without the contrasts
    supervision = "image-level labels"

    def __init__(self, cfg: Config, num_classes: int, in_channels: int, ignore_index: int):
        super().__init__(cfg, num_classes, in_channels, ignore_index)
        self.check_classes(num_classes)  # not check_data: predict builds fbr without the dataset
        p = self.params
        self.cam = CamNet(cfg, in_channels, num_classes, p.proj_dims)
        self.seg = build_model(cfg.model, in_channels, num_classes)
        self.bank = RingBank(p.bank_size, p.proj_dims)
        self.trainable = {n for n, q in self.named_parameters() if q.requires_grad}
        self.stage: Stage = self.stages()[0]
        self.threshold = p.cam_threshold or 0.3  # until chosen on validation (pseudo-masks)
        self.group = None  # a process group for the prototypes' all-reduce inside backward
        self.pending: torch.Tensor | None = None  # this step's NROIs, enqueued by after_step
        self.masks: dict[str, np.ndarray] = {}  # the segmentation stage's pseudo masks
        self.shown: list[tuple] = []
        self.first_cams: torch.Tensor | None = None
        self.clusters: tuple | None = None

    @staticmethod
    def check_classes(num_classes: int) -> None:
        if num_classes < 2:
            raise RaysegbgError("fbr needs a background and at least one object class")

    @classmethod
    def check_data(cls, cfg: Config, num_classes: int) -> None:
        cls.check_classes(num_classes)
        labels = read_split(cfg.data.path, "train", columns=["image_labels"])
        missing = labels.column("image_labels").null_count
        if missing:
            raise RaysegbgError(
                f"{missing} training rows of {cfg.data.path} have no image-level labels: fbr "
                "learns from them; import masks (labels are derived from them) or give labels"
            )

    # -- stages ---------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        return [
            Stage("cam", self.params.cam_epochs),
            Stage("pseudo-masks", 0, augment=False),
            Stage("segment", self.cfg.train.epochs),
        ]

    CAM_VERSION = "1"  # raise when what the CAM stage trains changes
    SEGMENT_ONLY = ("cam_threshold", "dice_weight")  # settings the CAM stage never reads

    def shared_stage(self, stage: Stage) -> SharedStage | None:
        """The CAM stage (network and NROI bank): trials of a search over the CAM threshold or
        the segmentation stage, and later runs, reuse it."""
        if stage.name != "cam":
            return None
        settings = training_settings(self.cfg)
        settings.update({f"method.fbr.{k}": v for k, v in to_dict(self.params).items()
                         if k not in self.SEGMENT_ONLY})  # fmt: skip
        return SharedStage("fbr-cam", settings, ("cam.", "bank."), self.CAM_VERSION)

    def streams(self) -> dict[str, Stream]:
        # every training row, masks hidden: image-level labels only (the segment stage's
        # masks are the stored pseudo masks, see `stage_dataset`)
        return {"train": Stream("all", masks=False, image_labels=True)}

    def optimizers(self, stage: Stage) -> list[Optim]:
        if stage.name == "cam":
            return [Optim("cam", self.cam)]
        return [Optim("seg", self.seg)]

    def enter_stage(self, stage: Stage, run: StageRun) -> None:
        self.use_stage(stage.name)
        prefix = {"cam": "cam.", "segment": "seg."}.get(stage.name)
        for name, param in self.named_parameters():
            param.requires_grad_(prefix is not None and name.startswith(prefix)
                                 and name in self.trainable)  # fmt: skip
        if stage.name == "cam" and self.group is None:
            self.group = dist.new_group()
        if stage.name == "segment":
            self.masks = read_masks(run)

    def stage_dataset(self, stage: Stage, run: StageRun):
        return run.dataset.with_masks(self.masks) if stage.name == "segment" else run.dataset

    def use_stage(self, name: str) -> None:
        """Predict and train as stage `name` does (checkpoints, tests)."""
        self.stage = next(s for s in self.stages() if s.name == name)

    def train(self, mode: bool = True) -> Fbr:
        super().train(mode)
        (self.seg if self.stage.name == "cam" else self.cam).eval()  # the frozen network
        return self

    def get_extra_state(self) -> dict:
        # a checkpoint predicts the way its stage did, with the CAM threshold chosen then
        return {"stage": self.stage.name, "threshold": self.threshold}

    def set_extra_state(self, state: dict) -> None:
        self.use_stage(state["stage"])
        self.threshold = state["threshold"]

    # -- one step -------------------------------------------------------------------------
    def training_step(self, batch: Batch, step: Step) -> dict[str, torch.Tensor]:
        if self.stage.name == "segment":
            logits = step.module("seg")(batch.images)
            losses = {"ce": cross_entropy(logits, batch.masks, self.ignore_index)}
            losses["loss"] = losses["ce"]
            if self.params.dice_weight > 0:
                losses["dice"] = soft_dice(logits, batch.masks, self.ignore_index)
                losses["loss"] = losses["loss"] + self.params.dice_weight * losses["dice"]
            step.optimize(losses["loss"], "seg")
            return losses
        out = step.module("cam")(batch.images)
        gen = torch.Generator().manual_seed(
            (self.cfg.train.seed * 1_000_003 + step.info.step) * 1_009 + dist.rank()
        )
        losses = self.cam_losses(out, batch.image_labels[:, 1:], gen)
        step.optimize(losses["loss"], "cam")
        return losses

    def cam_losses(self, out: dict[str, torch.Tensor], present: torch.Tensor,
                   gen: torch.Generator) -> dict[str, torch.Tensor]:  # fmt: skip
        """Classification, background-head, pixel-to-NROI and intra-foreground losses of one
        CAM step; this step's NROIs wait in `pending` for `after_step`."""
        p = self.params
        scores, zf, zb = out["scores"], out["zf"], out["zb"]
        b, d, h, w = zf.shape
        logits = class_logits(scores, self.params.pool_top)
        bce = F.binary_cross_entropy_with_logits(logits, present.to(logits.dtype), reduction="sum")
        cls = dist.global_mean(bce, torch.tensor(float(present.numel())))
        cams = normalized_cams(scores.detach(), present)
        labels = cam_labels(cams, p.bg_score)
        bg_target = (cams.sum(1) < BG_CAM).to(out["bg_logit"].dtype)
        bg = F.binary_cross_entropy_with_logits(upcast(out["bg_logit"]), bg_target.float(),
                                                reduction="sum")  # fmt: skip
        bg = dist.global_mean(bg, torch.tensor(float(bg_target.numel())))
        protos, has = prototypes(zf, cams, h * w // 16, self.group)

        # anchors: uncertain foreground pixels of classes that have a prototype
        own = cams.gather(1, (labels - 1).clamp_min(0)[:, None])[:, 0]
        idx, ok = sample(((labels > 0) & (own < p.sure)).flatten(1), p.anchors, gen)
        anchors, classes = pixel_rows(zf, idx)[ok], labels.flatten(1).gather(1, idx)[ok]
        keep = has[classes - 1]
        anchors, classes = anchors[keep], classes[keep]

        # NROIs: k-means over each image's background features; negatives from the bank too
        pidx, pok = sample((labels == 0).flatten(1), POINTS, gen)
        centres, _, used = kmeans(pixel_rows(zb, pidx), pok, p.nrois, p.kmeans_iters)
        nrois = centres[used]
        self.pending = nrois.detach()
        stored, _ = self.bank.valid()
        if len(stored):
            pick = torch.randint(len(stored), (p.negatives,), generator=gen).to(stored.device)
            nrois = torch.cat([stored[pick].to(nrois.dtype), nrois])
        count = torch.tensor(float(len(anchors)))
        nroi = dist.global_mean(nroi_loss(anchors, classes, protos, nrois, p.temperature), count)

        # intra-foreground: negatives drawn from other classes' pixels of this batch
        fidx, fok = sample((labels > 0).flatten(1), POOL, gen)
        pool, pool_classes = pixel_rows(zf, fidx)[fok], labels.flatten(1).gather(1, fidx)[fok]
        intra = intra_loss(anchors, classes, protos, has, pool, pool_classes, p.negatives,
                           p.temperature, gen)  # fmt: skip
        intra = dist.global_mean(intra, count)
        total = cls + p.bg_weight * bg + p.nroi_weight * nroi + p.intra_weight * intra
        return {"loss": total, "cls": cls, "bg": bg, "nroi": nroi, "intra": intra}

    def after_step(self, batch: Batch, info) -> dict[str, float]:
        """Enqueue this step's NROIs, every rank's in rank order (the bank stays identical)."""
        if self.pending is None:
            return {}
        self.bank.push(self.pending)
        self.pending = None
        return {"fbr/bank_filled": float(self.bank.count)}

    # -- prediction -----------------------------------------------------------------------
    def cams(self, images: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised CAMs (B, K, H, W), gated by `present` (B, K) or, without it, by the
        classes the classifier itself finds in each image."""
        scores = self.cam(images)["scores"]
        if present is None:
            present = class_logits(scores, self.params.pool_top) > 0
        return normalized_cams(scores, present)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        if self.stage.name == "segment":
            return self.seg(images)
        return cam_logits(self.cams(images), self.threshold)

    # -- stage 2: pseudo masks ------------------------------------------------------------
    @torch.no_grad()
    def run_stage(self, stage: Stage, run: StageRun) -> dict[str, float]:
        """Every rank masks its share of the training images and puts them in the store.
        Returns the pseudo masks' quality against whatever masks the dataset hides."""
        self.eval()
        n = self.num_classes
        out = {}
        if not self.params.cam_threshold:
            out = self.choose_threshold(run)
        data = self.cfg.data
        truth = SegDataset(data.path, "train", rows="all", cache=False, reader=data.reader)
        truth = truth.subset(set(run.dataset.ids).__contains__)
        index = {image_id: i for i, image_id in enumerate(truth.ids)}
        cm = torch.zeros(n, n, dtype=torch.long)
        items = []
        for batch in eval_batches(truth, self.cfg.train.val_batch_size, run.rank,
                                  run.world_size):  # fmt: skip
            present = truth.multi_hot([index[i] for i in batch.ids])[:, 1:].to(run.device)
            cams = self.cams(batch.images.to(run.device), present)
            labels = cam_labels(cams, self.threshold).cpu()
            cm += confusion(labels, batch.masks, n, self.ignore_index)
            peak = cams.amax(1).cpu()
            for j, image_id in enumerate(batch.ids):
                h, w = truth[index[image_id]][1].shape
                items.append((label_key(image_id), labels[j, :h, :w].to(torch.uint8).numpy(),
                              peak[j, :h, :w].numpy()))  # fmt: skip
        store(run).put_many(items, chunk=CHUNK)  # returns once they are in
        dist.all_reduce_sum(cm)  # (and no rank reads the masks before every rank put them)
        report = summarize(cm.numpy(), truth.meta.classes)
        out.update({f"pseudo/{k}": v for k, v in report.items() if "/" not in k})
        out["pseudo/images"] = float(len(truth))
        out["pseudo/threshold"] = self.threshold
        if cm.sum():
            run.log(f"pseudo masks (CAM threshold {self.threshold:g}): mIoU "
                    f"{out['pseudo/miou']:.4f} against the hidden masks of {len(truth)} "
                    "training images")  # fmt: skip
        return out

    def choose_threshold(self, run: StageRun) -> dict[str, float]:
        """`cam_threshold` = 0: the threshold of `GRID` whose label-gated CAMs have the best
        mIoU on the validation split (summed over ranks; ties: the lower threshold)."""
        data = self.cfg.data
        val = SegDataset(data.path, data.val_split, cache=False, reader=data.reader)
        n = self.num_classes
        cm = torch.zeros(len(GRID), n, n, dtype=torch.long)
        index = {image_id: i for i, image_id in enumerate(val.ids)}
        for batch in eval_batches(val, self.cfg.train.val_batch_size, run.rank, run.world_size):
            present = val.multi_hot([index[i] for i in batch.ids])[:, 1:].to(run.device)
            cams = self.cams(batch.images.to(run.device), present)
            for k, t in enumerate(GRID):
                cm[k] += confusion(cam_labels(cams, t).cpu(), batch.masks, n, self.ignore_index)
        dist.all_reduce_sum(cm)
        if not cm.sum():
            raise RaysegbgError(
                f"fbr: the '{self.cfg.data.val_split}' split has no masks to choose the CAM "
                "threshold on: set method.fbr.cam_threshold (e.g. 0.3)"
            )
        scores = [summarize(c.numpy())["miou"] for c in cm]
        best = max(range(len(GRID)), key=lambda k: (scores[k], -k))
        self.threshold = GRID[best]
        shown = [f"{t:g}{'*' if k == best else ''} {v:.3f}" for k, (t, v) in
                 enumerate(zip(GRID, scores, strict=True))]  # fmt: skip
        run.log("CAM threshold chosen on validation (* ; mIoU at each): " + "  ".join(shown))
        if best in (0, len(GRID) - 1):
            run.log(f"warning: the CAM threshold chosen ({GRID[best]:g}) is at the edge of the "
                    f"grid {GRID[0]:g}..{GRID[-1]:g}: the best one may lie beyond it, or the "
                    f"'{data.val_split}' split may not look like the training images; check "
                    "the pseudo masks or set method.fbr.cam_threshold")  # fmt: skip
        return {"pseudo/val_miou_at_threshold": scores[best]}

    # -- TensorBoard ----------------------------------------------------------------------
    @torch.no_grad()
    def after_epoch(self, val_batches) -> dict[str, float]:
        """CAM stage: how well the classifier finds each validation image's classes (the
        image-level labels its masks imply: CAMs cannot be better than that), and, for
        TensorBoard, the first validation images' CAMs (and those of the first epoch this
        process ran) and one image's NROI clusters."""
        if self.stage.name != "cam":
            return {}
        was_training = self.training
        self.eval()
        counts = torch.zeros(3, dtype=torch.float64)  # true pos., false pos., false neg.
        first = None
        for batch in val_batches():
            out = self.cam(batch.images)
            found = class_logits(out["scores"], self.params.pool_top) > 0
            counts += label_counts(found, batch.masks, self.num_classes)
            first = (batch, out) if first is None else first
        dist.all_reduce_sum(counts)
        if first is not None:
            batch, out = first
            images, masks = batch.images[:SHOWN], batch.masks[:SHOWN]
            out = {k: v[:SHOWN] for k, v in out.items()}
            present = class_logits(out["scores"], self.params.pool_top) > 0
            cams = normalized_cams(out["scores"], present)
            if self.first_cams is None:
                self.first_cams = cams
            labels = cam_labels(cams, self.threshold)
            self.shown = list(zip(images, self.first_cams, cams, labels, masks, strict=True))
            gen = torch.Generator().manual_seed(self.cfg.train.seed)
            idx, ok = sample((labels[:1] == 0).flatten(1), POINTS * 8, gen)
            z = pixel_rows(out["zb"][:1], idx)
            _, assign, _ = kmeans(z, ok, self.params.nrois, self.params.kmeans_iters)
            self.clusters = (images[0], idx[0][ok[0]], assign[0][ok[0]])
        self.train(was_training)
        labels = f1_scores(*counts.tolist())
        return {"fbr/bank_filled": float(self.bank.count),
                **{f"fbr/val_label_{k}": v for k, v in labels.items()}}  # fmt: skip

    def tb_images(self) -> dict[str, np.ndarray]:
        """Rows of image | CAM at this process's first epoch | CAM now | pseudo mask | truth;
        and one image's NROI clusters (each background cluster one colour)."""
        if not self.shown:
            return {}
        from raysegbg.tb import colorize, image_to_uint8

        heat = lambda c: (np.stack([c, c * 0.4, 1 - c], -1) * 255).astype(np.uint8)  # noqa: E731
        rows = []
        for image, first, cams, label, mask in self.shown:
            rows.append(np.concatenate([
                image_to_uint8(image), heat(first.amax(0).cpu().numpy()),
                heat(cams.amax(0).cpu().numpy()), colorize(label.cpu().numpy(), self.ignore_index),
                colorize(mask.cpu().numpy(), self.ignore_index),
            ], axis=1))  # fmt: skip
        out = {"fbr/cams_first_now_pseudo_truth": np.concatenate(rows, axis=0)}
        image, idx, assign = self.clusters
        h, w = image.shape[-2:]
        clusters = np.full(h * w, self.ignore_index, dtype=np.int64)
        clusters[idx.cpu().numpy()] = assign.cpu().numpy() + 1
        out["fbr/nroi_clusters"] = np.concatenate(
            [image_to_uint8(image), colorize(clusters.reshape(h, w), self.ignore_index)], axis=1
        )
        return out

    def tb_histograms(self) -> dict[str, np.ndarray]:
        if not self.shown:
            return {}
        return {"fbr/cam_peaks": torch.stack([c.amax((1, 2)) for _, _, c, _, _ in self.shown])
                .flatten().cpu().numpy()}  # fmt: skip


def store(run: StageRun):
    """The run's pseudo-label store (its shared-state client)."""
    if run.state is None:
        raise RaysegbgError("fbr needs the run's shared state for its pseudo-label store")
    return run.state


def read_masks(run: StageRun) -> dict[str, np.ndarray]:
    """The stage's images' pseudo masks, read by every rank from the store (a rank's loader
    visits every image over the epochs; the masks are small: uint8)."""
    ids = list(run.dataset.ids)
    got = store(run).get_many([label_key(i) for i in ids], chunk=CHUNK)
    return {i: mask for i, (mask, _, _) in zip(ids, got, strict=True)}
