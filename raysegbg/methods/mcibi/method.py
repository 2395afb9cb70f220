"""`mcibi`: Mining Contextual Information Beyond Image (Jin et al., ICCV 2021).

A memory holds one vector per class, learned over the whole dataset. A stage-1 head predicts
every pixel's class distribution; the pixel reads the memory through it (soft aggregation),
attends from its own feature to what it read, and a stage-2 classifier predicts from the
fusion of both. After each step the entry of every class present in the labels moves toward
the (1 - cos)-weighted mean of that class's features, with the per-class sums all-reduced
over ranks first (see `raysegbg.state.memory`). At inference the memory is read, never written.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raysegbg.config import Config
from raysegbg.methods.base import Batch, Method, StepInfo
from raysegbg.methods.losses import cross_entropy
from raysegbg.methods.mcibi.params import McibiParams
from raysegbg.models import build_model
from raysegbg.state.memory import ClassMemory, class_sums, global_class_sums

AUTO_POSITIONS = 1024  # feature positions an automatic stride leaves (32 x 32)


def auto_stride(height: int, width: int) -> int:
    """The finest power-of-two stride that leaves at most AUTO_POSITIONS feature positions: the
    memory read attends over all of them, so its cost grows with their square (1/2 on 64-px
    images; 1/16 on 512-px ones, where the reference's 1/8 needs a GPU)."""
    stride = 1
    while (height // stride) * (width // stride) > AUTO_POSITIONS:
        stride *= 2
    return stride


def conv_bn_relu(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True)
    )


def downsample_labels(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(masks[:, None].float(), size=size, mode="nearest-exact")[:, 0].long()


def update_weights(features: torch.Tensor, labels: torch.Tensor, memory: ClassMemory, ignore: int):
    """Per-pixel weights 1 - cos(feature, its class entry); 1 where the entry is still empty."""
    valid = labels != ignore
    y = labels.clamp(0, memory.memory.shape[0] - 1)
    cos = F.cosine_similarity(features, memory.memory[y], dim=1)
    w = torch.where(memory.filled[y], 1.0 - cos, torch.ones_like(cos))
    return torch.where(valid, w.clamp_min(0.0), torch.zeros_like(w))


class MemoryReader(nn.Module):
    """Soft (or hard) memory read, then attention from pixel features to what they read."""

    def __init__(self, dims: int, attention_dims: int):
        super().__init__()
        self.query = nn.Conv2d(dims, attention_dims, 1)
        self.key = nn.Conv2d(dims, attention_dims, 1)
        self.value = nn.Conv2d(dims, dims, 1)
        self.out = conv_bn_relu(dims, dims, 1)

    def forward(self, feats, probs, memory: torch.Tensor) -> torch.Tensor:
        read = torch.einsum("bkhw,kd->bdhw", probs, memory)
        b, _, h, w = feats.shape
        q = self.query(feats).flatten(2).transpose(1, 2)  # (B, hw, a)
        k = self.key(read).flatten(2)  # (B, a, hw)
        v = self.value(read).flatten(2).transpose(1, 2)  # (B, hw, d)
        attn = torch.softmax(q @ k / q.shape[-1] ** 0.5, dim=-1)
        return self.out((attn @ v).transpose(1, 2).reshape(b, -1, h, w))


class Mcibi(Method):
    Params = McibiParams
    needs_shared_state = True
    control = {"update": False}  # the memory frozen at its initial value

    def __init__(self, cfg: Config, num_classes: int, in_channels: int, ignore_index: int):
        super().__init__(cfg, num_classes, in_channels, ignore_index)
        p = self.params
        self.net = build_model(cfg.model, in_channels, num_classes)
        channels = self.net.segmentation_head[0].in_channels  # the decoder's output width
        self.net.segmentation_head = nn.Identity()  # replaced by the two-stage heads below
        self.project = conv_bn_relu(channels, p.dims)
        self.stage1 = nn.Conv2d(p.dims, num_classes, 1)
        self.reader = MemoryReader(p.dims, p.attention_dims)
        self.fuse = conv_bn_relu(2 * p.dims, p.dims)
        self.stage2 = nn.Conv2d(p.dims, num_classes, 1)
        self.memory = ClassMemory(num_classes, p.dims)
        crop = cfg.data.crop_size  # one stride per run: that of the training crops
        self.stride = p.feature_stride or (auto_stride(crop, crop) if crop else 0)
        self._update_from: torch.Tensor | None = None  # this step's features (after_step)
        if not p.update:  # the ablation: a fixed random memory, same parameters otherwise
            gen = torch.Generator().manual_seed(cfg.train.seed)
            self.memory.memory.copy_(F.normalize(torch.randn(num_classes, p.dims, generator=gen)))
            self.memory.filled.fill_(True)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.net.decoder(self.net.encoder(images))
        feats = feats[-1] if isinstance(feats, (list, tuple)) else feats
        target = self.stride or auto_stride(*images.shape[-2:])
        stride = images.shape[-1] // feats.shape[-1]
        if stride < target:
            feats = F.avg_pool2d(feats, target // stride)
        return self.project(feats)

    def heads(self, feats: torch.Tensor):
        logits1 = self.stage1(feats)
        probs = logits1.float().softmax(1)
        if self.params.aggregation == "hard":
            probs = F.one_hot(probs.argmax(1), probs.shape[1]).permute(0, 3, 1, 2).float()
        memory = self.memory.memory.clone()  # the in-place update below must not touch the graph
        context = self.reader(feats, probs.to(feats.dtype), memory.to(feats.dtype))
        logits2 = self.stage2(self.fuse(torch.cat([feats, context], 1)))
        return logits1, logits2

    def forward(self, batch: Batch, info: StepInfo) -> dict[str, torch.Tensor]:
        feats = self.features(batch.images)
        logits1, logits2 = self.heads(feats)
        size = batch.images.shape[-2:]
        up = lambda x: F.interpolate(x, size=size, mode="bilinear", align_corners=False)  # noqa: E731
        losses = {
            "stage1": cross_entropy(up(logits1), batch.masks, self.ignore_index),
            "stage2": cross_entropy(up(logits2), batch.masks, self.ignore_index),
            "consistency": self.consistency_loss(),
        }
        p = self.params
        losses["loss"] = (
            p.stage1_weight * losses["stage1"]
            + p.stage2_weight * losses["stage2"]
            + p.consistency_weight * losses["consistency"]
        )
        self._update_from = feats.detach()  # the memory moves after the optimiser step
        return losses

    def after_step(self, batch: Batch, info: StepInfo) -> dict[str, float]:
        """The memory update, from this step's features and labels (all ranks together)."""
        feats, self._update_from = self._update_from, None
        p = self.params
        if p.update:
            momentum = p.momentum * (info.lr_scale if p.momentum_follows_lr else 1.0)
            self.update_memory(feats, batch.masks, momentum)
        return {}

    def consistency_loss(self) -> torch.Tensor:
        """The stage-2 classifier must classify each (filled) memory entry as its own class."""
        entries = self.memory.memory.clone()[:, :, None, None]
        logits = self.stage2(entries.to(self.stage2.weight.dtype))[:, :, 0, 0]
        target = torch.arange(len(entries), device=entries.device)
        per_class = F.cross_entropy(logits.float(), target, reduction="none")
        filled = self.memory.filled.float()
        return (per_class * filled).sum() / filled.sum().clamp_min(1.0)

    @torch.no_grad()
    def update_memory(self, feats: torch.Tensor, masks: torch.Tensor, momentum: float) -> None:
        labels = downsample_labels(masks, feats.shape[-2:]).flatten()
        flat = feats.float().permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
        weights = update_weights(flat, labels, self.memory, self.ignore_index)
        sums, totals = class_sums(flat, labels, self.num_classes, weights, self.ignore_index)
        self.memory.update(*global_class_sums(sums, totals), momentum)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        _, logits2 = self.heads(self.features(images))
        return F.interpolate(logits2, size=images.shape[-2:], mode="bilinear", align_corners=False)

    def tb_images(self) -> dict[str, np.ndarray]:
        """The memory's pairwise cosine similarities as a heat map (red +1, blue -1)."""
        m = F.normalize(self.memory.memory.float(), dim=1)
        sim = (m @ m.T).clamp(-1, 1).cpu().numpy()
        rgb = np.stack([np.clip(sim, 0, 1), 1 - np.abs(sim), np.clip(-sim, 0, 1)], -1)
        cell = max(1, 128 // len(sim))
        return {
            "mcibi/memory_cosine": np.kron(rgb, np.ones((cell, cell, 1)))
            .__mul__(255)
            .astype(np.uint8)
        }
