"""What one training step reads: a rank's share of each stream's global batch."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass
class Batch:
    """One rank's share of a global batch of one stream, plus the other streams' shares.

    `masks` hold the ignore index where a row has no mask (or the stream hides masks);
    `image_labels` is a (B, num_classes) 0/1 tensor when the stream carries image-level
    labels; `unlabeled` is the step's batch of the method's unlabeled stream, if it has one.
    """

    images: torch.Tensor  # (B, C, H, W) float
    masks: torch.Tensor  # (B, H, W) long
    ids: list[str]
    image_labels: torch.Tensor | None = None
    unlabeled: Batch | None = field(default=None, repr=False)

    def pin_memory(self) -> Batch:
        """The same batch in page-locked memory (what torch's DataLoader calls with
        pin_memory=True), so `to(cuda)` copies without blocking."""
        pin = lambda t: None if t is None else t.pin_memory()  # noqa: E731
        return replace(
            self, images=pin(self.images), masks=pin(self.masks),
            image_labels=pin(self.image_labels),
            unlabeled=None if self.unlabeled is None else self.unlabeled.pin_memory(),
        )  # fmt: skip

    def to(self, device: torch.device) -> Batch:
        """The same batch on `device` (every stream)."""
        if device.type == "cpu":
            return self
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return replace(
            self, images=move(self.images), masks=move(self.masks),
            image_labels=move(self.image_labels),
            unlabeled=None if self.unlabeled is None else self.unlabeled.to(device),
        )  # fmt: skip


@dataclass(frozen=True)
class Stream:
    """A stream of training rows that a method reads at every step.

    rows: `labeled` (rows with a mask), `unlabeled` (rows without one) or `all`.
    batch_size: global rows per step (0: `train.batch_size`), split evenly over workers.
    masks: False hides every mask (weak supervision must not see them).
    image_labels: attach each row's image-level labels as a multi-hot tensor.
    labeled_fraction: below 1, only that share of the rows with a mask (a fixed hash of the
        id) counts as labeled; the others count as unlabeled, their masks hidden.
    hidden_masks: the unlabeled rows carry their hidden masks after all (ground truth for a
        diagnostic, never for training).
    """

    rows: str = "labeled"
    batch_size: int = 0
    masks: bool = True
    image_labels: bool = False
    labeled_fraction: float = 1.0
    hidden_masks: bool = False
