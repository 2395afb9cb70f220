"""prn's base model from another run, and the rows TensorBoard shows of what the stages did."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from raysegbg import storage
from raysegbg.checkpoint import load_state, pick_checkpoint, run_config
from raysegbg.errors import RaysegbgError
from raysegbg.tb import colorize, image_to_uint8


def load_base(base: nn.Module, path: str, score: str) -> None:
    """Base weights from a run or checkpoint folder (a local path or an object-store URI): a
    prn run's final base (its last checkpoint) or a baseline run's best network."""
    folder = storage.location(path)
    if storage.is_file(storage.join(folder, "config.yaml")):  # a run folder
        prn = run_config(folder).method.name == "prn"
        folder = pick_checkpoint(folder, "last" if prn else "best", score)
    state = load_state(folder)["method"]
    prefixes = ("base.", "net.")  # a prn or a baseline run
    weights = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(prefixes)}
    try:
        base.load_state_dict(weights)
    except RuntimeError as exc:
        raise RaysegbgError(
            f"method.prn.base_checkpoint {path} does not fit the base model "
            f"({str(exc).splitlines()[0]}): use a binary baseline or prn run with the same "
            "model.* settings"
        ) from None


def tb_rows(shown: dict[str, torch.Tensor], ignore_index: int) -> np.ndarray:
    """One row per shown image: image | base at 0.5 | threshold map | pseudo-label | refined |
    truth, with white separators."""
    s = {k: v.cpu() for k, v in shown.items()}
    rows = []
    for j in range(len(s["image"])):
        grey = (s["thresholds"][j].numpy() * 255).round().astype(np.uint8)
        parts = [
            image_to_uint8(s["image"][j]),
            colorize((s["base"][j] >= 0.5).numpy().astype(np.uint8)),
            np.repeat(grey[:, :, None], 3, axis=2),
            colorize(s["pseudo"][j].numpy(), ignore_index),
            colorize((s["refined"][j] >= 0.5).numpy().astype(np.uint8)),
            colorize(s["truth"][j].numpy(), ignore_index),
        ]
        sep = np.full((parts[0].shape[0], 2, 3), 255, np.uint8)
        rows.append(np.concatenate([x for part in parts for x in (part, sep)][:-1], axis=1))
    return np.concatenate(rows, axis=0)
