"""`colab`: Context Label Learning (Li, Kamnitsas et al., IEEE TMI 2023).

A background made of very different things is hard to map to one compact cluster, so its
logits drift over the decision boundary and the model over-segments. A task generator
network splits background pixels into K soft context labels (foreground pixels always keep
their true label); the segmentation network predicts K context channels plus one channel per
foreground class, trained on those targets. Every `update_interval` steps the generator is
updated by an exact one-step hypergradient: a virtual SGD step of the segmentation network on
the generated targets, the foreground (ROI) loss of the stepped network, differentiated back
through the virtual step to the generator. The ROI loss is measured on the same batch
(`meta_batch=same`) or on a batch of held-out training images (`meta_batch=holdout`: a fixed
`meta_holdout` share of the training split the segmentation network never trains on). At
inference every context channel is background.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

from raysegbg import dist
from raysegbg.config import Config
from raysegbg.data.loader import TrainLoader, in_holdout, not_in_holdout
from raysegbg.methods.base import Batch, Method, Optim, Stage, StageRun, Step, StepInfo
from raysegbg.methods.colab.params import ColabParams
from raysegbg.methods.losses import soft_dice, upcast
from raysegbg.models import build_model, local_batch_norm

CONTEXT_COLOURS = np.array([[40, 40, 160], [40, 160, 40], [200, 120, 30], [150, 40, 150],
                            [40, 150, 150], [160, 160, 40]], np.uint8)  # fmt: skip


def collapse(logits: torch.Tensor, k: int) -> torch.Tensor:
    """K context channels + foreground channels -> class logits (background = logsumexp)."""
    return torch.cat([logits[:, :k].logsumexp(1, keepdim=True), logits[:, k:]], dim=1)


def soft_targets(context: torch.Tensor, masks: torch.Tensor, num_classes: int, ignore: int):
    """(B, K + C - 1, H, W): background pixels take the context distribution, foreground
    pixels their one-hot class; ignored pixels are all zero (they add no loss)."""
    k = context.shape[1]
    dtype = context.dtype
    fg = F.one_hot(masks.clamp(0, num_classes - 1), num_classes).permute(0, 3, 1, 2)[:, 1:]
    fg = fg.to(dtype)
    is_bg = (masks == 0).unsqueeze(1).to(dtype)
    valid = (masks != ignore).unsqueeze(1).to(dtype)
    fg = fg * (1 - is_bg)
    return torch.cat([context * is_bg, fg], dim=1) * valid, k


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over labelled pixels of the global batch of -sum_c t_c log p_c."""
    per_pixel = -(targets * upcast(logits).log_softmax(1)).sum(1)
    count = targets.sum(1).gt(0).to(per_pixel.dtype).sum()
    return dist.global_mean(per_pixel.sum(), count)


def distance_from_foreground(masks: torch.Tensor, limit: int) -> torch.Tensor:
    """Chessboard distance (pixels) of every pixel to the nearest foreground, capped at limit."""
    fg = ((masks > 0) & (masks != 255)).float().unsqueeze(1)
    out = torch.full_like(fg, float(limit))
    reach = fg
    for d in range(limit):
        out = torch.where((reach > 0) & (out == limit), torch.full_like(out, float(d)), out)
        reach = F.max_pool2d(reach, 3, stride=1, padding=1)
    return out[:, 0]


class Colab(Method):
    Params = ColabParams
    control = {"meta_update": False}  # a frozen random task generator

    def __init__(self, cfg: Config, num_classes: int, in_channels: int, ignore_index: int):
        super().__init__(cfg, num_classes, in_channels, ignore_index)
        p = self.params
        self.k = p.k
        self.net = build_model(cfg.model, in_channels, num_classes - 1 + p.k)
        gen_cfg = dataclasses.replace(
            cfg.model, arch="Unet", encoder=p.generator_encoder, encoder_depth=p.generator_depth,
            decoder_channels=(32, 16, 8, 8, 8)[: p.generator_depth], weights_path="",
        )  # fmt: skip
        self.generator = build_model(gen_cfg, in_channels, p.k)
        self.meta_loader: TrainLoader | None = None  # meta_batch=holdout: held-out batches
        self.shown: dict[str, torch.Tensor] = {}

    @property
    def generator_params(self) -> list[torch.nn.Parameter]:
        """Looked up each time: the loop may swap BatchNorm layers (global BN) after init."""
        return [q for q in self.generator.parameters() if q.requires_grad]

    # -- what the training loop and DDP see ----------------------------------------------
    def stages(self) -> list[Stage]:
        p = self.params
        if p.meta_batch == "same":
            return super().stages()
        rest = partial(not_in_holdout, fraction=p.meta_holdout)
        return [Stage("train", self.cfg.train.epochs, keep=rest)]

    def enter_stage(self, stage: Stage, run: StageRun) -> None:
        if self.params.meta_batch != "holdout":
            return
        held = run.train_dataset.subset(partial(in_holdout, fraction=self.params.meta_holdout))
        cfg = self.cfg
        steps = max(1, len(held) // cfg.train.batch_size)
        self.meta_loader = TrainLoader(held, cfg.data, cfg.train.batch_size, steps,
                                       cfg.train.seed + 1, run.rank, run.world_size)  # fmt: skip

    def optimizers(self, stage: Stage) -> list[Optim]:
        """The segmentation net (DDP), and the generator: Adam at a constant lr, outside DDP
        (its gradient is a meta-gradient), averaged over ranks by the loop."""
        p = self.params
        return [
            Optim("main", self, params=tuple(self.net.parameters())),
            Optim("generator", self.generator, lr=p.generator_lr, kind="adam", weight_decay=0.0,
                  schedule=False, ddp=False),
        ]  # fmt: skip

    def context(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        q = upcast(self.generator(images)).softmax(1)
        if self.params.distance_weighting:
            far = distance_from_foreground(masks, self.params.distance_max)
            w = (far / self.params.distance_max).unsqueeze(1).to(q.dtype)
            zero = F.one_hot(torch.zeros_like(masks), self.k).permute(0, 3, 1, 2).to(q.dtype)
            q = (1 - w) * q + w * zero
        return q

    def seg_loss(self, logits, targets, masks) -> dict[str, torch.Tensor]:
        losses = {"soft_ce": soft_cross_entropy(logits, targets)}
        if self.params.dice_weight > 0:
            losses["dice"] = soft_dice(collapse(logits, self.k), masks, self.ignore_index)
        losses["loss"] = losses["soft_ce"] + self.params.dice_weight * losses.get("dice", 0.0)
        return losses

    def forward(self, batch: Batch, info: StepInfo) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            context = self.context(batch.images, batch.masks)
        targets, _ = soft_targets(context, batch.masks, self.num_classes, self.ignore_index)
        logits = self.net(batch.images)
        if dist.rank() == 0:
            self.shown = {"images": batch.images[:4].detach(), "context": context[:4].argmax(1),
                          "masks": batch.masks[:4], "logits": logits[:4].detach()}  # fmt: skip
        return self.seg_loss(logits, targets, batch.masks)

    def training_step(self, batch: Batch, step: Step) -> dict[str, torch.Tensor]:
        """Every `update_interval` steps the generator's meta-update, then the usual step."""
        p = self.params
        if p.meta_update and step.info.step % p.update_interval == 0:
            meta_images, meta_masks = batch.images, batch.masks
            if self.meta_loader is not None:  # the n-th meta-update reads the n-th held-out batch
                meta = self.meta_loader.batch_at(step.info.step // p.update_interval)
                meta_images, meta_masks = meta.images.to(batch.images), meta.masks.to(batch.masks)
            with torch.autocast(batch.images.device.type, enabled=False):  # second order: fp32
                meta_loss = self.meta_loss(batch.images, batch.masks, meta_images, meta_masks)
            step.optimize(meta_loss, "generator")
            step.log(meta_roi_loss=float(meta_loss.detach()))
        return super().training_step(batch, step)

    def hypergradient(self, images, masks, meta_images, meta_masks):
        """(ROI loss, its exact gradient with respect to the generator's parameters)."""
        meta = self.meta_loss(images, masks, meta_images, meta_masks)
        return meta, torch.autograd.grad(meta, self.generator_params)

    def meta_loss(self, images, masks, meta_images, meta_masks) -> torch.Tensor:
        """ROI-loss(θ - α ∇θ L(θ, targets(φ))): the foreground loss of the segmentation net
        after a virtual step on the generator's targets, differentiable in φ (double
        backward)."""
        named = [(n, p) for n, p in self.net.named_parameters() if p.requires_grad]
        names, params = [n for n, _ in named], [p for _, p in named]
        buffers = {
            n: b.clone() for n, b in self.net.named_buffers()
        }  # no running-stat side effects
        with local_batch_norm():
            targets, _ = soft_targets(self.context(images, masks), masks, self.num_classes,
                                      self.ignore_index)  # fmt: skip
            logits = functional_call(self.net, {**dict(named), **buffers}, (images,))
            inner = soft_cross_entropy(logits, targets)
            grads = torch.autograd.grad(inner, params, create_graph=True)
            alpha = self.params.virtual_lr
            stepped = {n: p - alpha * g for n, p, g in zip(names, params, grads, strict=True)}
            meta_logits = functional_call(self.net, {**stepped, **buffers}, (meta_images,))
            return self.roi_loss(collapse(meta_logits, self.k), meta_masks)

    def roi_loss(self, class_logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Foreground (ROI) loss of the stepped network: soft Dice of the foreground classes."""
        probs = upcast(class_logits).softmax(1)[:, 1:]
        valid = (masks != self.ignore_index).unsqueeze(1).to(probs.dtype)
        fg = F.one_hot(masks.clamp(0, self.num_classes - 1), self.num_classes)
        fg = fg.permute(0, 3, 1, 2).to(probs.dtype)[:, 1:] * valid
        inter = (probs * valid * fg).sum((0, 2, 3))
        return (
            1 - ((2 * inter + 1) / ((probs * valid).sum((0, 2, 3)) + fg.sum((0, 2, 3)) + 1)).mean()
        )

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return collapse(self.net(images), self.k)

    # -- TensorBoard --------------------------------------------------------------------
    def tb_images(self) -> dict[str, np.ndarray]:
        """Input | context labels (background only) rows: the generator's split of the scene."""
        if not self.shown:
            return {}
        rows = []
        for img, ctx, m in zip(
            self.shown["images"], self.shown["context"], self.shown["masks"], strict=True
        ):
            from raysegbg.tb import image_to_uint8

            colours = CONTEXT_COLOURS[ctx.cpu().numpy() % len(CONTEXT_COLOURS)]
            colours[(m.cpu().numpy() > 0)] = 255  # foreground keeps its label: white
            rows.append(np.concatenate([image_to_uint8(img), colours], axis=1))
        return {"colab/context_labels": np.concatenate(rows, axis=0)}

    def tb_histograms(self) -> dict[str, np.ndarray]:
        """Background logit margins (background minus best foreground): the paper's evidence
        is that they move away from the decision boundary (0)."""
        if not self.shown:
            return {}
        class_logits = collapse(self.shown["logits"].float(), self.k)
        margin = class_logits[:, 0] - class_logits[:, 1:].max(1).values
        return {"colab/bg_logit_margin": margin[self.shown["masks"] == 0].cpu().numpy()}
