"""All-gather helpers for contrastive losses across data-parallel ranks.

``gather_with_grad`` is the one that matters for correctness: rank r's loss depends on every
rank's embeddings, so the backward must send each rank the SUM of all ranks' gradients for
its own rows. A no-grad gather that re-inserts the local slice (SimCSE's trainer) only keeps
the local loss's share of that sum, which scales and tilts the gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world_size) of the default process group, (0, 1) when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# torch 2.13 renamed the flat all-gather (the old name warns); older torch only has the old one.
_ALL_GATHER_INTO = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER_INTO = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty((dist.get_world_size() * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    _ALL_GATHER_INTO(out, x)
    return out


def _reduce_scatter_sum(grad: torch.Tensor, rows: int) -> torch.Tensor:
    """This rank's rows of the sum of ``grad`` over ranks."""
    rank, world_size = world()
    grad = grad.contiguous()
    if dist.get_backend() == "nccl":
        out = torch.empty((rows, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
        _REDUCE_SCATTER_INTO(out, grad)
        return out
    # gloo has no reduce_scatter: an all_reduce moves W times more bytes, fine on CPU.
    dist.all_reduce(grad)
    return grad[rank * rows : (rank + 1) * rows]


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rows = x.shape[0]
        return _all_gather_cat(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _reduce_scatter_sum(grad, ctx.rows)


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` [n, ...] from all ranks in rank order -> [W*n, ...], differentiable.

    Every rank must pass the same shape. With one process this returns ``x`` itself.
    """
    if world()[1] == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate detached ``x`` from all ranks in rank order; ``x`` itself for one process."""
    if world()[1] == 1:
        return x.detach()
    return _all_gather_cat(x.detach())


def all_ranks_agree(flag: bool, device: torch.device | str = "cpu", how: str = "any") -> bool:
    """Joint decision: True if ``flag`` holds on any (``how='any'``) or all ranks."""
    if world()[1] == 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if how == "any" else dist.ReduceOp.MIN)
    return bool(t.item() > 0)


def any_rank(flags: torch.Tensor) -> list[bool]:
    """Joint decision on several flags at once: flag i holds if it holds on any rank.

    ``flags``: a small 1-d bool/float tensor on the communication device. One all-reduce
    and ONE device-to-host read, whatever the number of flags (a training step's only sync)."""
    t = flags.float().reshape(-1)
    if world()[1] > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    bits = torch.pow(2.0, torch.arange(t.numel(), device=t.device, dtype=torch.float32))
    code = int(((t > 0).float() * bits).sum())
    return [bool(code >> i & 1) for i in range(t.numel())]
