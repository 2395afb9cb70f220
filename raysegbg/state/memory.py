"""Feature memories updated identically on every rank.

The rule that makes W workers equal one worker: aggregate per-class sums and weights over all
ranks (one all-reduce inside the step) *before* the single update every rank applies.
Averaging after local updates is wrong: a class seen on 1 of W ranks would get 1/W of its
update.
"""

from __future__ import annotations

import torch
import torch.distributed as tdist
from torch import nn

from raysegbg import dist


def class_sums(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, weights=None, ignore=255
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class weighted feature sums (C×D) and weight totals (C) of this rank's pixels.

    features: (N, D); labels: (N,) class ids (ignore_index skipped); weights: (N,) or None.
    """
    keep = labels != ignore
    f, y = features[keep].float(), labels[keep].long()
    w = torch.ones_like(y, dtype=f.dtype) if weights is None else weights[keep].float()
    sums = torch.zeros(num_classes, f.shape[1], device=f.device).index_add_(0, y, f * w[:, None])
    totals = torch.zeros(num_classes, device=f.device).index_add_(0, y, w)
    return sums, totals


def global_class_sums(sums: torch.Tensor, totals: torch.Tensor):
    """Sum both over ranks with one all-reduce (a no-op in a single process)."""
    packed = dist.all_reduce_sum(torch.cat([sums, totals[:, None]], dim=1))
    return packed[:, :-1], packed[:, -1]


class ClassMemory(nn.Module):
    """One vector per class, learned over the whole dataset (MCIBI's memory).

    update: entry <- (1 - m) * entry + m * mean(features of that class in the global batch);
    an entry never filled takes the first mean as is. Buffers, so checkpoints hold it.
    """

    def __init__(self, num_classes: int, dims: int):
        super().__init__()
        self.register_buffer("memory", torch.zeros(num_classes, dims))
        self.register_buffer("filled", torch.zeros(num_classes, dtype=torch.bool))
        self.register_buffer("version", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, sums: torch.Tensor, totals: torch.Tensor, momentum: float) -> None:
        """Apply global (already all-reduced) per-class sums; identical on every rank."""
        seen = totals > 0
        mean = sums / totals.clamp_min(1e-12)[:, None]
        first = seen & ~self.filled
        again = seen & self.filled
        self.memory[first] = mean[first]
        self.memory[again] = (1 - momentum) * self.memory[again] + momentum * mean[again]
        self.filled |= seen
        self.version += 1

    @torch.no_grad()
    def update_from(self, features, labels, momentum: float, weights=None, ignore=255) -> None:
        """The whole rule in one call: local sums -> all-reduce -> one identical update."""
        sums, totals = class_sums(features, labels, self.memory.shape[0], weights, ignore)
        self.update(*global_class_sums(sums, totals), momentum)


def gather_rank_ordered(items: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's (n_r, ...) tensor in rank order, n_r may differ."""
    if not dist.is_dist():
        return items
    world = dist.world_size()
    sizes = [torch.zeros(1, dtype=torch.long, device=items.device) for _ in range(world)]
    tdist.all_gather(sizes, torch.tensor([items.shape[0]], device=items.device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *items.shape[1:]), dtype=items.dtype, device=items.device)
    padded[: items.shape[0]] = items
    parts = [torch.empty_like(padded) for _ in range(world)]
    tdist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)])


class RingBank(nn.Module):
    """A ring buffer of N feature vectors (FBR's NROI bank), filled in rank order.

    `push` gathers every rank's new entries, so all ranks write the same rows in the same
    order and hold identical banks.
    """

    def __init__(self, size: int, dims: int):
        super().__init__()
        self.register_buffer("bank", torch.zeros(size, dims))
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("cursor", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("version", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def push(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        if labels is None:
            labels = torch.zeros(features.shape[0], dtype=torch.long, device=features.device)
        packed = torch.cat([features.float(), labels.float()[:, None]], dim=1)
        rows = gather_rank_ordered(packed)[-self.bank.shape[0] :]
        n, size = rows.shape[0], self.bank.shape[0]
        index = (self.cursor + torch.arange(n, device=rows.device)) % size
        self.bank[index] = rows[:, :-1]
        self.labels[index] = rows[:, -1].long()
        self.cursor.copy_((self.cursor + n) % size)
        self.count.copy_(torch.clamp(self.count + n, max=size))
        self.version += 1

    def valid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The filled rows (and their labels)."""
        n = int(self.count)
        return self.bank[:n], self.labels[:n]
