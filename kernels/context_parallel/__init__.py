"""Context parallelism for softmax attention: the sequence of every example is
sharded across the ranks of a cp process group.

Legend: B batch, T full sequence length, L = T / cp tokens held by one rank,
H query heads, G key/value heads (H % G == 0), K head dim, C chunk length.

Layouts (how the T positions of a row are dealt to cp ranks):
    contiguous: rank r holds positions [r*L, (r+1)*L). Needs T % cp == 0.
    zigzag:     the row is cut into 2*cp chunks of C = T / (2*cp); rank r holds
                chunk r followed by chunk 2*cp-1-r. Under a causal mask every
                rank then owns the same amount of work. Needs T % (2*cp) == 0.
A rank's shard is always its chunks concatenated in increasing position order.

Public API (the only thing models/ and trainer/ call):
    CPContext                       the handle that reaches a mixer as `ctx.cp`
    shard_sequence(x, cp, dim=1)    full (.., T, ..) tensor -> this rank's (.., L, ..) shard
    gather_sequence(x, cp, dim=1)   this rank's shard -> the full tensor, in true order
    shard_positions(T, cp)          (L,) int64 global positions of this rank's tokens
    cp_attention(q, k, v, cp, *, seq_ids=None, window=None, scale=None)
    comm_bytes(...)                 analytic bytes one rank sends per forward/backward
    cp_linear_attention(...)        linear attention: prefix scan of piece states (state_scan.py)
    cp_rat(...), rat_comm_bytes     RAT: all-gather of chunk and running states (rat.py)
    cp_s2_attention(...)            S2-Attention: Ulysses all-to-all (s2.py)
    all_gather(x, cp)               differentiable all-gather of small per-rank tensors (gather.py)
    cp_neural_memory(q, k, v, theta, eta, alpha, W0, cp, *, chunk_size, ...)
                                    Titans memory: the state carried rank to rank (memory.py)
    sequence_halo(x, cp, width)     each local chunk with its `width` preceding tokens (convs)
    cp_recurrent(step, seq, params, cp)  a whole stateful layer, its state carried rank to rank

Example (inside an initialised process group):
    cp = CPContext.from_group(group, impl="ring", layout="zigzag")
    q_loc = shard_sequence(q, cp)                       # (B, T, H, K) -> (B, L, H, K)
    o_loc = cp_attention(q_loc, k_loc, v_loc, cp, seq_ids=shard_sequence(seq_ids, cp))
"""
from __future__ import annotations

import torch

from loom.kernels.attention import attention
from loom.kernels.context_parallel.comm import CommBytes, comm_bytes
from loom.kernels.context_parallel.gather import all_gather
from loom.kernels.context_parallel.halo import halo_attention, halo_extend
from loom.kernels.context_parallel.layout import (CPContext, check_seq_len, chunk_ranges, gather_sequence,
                                             shard_positions, shard_sequence)
from loom.kernels.context_parallel.memory import cp_neural_memory, sequence_halo
from loom.kernels.context_parallel.recurrent import cp_recurrent
from loom.kernels.context_parallel.rat import cp_rat, rat_comm_bytes
from loom.kernels.context_parallel.ring import ring_attention
from loom.kernels.context_parallel.s2 import cp_s2_attention
from loom.kernels.context_parallel.state_scan import cp_linear_attention
from loom.kernels.context_parallel.ulysses import ulysses_attention
from loom.kernels.dispatch import announce

__all__ = ["CPContext", "shard_sequence", "gather_sequence", "shard_positions", "chunk_ranges",
           "check_seq_len", "cp_attention", "ring_attention", "ulysses_attention", "halo_attention", "halo_extend",
           "comm_bytes", "CommBytes", "cp_neural_memory", "sequence_halo",
           "cp_recurrent", "cp_linear_attention", "cp_rat", "rat_comm_bytes", "cp_s2_attention", "all_gather"]


def _announce(path: str, layout: str, world_size: int) -> None:
    announce("context-parallel attention", f"{path} (layout={layout}, cp={world_size})")


def cp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp: CPContext, *,
                 seq_ids: torch.Tensor | None = None, window: int | None = None,
                 scale: float | None = None) -> torch.Tensor:
    """Causal softmax attention over a sequence sharded across cp ranks.

    Exactly equal (forward and gradients) to `loom.kernels.attention.attention` on the
    full sequence, restricted to this rank's shard.

    q: (B, L, H, K) this rank's queries; k, v: (B, L, G, K) its keys/values,
        all in the shard order of `cp.layout` (see `shard_sequence`).
    seq_ids: (B, L) int64 GLOBAL document ids of this rank's tokens (the shard of
        the full row's ids), so documents crossing shard boundaries stay exact.
    window: keys at most `window` positions behind a query are visible.
    scale: softmax scale, default 1/sqrt(K).
    Returns o: (B, L, H, K).

    Dispatch rule: window set -> halo exchange (halo.py; only the previous
    `window` keys travel, for either layout); otherwise cp.impl: "ring"
    (ring.py) or "ulysses" (ulysses.py). cp of size 1 -> the plain op.
    """
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2]:
        raise ValueError(f"cp_attention expects q (B,L,H,K), k=v (B,L,G,K) shards; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[2] % k.shape[2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"cp_attention: H={q.shape[2]} must be a multiple of G={k.shape[2]} and head dims "
                         f"must match; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if seq_ids is not None and tuple(seq_ids.shape) != tuple(q.shape[:2]):
        raise ValueError(f"seq_ids must be this rank's (B, L) = {tuple(q.shape[:2])} shard; got "
                         f"{tuple(seq_ids.shape)}")
    if window is not None and window < 0:
        raise ValueError(f"window must be >= 0; got {window}")
    check_seq_len(q.shape[1] * cp.world_size, cp)
    if cp.world_size == 1:
        _announce("single process", cp.layout, 1)
        return attention(q, k, v, seq_ids=seq_ids, window=window, scale=scale)
    if window is not None:
        _announce("halo (sliding window)", cp.layout, cp.world_size)
        return halo_attention(q, k, v, cp, seq_ids=seq_ids, window=window, scale=scale)
    if cp.impl == "ring":
        _announce("ring", cp.layout, cp.world_size)
        return ring_attention(q, k, v, cp, seq_ids=seq_ids, scale=scale)
    _announce("ulysses", cp.layout, cp.world_size)
    return ulysses_attention(q, k, v, cp, seq_ids=seq_ids, scale=scale)
