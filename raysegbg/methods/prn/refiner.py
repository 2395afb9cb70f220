"""prn's refiner: an smp encoder/decoder over the base probability map with a global head,
one local head per patch size and optional threshold heads; its training-time bias offsets
and the threshold heads' loss."""

from __future__ import annotations

import dataclasses
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from raysegbg.config import Config
from raysegbg.methods.patch_thresholds import (
    WHOLE_IMAGE,
    iou_of_counts,
    patch_counts,
    threshold_grid,
)
from raysegbg.models import build_model


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


def foreground_logit(logits: torch.Tensor) -> torch.Tensor:
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


def combine(logits: dict[int, torch.Tensor], head: int | None) -> torch.Tensor:
    """(B, 1, H, W) probability of one head, or the mean over heads when `head` is None."""
    if head is not None:
        return logits[head].float().sigmoid()
    return torch.stack([v.float().sigmoid() for v in logits.values()]).mean(0)


def bias_offsets(ids: list[str], step: int, seed: int, sigma: float, patch: int,
                 size: tuple[int, int], device: torch.device) -> torch.Tensor:  # fmt: skip
    """(B, 1, H, W) `bias_augment` logit offsets: per image, one normal draw (std `sigma`) per
    `patch`-sized tile plus one for the whole image, seeded by (run seed, step, image id), so
    a resumed or multi-worker run draws the same."""
    h, w = size
    grid = (-(-h // patch), -(-w // patch))
    draws = []
    for image_id in ids:
        gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{step}:{image_id}".encode()))
        draws.append(torch.randn(1, 1 + grid[0] * grid[1], generator=gen))
    draws = torch.cat(draws).to(device) * sigma
    field = draws[:, 1:].view(-1, 1, *grid)
    field = F.interpolate(field, size=(grid[0] * patch, grid[1] * patch), mode="nearest")
    return field[..., :h, :w] + draws[:, :1, None, None]


def threshold_loss(prob: torch.Tensor, masks: torch.Tensor, patch: int, scores: torch.Tensor,
                   steps: int, ignore_index: int) -> torch.Tensor:  # fmt: skip
    """1 - the expected IoU of every patch when its threshold is drawn from the head's
    softmax over the grid; patches weighted by the pixels at stake in them (their largest
    union over thresholds), so empty or settled patches weigh nothing."""
    grid = threshold_grid(steps, prob.device)
    valid, fg = masks != ignore_index, masks == 1
    correct, union = patch_counts(prob[:, 0], fg, valid, patch, grid)
    iou, weight = iou_of_counts(correct, union), union.amax(-1).float()
    expected = (scores.float().softmax(1).permute(0, 2, 3, 1) * iou.float()).sum(-1)
    return 1 - (weight * expected).sum() / weight.sum().clamp_min(1)
