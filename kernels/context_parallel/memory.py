"""Titans neural memory under context parallelism: the memory state travels from
rank to rank in global chunk order; plus the halo that short causal convs need.

Legend: B batch, T full sequence length, L = T / cp tokens per rank, C chunk
length (T / (2 cp) zigzag, T / cp contiguous), H heads, K head dim, N numbers
in one packed memory state per row (3 x the memory's weights: W, S and the
chunk-start weights).

The memory is a recurrence: the state after global chunk c is the input of
chunk c + 1, so the chunks run one after another in global order. Zigzag
(rank r holds chunks r and 2cp-1-r) makes that a pipeline that visits every
rank twice:
    rank 0 chunk 0 -> rank 1 chunk 1 -> ... -> rank cp-1 chunk cp-1
      -> rank cp-1 chunk cp -> rank cp-2 chunk cp+1 -> ... -> rank 0 chunk 2cp-1
(contiguous: once, rank 0 -> ... -> rank cp-1). Each hop sends one packed
state per batch row, (B, N) floats plus the (B,) int64 offset inside the
current memory chunk, so a memory chunk may straddle a shard boundary; a hop
between the two chunks of one rank (rank cp-1 under zigzag) stays local.
`loom.kernels.memory.neural_memory` guarantees that splitting a sequence at any
token with the state carried equals the whole, which makes this exact.

Backward is the same pipeline reversed: `_MemoryChain` runs each local chunk
under autograd in its forward, keeps the graphs, and its backward walks the
local chunks from the last to the first: receive d(state out) from the rank
the state went to, backpropagate the chunk, send d(state in) to the rank it
came from. Every gradient, on every shard, then equals the single-process one
(rank 0's first chunk receives the gradient of everything after it).

Cost: the memory op is serialised. The critical path runs all 2cp chunks
one after another, so the memory layer takes about as long as on one process
(each rank is busy 2 of the 2cp steps), i.e. ~cp times its ideal share; the
rest of the model (projections, convs, gates, attention, MLPs) runs on 1/cp
of the tokens per rank. Per rank and layer: at most 2 state messages forward
and 2 gradient messages backward of B * N * elem bytes each (plus 8 B bytes
of offsets forward), independent of T. No overlap is achieved within the op:
every chunk needs its predecessor's state before any of its work can start
(its keys' gradients are taken at the carried weights).
"""
from __future__ import annotations

import torch

# The halo exchange of sliding-window attention, reused as is for conv taps.
from loom.kernels.context_parallel.halo import _HaloExchange, halo_plan
from loom.kernels.context_parallel.layout import CPContext, check_seq_len, chunk_ranges
from loom.kernels.context_parallel.p2p import exchange, wait
from loom.kernels.memory import MemoryState, neural_memory

__all__ = ["cp_neural_memory", "sequence_halo", "state_hops"]


def _owner(c: int, cp: CPContext) -> tuple[int, int]:
    """(rank, local chunk index) holding global chunk c."""
    if cp.layout == "contiguous" or c < cp.world_size:
        return c, 0
    return 2 * cp.world_size - 1 - c, 1


def state_hops(T: int, cp: CPContext) -> list[tuple[int, int | None, int | None]]:
    """Per local chunk in shard order: (global chunk c, rank of chunk c-1, rank of chunk c+1),
    None at the ends of the sequence. Shard order is increasing global order."""
    C = T // cp.n_chunks
    out = []
    for a, _ in chunk_ranges(T, cp.world_size, cp.rank, cp.layout):
        c = a // C
        prev = _owner(c - 1, cp)[0] if c > 0 else None
        nxt = _owner(c + 1, cp)[0] if c + 1 < cp.n_chunks else None
        out.append((c, prev, nxt))
    return out


def _pack(st: MemoryState) -> torch.Tensor:
    """Float part of a state -> (B, N): weights, momentum, chunk-start weights, flattened."""
    parts = (*st.weights, *st.momentum, *st.base)
    return torch.cat([t.reshape(t.shape[0], -1) for t in parts], dim=1)


def _unpack(flat: torch.Tensor, offset: torch.Tensor, shapes: list[torch.Size]) -> MemoryState:
    """(B, N) and (B,) offsets -> MemoryState; shapes: the (H, D_in, D_out) of each layer."""
    B, depth = flat.shape[0], len(shapes)
    sizes = [s.numel() for s in shapes] * 3
    ts = [t.view(B, *shapes[i % depth]) for i, t in enumerate(flat.split(sizes, dim=1))]
    return MemoryState(tuple(ts[:depth]), tuple(ts[depth:2 * depth]), tuple(ts[2 * depth:]), offset)


class _MemoryChain(torch.autograd.Function):
    """(q, k, v, theta, eta, alpha, *W0[, gamma]) shards -> y (B, L, H, K), by the state pipeline."""

    @staticmethod
    def forward(ctx, cp: CPContext, opts: dict, reset, mask, n_weights: int, *tensors):
        leaves = [t.detach().requires_grad_(t.requires_grad) for t in tensors]
        q = leaves[0]
        B, L = q.shape[:2]
        T = L * cp.world_size
        C = T // cp.n_chunks
        w0 = leaves[6:6 + n_weights]
        norm_weight = leaves[6 + n_weights] if len(leaves) > 6 + n_weights else None
        shapes = [w.shape for w in w0]
        dt = torch.promote_types(q.dtype, torch.float32)
        n_flat = 3 * sum(s.numel() for s in shapes)
        chunks, sends, handoff = [], [], None
        with torch.enable_grad():
            for i, (c, prev, nxt) in enumerate(state_hops(T, cp)):
                rows = slice(i * C, (i + 1) * C)
                if prev is None:
                    flat_in, state = None, None
                else:
                    if prev == cp.rank:
                        flat, offset = handoff
                    else:
                        flat = q.new_empty(B, n_flat, dtype=dt)
                        offset = torch.empty(B, dtype=torch.long, device=q.device)
                        wait(exchange(cp, [], [(flat, prev, 2 * c), (offset, prev, 2 * c + 1)]))
                    flat_in = flat.requires_grad_()
                    state = _unpack(flat_in, offset, shapes)
                y, final = neural_memory(
                    *(t[:, rows] for t in leaves[:6]), w0, chunk_size=opts["chunk_size"], state=state,
                    reset=None if reset is None else reset[:, rows], mask=None if mask is None else mask[:, rows],
                    activation=opts["activation"], retrieval=opts["retrieval"], norm_weight=norm_weight,
                    momentum_step=opts["momentum_step"], return_state=True)
                flat_out = _pack(final) if nxt is not None else None
                if nxt == cp.rank:
                    handoff = (flat_out.detach(), final.offset)
                elif nxt is not None:  # tags 2(c+1), 2(c+1)+1: the hop into chunk c+1
                    sends += exchange(cp, [(flat_out.detach(), nxt, 2 * c + 2), (final.offset, nxt, 2 * c + 3)], [])
                chunks.append((c, prev, nxt, flat_in, y, flat_out))
        wait(sends)
        ctx.cp, ctx.leaves, ctx.chunks, ctx.C = cp, leaves, chunks, C
        return torch.cat([y.detach() for *_, y, _ in chunks], dim=1)

    @staticmethod
    def backward(ctx, dy):
        cp, leaves, C = ctx.cp, ctx.leaves, ctx.C
        wanted = [t for t in leaves if t.requires_grad]
        grads = [None] * len(leaves)
        tag0 = 2 * cp.n_chunks  # backward tags follow the forward ones
        sends, handoff = [], None
        for i in reversed(range(len(ctx.chunks))):
            c, prev, nxt, flat_in, y, flat_out = ctx.chunks[i]
            outs, douts = [y], [dy[:, i * C:(i + 1) * C]]
            if nxt is not None:
                if nxt == cp.rank:
                    dflat = handoff
                else:
                    dflat = torch.empty_like(flat_out)
                    wait(exchange(cp, [], [(dflat, nxt, tag0 + c + 1)]))
                outs.append(flat_out)
                douts.append(dflat)
            inputs = wanted + ([flat_in] if flat_in is not None else [])
            g = torch.autograd.grad(outs, inputs, douts, allow_unused=True)
            for j, t in enumerate(wanted):
                if g[j] is not None:
                    k = next(n for n, leaf in enumerate(leaves) if leaf is t)
                    grads[k] = g[j] if grads[k] is None else grads[k] + g[j]
            if flat_in is not None:
                dflat_in = g[-1] if g[-1] is not None else torch.zeros_like(flat_in)
                if prev == cp.rank:
                    handoff = dflat_in
                else:
                    sends += exchange(cp, [(dflat_in, prev, tag0 + c)], [])
        wait(sends)
        ctx.chunks = ctx.leaves = None
        return (None, None, None, None, None, *grads)


def cp_neural_memory(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, theta: torch.Tensor, eta: torch.Tensor,
                     alpha: torch.Tensor, init_weights, cp: CPContext, *, chunk_size: int,
                     reset: torch.Tensor | None = None, mask: torch.Tensor | None = None, activation: str = "gelu",
                     retrieval: str = "chunk", norm_weight: torch.Tensor | None = None,
                     momentum_step: str = "token") -> torch.Tensor:
    """`loom.kernels.memory.neural_memory` over a sequence sharded across the ranks of `cp`.

    Equal, forward and gradients, to the single-process op on the full sequence
    (starting from W0, no incoming state) restricted to this rank's shard.

    q, k, v: (B, L, H, K) this rank's shards, in the shard order of `cp.layout`.
    theta, eta, alpha: (B, L, H) gates; reset, mask: (B, L) bool or None
        (document starts, padding), sharded the same way.
    init_weights: the learned W0, (H, D_in, D_out) per memory layer (replicated).
    chunk_size, activation, retrieval, norm_weight (H, K), momentum_step: as in neural_memory.
    Returns y: (B, L, H, K). Must be called by every rank of cp.group.

    Example (inside an initialised group, shards from `shard_sequence`):
        >>> y_loc = cp_neural_memory(q_loc, k_loc, v_loc, th_loc, eta_loc, al_loc, W0, cp, chunk_size=16)
    """
    if q.dim() != 4:
        raise ValueError(f"cp_neural_memory expects q, k, v shards (B, L, H, K); got q {tuple(q.shape)}")
    check_seq_len(q.shape[1] * cp.world_size, cp)
    opts = dict(chunk_size=chunk_size, activation=activation, retrieval=retrieval, momentum_step=momentum_step)
    if cp.world_size == 1:
        return neural_memory(q, k, v, theta, eta, alpha, init_weights, reset=reset, mask=mask,
                             norm_weight=norm_weight, **opts)
    extra = () if norm_weight is None else (norm_weight,)
    return _MemoryChain.apply(cp, opts, reset, mask, len(init_weights), q, k, v, theta, eta, alpha,
                              *init_weights, *extra)


def sequence_halo(x: torch.Tensor, cp: CPContext, width: int) -> list[torch.Tensor]:
    """Each local chunk with the `width` tokens before it prepended: for causal convs
    (width = taps - 1) and sliding windows (width = window).

    x: (B, L, ...) this rank's shard (float, or integer ids). Returns one tensor per
    local chunk (2 zigzag, 1 contiguous) of (B, h + C, ...), h = min(width, the
    chunk's global start): shorter only at the very start of the sequence. A halo
    longer than a chunk reaches into several preceding chunks. Differentiable: the
    halo's gradient goes back to the rank that owns those tokens.
    """
    T = x.shape[1] * cp.world_size
    check_seq_len(T, cp)
    if width < 0:
        raise ValueError(f"sequence_halo: width must be >= 0; got {width}")
    return list(_HaloExchange.apply(x, halo_plan(T, cp.world_size, cp.layout, width), cp, T // cp.n_chunks))
