"""The halo exchange: each local chunk of a sharded sequence with the tokens
just before it, from whichever ranks hold them (the building block of
kernels/attention/halo.py, causal convs and sliding-window tiles).

Legend: B batch, T full length, L = T / cp tokens per rank, C chunk length
(L contiguous, L / 2 zigzag), W window, G key/value heads, K head dim,
h halo length of one chunk (min(W, chunk start)).

A query at global position p sees keys [p - W, p]. So a chunk starting at
position a needs, besides its own keys, the W keys [a - W, a) before it: the
halo. Both layouts are handled, because a hybrid model shards its hidden states
one way for all layers:
    contiguous: rank r's halo is the tail of rank r-1 (one message per rank).
    zigzag:     chunk r's halo is the tail of chunk r-1 (rank r-1's first chunk),
                chunk 2cp-1-r's halo the tail of chunk 2cp-2-r (rank r+1's second
                chunk, or rank cp-1's own first chunk): two messages per rank.
W longer than a chunk is allowed: the halo then spans several preceding chunks,
possibly on several ranks, and each rank sends each piece that another rank
needs. The plan of who sends what is a pure function of (T, cp, layout, W), so
both ends of every message derive it without any handshake.

Per local chunk, [halo; own chunk] are contiguous positions ending at the
chunk's end. The exchange is an autograd Function whose backward sends each
halo's gradient back to its owner, which adds it into the gradient of its own rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from loom.kernels.context_parallel.layout import CPContext, check_seq_len, chunk_owner, chunk_ranges
from loom.kernels.context_parallel.p2p import exchange, wait

__all__ = ["halo_extend", "sequence_halo", "halo_plan", "halo_chunks", "HaloPiece"]


@dataclass(frozen=True)
class HaloPiece:
    """Keys at shard rows [src_lo, src_hi) of rank `src`, needed before local chunk
    `dst_chunk` of rank `dst`. `tag` is the piece's index in the plan."""

    tag: int
    src: int
    src_lo: int
    src_hi: int
    dst: int
    dst_chunk: int


def halo_plan(T: int, cp: int, layout: str, window: int) -> list[HaloPiece]:
    """Every halo piece of every rank, ordered by (dst, dst_chunk, position)."""
    n_chunks = 2 * cp if layout == "zigzag" else cp
    C = T // n_chunks
    plan = []
    for dst in range(cp):
        for i, (a, _) in enumerate(chunk_ranges(T, cp, dst, layout)):
            lo = max(0, a - window)
            for c in range(lo // C, (a - 1) // C + 1) if lo < a else ():
                start, end = max(lo, c * C), min(a, (c + 1) * C)
                src, j = chunk_owner(c, cp, layout)
                off = j * C - c * C
                plan.append(HaloPiece(len(plan), src, start + off, end + off, dst, i))
    return plan


def _extend(x: torch.Tensor, plan: list[HaloPiece], cp: CPContext, C: int) -> list[torch.Tensor]:
    """Per local chunk i: cat(halo pieces, own chunk) along dim 1 of x (B, L, ...)."""
    r = cp.rank
    sends = [(x[:, p.src_lo:p.src_hi], p.dst, p.tag) for p in plan if p.src == r and p.dst != r]
    incoming = [p for p in plan if p.dst == r and p.src != r]
    bufs = {p.tag: x.new_empty((x.shape[0], p.src_hi - p.src_lo, *x.shape[2:])) for p in incoming}
    wait(exchange(cp, sends, [(bufs[p.tag], p.src, p.tag) for p in incoming]))
    out = []
    for i in range(x.shape[1] // C):
        parts = [bufs[p.tag] if p.src != r else x[:, p.src_lo:p.src_hi]
                 for p in plan if p.dst == r and p.dst_chunk == i]
        out.append(torch.cat(parts + [x[:, i * C:(i + 1) * C]], dim=1))
    return out


class _HaloExchange(torch.autograd.Function):
    """x (B, L, ...) -> per local chunk (B, h_i + C, ...) with its halo prepended."""

    @staticmethod
    def forward(ctx, kv, plan, cp: CPContext, C: int):
        ctx.plan, ctx.cp, ctx.C = plan, cp, C
        return tuple(_extend(kv, plan, cp, C))

    @staticmethod
    def backward(ctx, *grads):
        plan, cp, C, r = ctx.plan, ctx.cp, ctx.C, ctx.cp.rank
        g0 = grads[0]  # grads are materialised: never None
        dkv = g0.new_zeros((g0.shape[0], len(grads) * C, *g0.shape[2:]))  # (B, L, ...)
        sends = []
        for i, g in enumerate(grads):
            off = 0
            for p in (p for p in plan if p.dst == r and p.dst_chunk == i):
                part = g[:, off:off + p.src_hi - p.src_lo]
                off += p.src_hi - p.src_lo
                if p.src == r:
                    dkv[:, p.src_lo:p.src_hi] += part
                else:
                    sends.append((part, p.src, p.tag))
            dkv[:, i * C:(i + 1) * C] += g[:, off:]
        mine = [p for p in plan if p.src == r and p.dst != r]
        bufs = [dkv.new_empty((dkv.shape[0], p.src_hi - p.src_lo, *dkv.shape[2:])) for p in mine]
        wait(exchange(cp, sends, [(b, p.dst, p.tag) for b, p in zip(bufs, mine)]))
        for b, p in zip(bufs, mine):
            dkv[:, p.src_lo:p.src_hi] += b
        return dkv, None, None, None


def halo_extend(x: torch.Tensor, cp: CPContext, window: int) -> list[torch.Tensor]:
    """This rank's shard with each local chunk's halo prepended: the building
    block for running any op of bounded reach (a whole sliding-window block, say)
    locally on each chunk.

    x: (B, L, ...) this rank's shard (L = T / cp) of any dtype.
    window: W >= 0; chunk i gets the h_i = min(W, chunk start) positions before it.
    Returns per local chunk (one contiguous, two zigzag) a tensor (B, h_i + C, ...)
    in position order, its first h_i rows from whichever ranks hold them.
    Differentiable for floating x: each halo's gradient goes back to its owner.
    Must be called by every rank of cp.group.
    """
    T = x.shape[1] * cp.world_size
    check_seq_len(T, cp)
    C = T // cp.n_chunks
    plan = halo_plan(T, cp.world_size, cp.layout, window)
    if x.is_floating_point() and torch.is_grad_enabled() and x.requires_grad:
        return list(_HaloExchange.apply(x, plan, cp, C))
    return _extend(x, plan, cp, C)


def halo_chunks(x: torch.Tensor, cp: CPContext, window: int) -> tuple[list[torch.Tensor], int]:
    """Differentiable `halo_extend` for any x, and the chunk length C: ([(B, h_i + C, ...)], C)."""
    T = x.shape[1] * cp.world_size
    check_seq_len(T, cp)
    C = T // cp.n_chunks
    return list(_HaloExchange.apply(x, halo_plan(T, cp.world_size, cp.layout, window), cp, C)), C


def sequence_halo(x: torch.Tensor, cp: CPContext, width: int) -> list[torch.Tensor]:
    """Each local chunk with the `width` tokens before it prepended: for causal convs
    (width = taps - 1) and sliding windows (width = window).

    x: (B, L, ...) this rank's shard (float, or integer ids). Returns one tensor per
    local chunk (2 zigzag, 1 contiguous) of (B, h + C, ...), h = min(width, the
    chunk's global start): shorter only at the very start of the sequence. A halo
    longer than a chunk reaches into several preceding chunks. Differentiable: the
    halo's gradient goes back to the rank that owns those tokens.
    """
    if width < 0:
        raise ValueError(f"sequence_halo: width must be >= 0; got {width}")
    return halo_chunks(x, cp, width)[0]
