"""Read TensorBoard event files back (what a user would see in the UI)."""

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2


def tags(logdir: Path) -> dict[str, list[str]]:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc.Tags()


def scalar_steps(logdir: Path, tag: str) -> list[int]:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def hparams_of(logdir: Path) -> dict[str, object]:
    """The hyperparameters recorded for the HParams dashboard (last session in the dir)."""
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    raw = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(raw).session_start_info
    out: dict[str, object] = {}
    for name, value in info.hparams.items():
        kind = value.WhichOneof("kind")
        out[name] = getattr(value, kind)
    return out
