"""Causal softmax attention over a sequence sharded across cp ranks: the rule that
picks the sharded form (ring.py, ulysses.py, halo.py).

Legend: B batch, T full length, L = T / cp tokens held by this rank, H query
heads, G key/value heads (H % G == 0), K head dim.

Dispatch rule: window set -> halo exchange (halo.py; only the previous `window`
keys travel, for either layout); otherwise cp.impl: "ring" (ring.py) or
"ulysses" (ulysses.py). cp of size 1 -> the single-device forms (forms.py).
Bytes each path moves: kernels/context_parallel/comm.py `comm_bytes`.
"""
from __future__ import annotations

import torch

from loom.kernels.attention.forms import run_attention
from loom.kernels.attention.halo import halo_attention
from loom.kernels.attention.ring import ring_attention
from loom.kernels.attention.ulysses import ulysses_attention
from loom.kernels.context_parallel.layout import CPContext, check_seq_len
from loom.kernels.dispatch import announce

__all__ = ["cp_attention", "ring_attention", "ulysses_attention", "halo_attention"]


def _announce(path: str, layout: str, world_size: int) -> None:
    announce("context-parallel attention", f"{path} (layout={layout}, cp={world_size})")


def cp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp: CPContext, *,
                 seq_ids: torch.Tensor | None = None, window: int | None = None,
                 scale: float | None = None) -> torch.Tensor:
    """Causal softmax attention over a sequence sharded across cp ranks.

    Exactly equal (forward and gradients) to `loom.kernels.attention.attention` on the
    full sequence, restricted to this rank's shard.

    Args:
        q: (B, L, H, K) this rank's queries; k, v: (B, L, G, K) its keys/values,
            all in the shard order of `cp.layout` (see `shard_sequence`).
        cp: the CPContext of the group.
        seq_ids: (B, L) int64 GLOBAL document ids of this rank's tokens (the shard of
            the full row's ids), so documents crossing shard boundaries stay exact.
        window: keys at most `window` positions behind a query are visible.
        scale: softmax scale, default 1/sqrt(K).

    Returns:
        o: (B, L, H, K). A collective: every rank of cp.group calls it.
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
        return run_attention(q, k, v, seq_ids=seq_ids, window=window, scale=scale)
    if window is not None:
        _announce("halo (sliding window)", cp.layout, cp.world_size)
        return halo_attention(q, k, v, cp, seq_ids=seq_ids, window=window, scale=scale)
    if cp.impl == "ring":
        _announce("ring", cp.layout, cp.world_size)
        return ring_attention(q, k, v, cp, seq_ids=seq_ids, scale=scale)
    _announce("ulysses", cp.layout, cp.world_size)
    return ulysses_attention(q, k, v, cp, seq_ids=seq_ids, scale=scale)
