"""Read TensorBoard event files back (what a user would see in the UI)."""

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def tags(logdir: Path) -> dict[str, list[str]]:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc.Tags()


def scalar_steps(logdir: Path, tag: str) -> list[int]:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]
