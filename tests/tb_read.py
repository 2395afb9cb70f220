"""Read TensorBoard event files back (what a user would see in the UI)."""

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
from tensorboard.plugins.hparams import plugin_data_pb2

SESSION_START = "_hparams_/session_start_info"


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
    return _session_hparams(acc.PluginTagToContent("hparams")[SESSION_START])


def sessions(root: Path) -> dict[str, list[dict[str, object]]]:
    """Every HParams session start in the event files under `root`, by run (the folder, as
    TensorBoard names it: relative to `root`): the hyperparameters of each."""
    out: dict[str, list[dict[str, object]]] = {}
    for path in sorted(root.rglob("*tfevents*")):
        run = path.parent.relative_to(root).as_posix()
        for event in LegacyEventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag == SESSION_START:
                    content = value.metadata.plugin_data.content
                    out.setdefault(run, []).append(_session_hparams(content))
    return out


def _session_hparams(raw: bytes) -> dict[str, object]:
    info = plugin_data_pb2.HParamsPluginData.FromString(raw).session_start_info
    out: dict[str, object] = {}
    for name, value in info.hparams.items():
        kind = value.WhichOneof("kind")
        out[name] = getattr(value, kind)
    return out
