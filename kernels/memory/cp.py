"""Titans neural memory under context parallelism: the memory state travels from
rank to rank in global chunk order.

Legend: B batch, T full sequence length, L = T / cp tokens per rank, C chunk
length (T / (2 cp) zigzag, T / cp contiguous), H heads, K head dim, N numbers
in one memory state per row (3 x the memory's weights: W, S and the
chunk-start weights).

The memory is a recurrence: the state after global chunk c is the input of
chunk c + 1, so the chunks run one after another in global order, by the state
chain of kernels/context_parallel/chain.py (`carry`; zigzag visits every rank
twice). Each hop to another rank sends one state per batch row, (B, N) floats
plus the (B,) int64 offset inside the current memory chunk (and a small header),
so a memory chunk may straddle a shard boundary. The single-device op guarantees
that splitting a sequence at any token with the state carried equals the whole,
which makes this exact; backward is the same pipeline reversed (chain.py), so
every gradient, on every shard, equals the single-process one.

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

from loom.kernels.context_parallel.chain import carry
from loom.kernels.context_parallel.layout import CPContext, check_seq_len
from loom.kernels.memory.common import MemoryState
from loom.kernels.memory.forms import run_memory

__all__ = ["cp_neural_memory"]


def cp_neural_memory(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, theta: torch.Tensor, eta: torch.Tensor,
                     alpha: torch.Tensor, init_weights, cp: CPContext, *, chunk_size: int,
                     reset: torch.Tensor | None = None, mask: torch.Tensor | None = None, activation: str = "gelu",
                     retrieval: str = "chunk", norm_weight: torch.Tensor | None = None,
                     momentum_step: str = "token", impl: str = "chunked") -> torch.Tensor:
    """`loom.kernels.memory.neural_memory` over a sequence sharded across the ranks of `cp`.

    Equal, forward and gradients, to the single-process op on the full sequence
    (starting from W0, no incoming state) restricted to this rank's shard.

    Args:
        q, k, v: (B, L, H, K) this rank's shards, in the shard order of `cp.layout`.
        theta, eta, alpha: (B, L, H) gates.
        init_weights: the learned W0, (H, D_in, D_out) per memory layer (replicated).
        cp: the CPContext of the group.
        reset, mask: (B, L) bool or None (document starts, padding), sharded the same way.
        chunk_size, activation, retrieval, norm_weight (H, K), momentum_step: as in neural_memory.
        impl: the single-device form each chunk runs (forms.py FORMS; the dispatcher
            passes the one it resolved).

    Returns:
        y: (B, L, H, K). Must be called by every rank of cp.group.

    Example (inside an initialised group, shards from `shard_sequence`):
        >>> y_loc = cp_neural_memory(q_loc, k_loc, v_loc, th_loc, eta_loc, al_loc, W0, cp, chunk_size=16)
    """
    if q.dim() != 4:
        raise ValueError(f"cp_neural_memory expects q, k, v shards (B, L, H, K); got q {tuple(q.shape)}")
    check_seq_len(q.shape[1] * cp.world_size, cp)
    opts = dict(chunk_size=chunk_size, activation=activation, retrieval=retrieval, momentum_step=momentum_step,
                norm_weight=norm_weight)
    init_weights = list(init_weights)
    if cp.world_size == 1:
        return run_memory(impl, q, k, v, theta, eta, alpha, init_weights, reset=reset, mask=mask, **opts)[0]
    flags = [t for t in (reset, mask) if t is not None]

    def step(xs: list[torch.Tensor], state):
        """One chunk: xs = its (q, k, v, theta, eta, alpha[, reset][, mask]) rows, state the
        (weights, momentum, base, offset) tuple after the chunk before (None at the start)."""
        rest = iter(xs[6:])
        rs = next(rest) if reset is not None else None
        mk = next(rest) if mask is not None else None
        y, final = run_memory(impl, *xs[:6], init_weights, state=None if state is None else MemoryState(*state),
                              reset=rs, mask=mk, **opts)
        return y, (final.weights, final.momentum, final.base, final.offset)

    params = init_weights + ([] if norm_weight is None else [norm_weight])
    return carry(step, [q, k, v, theta, eta, alpha, *flags], params, cp)
