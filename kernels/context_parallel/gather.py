"""A differentiable all-gather for the small per-rank summaries that the
recurrent mixers exchange (linear-attention states, RAT chunk states).

Every rank contributes x and receives the stack of all ranks' x. Each rank then
uses the pieces it needs, so the loss of every rank may depend on the piece of
every other rank: the gradient of rank r's piece is the SUM over ranks of their
gradients with respect to it, i.e. the adjoint of an all-gather is a
reduce-scatter.

That reduce-scatter is a collective, so it must run on EVERY rank, also on one
whose output happens not to use the gathered pieces (rank 0 of the contiguous
layout reads no earlier state, yet the others need its gradients): `depend_on`
ties the gathered tensor into such an output's graph.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from loom.kernels.context_parallel.layout import CPContext

__all__ = ["all_gather", "all_gather_nograd", "depend_on"]


def all_gather_nograd(x: torch.Tensor, cp: CPContext) -> torch.Tensor:
    """(...) on every rank -> (cp, ...) stacked in group-rank order. Not differentiable."""
    parts = [torch.empty_like(x) for _ in range(cp.world_size)]
    dist.all_gather(parts, x.contiguous(), group=cp.group)
    return torch.stack(parts)


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cp: CPContext):
        ctx.cp = cp
        return all_gather_nograd(x, cp)

    @staticmethod
    def backward(ctx, grad):
        cp = ctx.cp
        grad = grad.contiguous()  # (cp, ...)
        out = grad.new_empty(grad.shape[1:])
        dist.reduce_scatter_single(out.view(-1), grad.view(-1), group=cp.group)
        return out, None


def all_gather(x: torch.Tensor, cp: CPContext) -> torch.Tensor:
    """Differentiable all-gather: (...) on every rank -> (cp, ...) in group-rank order.

    Backward reduce-scatters the (cp, ...) gradient (sums every rank's gradient of
    piece r and returns it to rank r). A collective: every rank of cp.group calls it.
    Example: states = all_gather(local_state, cp)  # (B, H, K, V) -> (cp, B, H, K, V)
    """
    return _AllGather.apply(x, cp)


class _DependOn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, *tensors):
        ctx.shapes = [(t.shape, t.dtype, t.device) for t in tensors]
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        return (grad, *(torch.zeros(s, dtype=d, device=dev) for s, d, dev in ctx.shapes))


def depend_on(out: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
    """`out` unchanged, but its backward also reaches `tensors` (with zero gradient), so
    the collective backward of an `all_gather` runs on this rank even if `out` does not
    read the gathered values. Example: o = depend_on(o, all_gather(states, cp))"""
    return _DependOn.apply(out, *tensors)
