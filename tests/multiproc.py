"""Run a function on W plain torch processes joined by a gloo process group (no Ray)."""

from __future__ import annotations

import pickle
import tempfile
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world: int, out: str, fn, args) -> None:
    import torch

    torch.set_num_threads(1)
    # rendezvous through a file in the run's own temp folder: a TCP port picked free beforehand
    # can be taken by another process (Ray's, in the same test) before rank 0 listens on it
    store = f"file://{Path(out, 'rendezvous')}"
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        Path(out, f"{rank}.pkl").write_bytes(pickle.dumps(result))
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, *args) -> list:
    """fn(rank, world, *args) on every rank; returns the per-rank results in rank order."""
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_entry, args=(world, out, fn, args), nprocs=world, join=True)
        return [pickle.loads(Path(out, f"{r}.pkl").read_bytes()) for r in range(world)]
