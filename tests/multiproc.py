"""Run a function on W plain torch processes joined by a gloo process group (no Ray)."""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, out: str, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        Path(out, f"{rank}.pkl").write_bytes(pickle.dumps(result))
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, *args) -> list:
    """fn(rank, world, *args) on every rank; returns the per-rank results in rank order."""
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_entry, args=(world, _free_port(), out, fn, args), nprocs=world, join=True)
        return [pickle.loads(Path(out, f"{r}.pkl").read_bytes()) for r in range(world)]
