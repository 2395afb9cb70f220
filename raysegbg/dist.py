"""Small torch.distributed helpers that also work in a single process (world size 1)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no gradient); returns `t` for chaining."""
    if is_dist():
        dist.all_reduce(t)
    return t


def global_mean(local_sum: torch.Tensor, local_count: torch.Tensor) -> torch.Tensor:
    """A loss that equals sum/count over the *global* batch once DDP averages gradients.

    DDP divides gradients by the world size, so each rank returns its share of the global
    mean times W; then W workers reproduce one worker on the same global batch exactly, even
    when ranks hold different numbers of valid (non-ignored) pixels.
    """
    total = all_reduce_sum(local_count.detach().clone().float())
    return local_sum * world_size() / total.clamp_min(1.0)


def barrier() -> None:
    if is_dist():
        dist.barrier()


def broadcast_object(obj: object, src: int = 0) -> object:
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: object, dst: int = 0) -> list[object] | None:
    """Every rank's `obj`, in rank order, on rank `dst` (None elsewhere)."""
    if not is_dist():
        return [obj]
    out = [None] * world_size() if rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


class _SumOverRanks(torch.autograd.Function):
    """all-reduce(sum) whose gradient is again an all-reduce(sum): the gradient of
    Σ_r f_r(x_r) with respect to one rank's contribution sums every rank's upstream grad."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:  # noqa: D102
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def differentiable_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    """Sum over ranks that gradients flow through (identity in a single process).

    Pass a dedicated `group` when it runs inside a DDP backward: DDP's own gradient
    all-reduces are in flight on the default group at the same time.
    """
    return _SumOverRanks.apply(x, group) if is_dist() else x


def new_group():
    """A second process group over all ranks (every rank must call this, in the same order)."""
    return dist.new_group(backend=dist.get_backend()) if is_dist() else None
