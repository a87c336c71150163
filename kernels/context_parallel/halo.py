"""Sliding-window attention under context parallelism: exchange only the halo.

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

Per local chunk, the keys [halo; own chunk] are contiguous positions ending at
the chunk's end, which is exactly the single-process op's convention for
S > T (queries are the last T keys): `attention(q_chunk, k_ext, v_ext,
seq_ids=ids_ext, window=W)`. Autograd runs through that op; the exchange is an
autograd Function whose backward sends each halo's gradient back to its owner,
which adds it into the gradient of its own K/V.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from loom.kernels.attention import attention
from loom.kernels.context_parallel.layout import CPContext, check_seq_len, chunk_ranges, one_document_or_ids
from loom.kernels.context_parallel.p2p import exchange, wait

__all__ = ["halo_attention", "halo_extend", "halo_plan", "HaloPiece"]


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


def _owner(c: int, cp: int, layout: str) -> tuple[int, int]:
    """(rank, local chunk index) holding global chunk c."""
    if layout == "contiguous" or c < cp:
        return c, 0
    return 2 * cp - 1 - c, 1


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
                src, j = _owner(c, cp, layout)
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
    """kv (B, L, 2, G, K) -> per local chunk (B, h_i + C, 2, G, K) with its halo prepended."""

    @staticmethod
    def forward(ctx, kv, plan, cp: CPContext, C: int):
        ctx.plan, ctx.cp, ctx.C = plan, cp, C
        return tuple(_extend(kv, plan, cp, C))

    @staticmethod
    def backward(ctx, *grads):
        plan, cp, C, r = ctx.plan, ctx.cp, ctx.C, ctx.cp.rank
        g0 = grads[0]  # grads are materialised: never None
        dkv = g0.new_zeros((g0.shape[0], len(grads) * C, *g0.shape[2:]))  # (B, L, 2, G, K)
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


def halo_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp: CPContext, *, window: int,
                   seq_ids: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Sliding-window causal attention over a sequence sharded by `cp` (either layout).

    q: (B, L, H, K); k, v: (B, L, G, K) this rank's shards, H % G == 0.
    window: W >= 0; keys at most W positions behind a query are visible. Any W
        works; the halo moved per chunk is min(W, chunk start) keys.
    seq_ids: (B, L) int64 global document ids of this rank's tokens, or None.
    Returns o: (B, L, H, K), equal to the single-process `attention(..., window=W)` shard.
    Must be called by every rank of cp.group.
    """
    B, L, H, K = q.shape
    if k.shape != v.shape or k.shape[:2] != (B, L) or H % k.shape[2] or k.shape[3] != K:
        raise ValueError(f"halo_attention: incompatible shards q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if window is None or window < 0:
        raise ValueError(f"halo_attention needs a window >= 0; got {window}")
    T = L * cp.world_size
    check_seq_len(T, cp)
    C = T // cp.n_chunks
    plan = halo_plan(T, cp.world_size, cp.layout, window)
    kv_ext = _HaloExchange.apply(torch.stack([k, v], dim=2), plan, cp, C)
    sid_ext = [None] * len(kv_ext) if seq_ids is None else [one_document_or_ids(s)
                                                             for s in _extend(seq_ids, plan, cp, C)]
    outs = [attention(q[:, i * C:(i + 1) * C], kv[:, :, 0], kv[:, :, 1], seq_ids=sid, window=window, scale=scale)
            for i, (kv, sid) in enumerate(zip(kv_ext, sid_ext))]
    return torch.cat(outs, dim=1)


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
