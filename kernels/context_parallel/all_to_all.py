"""The Ulysses all-to-all: trade a sequence shard for a head shard and back
(the building block of kernels/attention/ulysses.py and kernels/s2/cp.py).

Legend: B batch, T full length, L = T / cp tokens per rank, H query heads,
G key/value heads, N heads of the tensor being moved, K head dim.

    x (B, L, N, K) --seq_to_head--> (B, T, N/cp, K)   rank j gets heads [j*N/cp, (j+1)*N/cp)
    y (B, T, N/cp, K) --head_to_seq--> (B, L, N, K)

Head rule of the attention ops that use it (`ulysses_kv_heads`): H % cp == 0 is
required. Key/value heads are sharded like the query heads when G % cp == 0; when G < cp and cp % G == 0 every K/V head is
replicated cp / G times first (rank j's query heads all use original K/V head
j * G // cp, so each rank receives exactly the one head it needs); any other
(H, G, cp) raises a ValueError.

The all-to-all output lists shards in rank order; with the zigzag layout that is
not position order, so the gathered sequence is permuted into true order after
seq_to_head and back before head_to_seq (an index_select each way, differentiable).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from loom.kernels.context_parallel.layout import CPContext, rank_order, true_order

__all__ = ["seq_to_head", "head_to_seq", "ulysses_kv_heads"]


class _AllToAll(torch.autograd.Function):
    """all_to_all_single over dim 0 with equal splits: x[j] goes to rank j.

    It is a permutation of the blocks (block j of rank r <-> block r of rank j),
    so its adjoint is the same exchange: backward all-to-alls the gradient.
    """

    @staticmethod
    def forward(ctx, x, cp: CPContext):
        ctx.cp = cp
        x = x.contiguous()
        out = torch.empty_like(x)  # contiguous too: empty_like keeps x's strides
        dist.all_to_all_single(out, x, group=cp.group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.cp.group)
        return out, None


def seq_to_head(x: torch.Tensor, cp: CPContext) -> torch.Tensor:
    """(B, L, N, K) sequence shard -> (B, T, N/cp, K) head shard in position order."""
    B, L, N, K = x.shape
    n = cp.world_size
    x = x.reshape(B, L, n, N // n, K).permute(2, 0, 1, 3, 4)  # (cp dst, B, L, N/cp, K)
    y = _AllToAll.apply(x, cp)  # (cp src, B, L, N/cp, K)
    y = y.permute(1, 0, 2, 3, 4).reshape(B, n * L, N // n, K)  # rank-order sequence
    order = true_order(n * L, cp, x.device)
    return y if order is None else y.index_select(1, order)


def head_to_seq(y: torch.Tensor, cp: CPContext) -> torch.Tensor:
    """(B, T, N/cp, K) head shard in position order -> (B, L, N, K) sequence shard."""
    B, T, Nl, K = y.shape
    n = cp.world_size
    order = rank_order(T, cp, y.device)
    if order is not None:
        y = y.index_select(1, order)
    y = y.reshape(B, n, T // n, Nl, K).permute(1, 0, 2, 3, 4)  # (cp dst, B, L, N/cp, K)
    x = _AllToAll.apply(y, cp)  # (cp src = head group, B, L, N/cp, K)
    return x.permute(1, 2, 0, 3, 4).reshape(B, T // n, n * Nl, K)


def ulysses_kv_heads(H: int, G: int, cp: int) -> int:
    """K/V heads after replication for Ulysses at degree cp (see the module rule)."""
    if H % cp:
        raise ValueError(f"ulysses needs the query heads H={H} divisible by cp={cp}; use cp_impl=ring")
    if G % cp == 0:
        return G
    if cp % G == 0:
        return cp
    raise ValueError(f"ulysses needs the key/value heads G={G} to be a multiple or a divisor of cp={cp}; "
                     f"use cp_impl=ring")
