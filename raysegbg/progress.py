"""The console lines of a run (rank 0): one per epoch, and within a long epoch one every
`logging.progress_every` seconds.

Ray forwards a worker's output line by line, so a carriage-return progress bar would arrive
as nothing or as garbage: progress is a plain line, written at most every few seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import SupportsFloat


def progress_line(m: dict[str, float], epochs: int) -> str:
    """The end-of-epoch line (a one-shot stage trains nothing: no loss)."""
    nan = float("nan")
    loss = f"loss {m['train/loss']:.4f}  " if "train/loss" in m else ""
    return (
        f"epoch {int(m['epoch']):>3}/{epochs}  {loss}"
        f"val miou {m.get('val/miou', nan):.4f}  fg_dice {m.get('val/fg_dice', nan):.4f}  "
        f"fpr {m.get('val/fpr', nan):.4f}  {m['perf/images_per_s']:.0f} img/s  "
        f"{m['perf/epoch_s']:.1f}s"
    )


class StepProgress:
    """Lines within an epoch: steps done of the epoch's, running mean loss, images/s and the
    time left until the epoch's training ends. Silent for epochs shorter than `every`."""

    def __init__(
        self, log: Callable[[str], None], every: float, head: str, steps: int, batch: int,
        clock: Callable[[], float] = time.perf_counter,
    ):  # fmt: skip
        self.log, self.every, self.head, self.steps, self.batch = log, every, head, steps, batch
        self.clock = clock
        self.start = clock()
        self.due = self.start + every

    def update(self, done: int, loss_sum: SupportsFloat | None) -> None:
        """After step `done` (1-based) of the epoch; `loss_sum`: this rank's summed loss so
        far (a tensor is read only when a line is due: one device sync per line)."""
        if self.every <= 0 or done >= self.steps:  # the epoch line follows the last step
            return
        now = self.clock()
        if now < self.due:
            return
        self.due = now + self.every
        elapsed = max(now - self.start, 1e-9)
        loss = float(loss_sum) / done if loss_sum is not None else float("nan")
        left = (self.steps - done) * elapsed / done
        self.log(
            f"{self.head}  step {done}/{self.steps} ({100 * done // self.steps}%)  "
            f"loss {loss:.4f}  {done * self.batch / elapsed:.0f} img/s  ETA {duration(left)}"
        )


def duration(seconds: float) -> str:
    """`42s`, `3m05s`, `1h02m`."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
