"""rrn's region-level parts: the discriminator that scores each region of a prediction, its
targets (the region's accuracy on labeled images), the keep / weight maps of the pseudo-label
loss, and CutMix whose boxes depend only on (seed, step, image id), never on the rank."""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from raysegbg.dist import global_mean
from raysegbg.methods.losses import upcast


class RegionDiscriminator(nn.Module):
    """Fully convolutional: (image, class probabilities) -> one logit per region × region
    cell, the log-odds that the prediction is right there. log2(region) strided 4×4 convs (no
    normalisation or dropout, so W workers compute what one does), then a 3×3 conv that looks
    at neighbouring regions."""

    def __init__(self, in_channels: int, num_classes: int, region: int, width: int):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels + num_classes
        for i in range(int(math.log2(region))):
            out = width * 2 ** min(i, 3)
            layers += [nn.Conv2d(channels, out, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            channels = out
        layers.append(nn.Conv2d(channels, 1, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """(B, H/region, W/region) logits."""
        return self.net(torch.cat([images, probs.to(images.dtype)], 1))[:, 0]


def region_accuracy(pred: torch.Tensor, masks: torch.Tensor, region: int, ignore: int):
    """(accuracy, weight) per region of (B, H, W) class maps: the share of a region's labelled
    pixels that `pred` gets right (0 where none is labelled), and the share that is labelled."""
    valid = (masks != ignore).unsqueeze(1).float()
    correct = (pred == masks).unsqueeze(1).float() * valid
    weight = F.avg_pool2d(valid, region)[:, 0]
    accuracy = F.avg_pool2d(correct, region)[:, 0] / weight.clamp_min(1e-12)
    return accuracy, weight


def discriminator_loss(logits: torch.Tensor, accuracy: torch.Tensor, weight: torch.Tensor):
    """Binary cross entropy of each region's score against its accuracy, weighted by its
    labelled share, averaged over the global batch's labelled pixels (rank-linear)."""
    bce = F.binary_cross_entropy_with_logits(upcast(logits), accuracy, reduction="none")
    return global_mean((bce * weight).sum(), weight.sum())


def kept(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Regions whose score logit is above the threshold's: 0 keeps every region (its logit is
    -inf), 1 drops every region (+inf), exactly, whatever the scores."""
    return scores > torch.logit(torch.tensor(float(threshold), dtype=scores.dtype))


def agreement(labels1: torch.Tensor, labels2: torch.Tensor, region: int) -> torch.Tensor:
    """Per region, the share of pixels where the two networks' pseudo-labels agree."""
    return F.avg_pool2d((labels1 == labels2).unsqueeze(1).float(), region)[:, 0]


def to_pixels(regions: torch.Tensor, region: int) -> torch.Tensor:
    """(B, h, w) per-region values -> (B, h·region, w·region), each region's value repeated."""
    return regions.repeat_interleave(region, 1).repeat_interleave(region, 2)


def cutmix_boxes(ids: list[str], seed: int, step: int, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) 0/1: one box per image covering 25-50 % of it, with a random aspect ratio,
    drawn from (seed, step, image id) only: every rank draws what a single worker would."""
    h, w = size
    boxes = torch.zeros(len(ids), h, w)
    for j, image_id in enumerate(ids):
        key = zlib.crc32(f"{seed}:{step}:{image_id}".encode())
        u = torch.rand(4, generator=torch.Generator().manual_seed(key)).tolist()
        area, aspect = 0.25 + 0.25 * u[0], math.exp(math.log(2) * (2 * u[1] - 1))
        bh = min(h, max(1, round(h * math.sqrt(area * aspect))))
        bw = min(w, max(1, round(w * math.sqrt(area / aspect))))
        top, left = int(u[2] * (h - bh + 1)), int(u[3] * (w - bw + 1))
        boxes[j, top : top + bh, left : left + bw] = 1
    return boxes


def partners(n: int) -> torch.Tensor:
    """CutMix partner of each image: its neighbour in pairs (0, 1), (2, 3), ...; an odd last
    image keeps itself. Pairs never straddle ranks when each rank's share is even."""
    index = torch.arange(n) ^ 1
    index[index >= n] = n - 1
    return index


def mix(x: torch.Tensor, boxes: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
    """Each image with its partner's content pasted inside its box ((B, ...) with (B, H, W))."""
    b = boxes.to(x.device)
    b = b.unsqueeze(1) if x.dim() == 4 else b
    if x.dtype in (torch.long, torch.bool):
        return torch.where(b.bool(), x[partner], x)
    return x * (1 - b.to(x.dtype)) + x[partner] * b.to(x.dtype)
