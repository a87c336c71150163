"""Sliding-window attention under context parallelism: exchange only the halo.

Legend: B batch, T full length, L = T / cp tokens per rank, C chunk length
(L contiguous, L / 2 zigzag), W window, G key/value heads, K head dim.

A query at global position p sees keys [p - W, p], so each local chunk needs,
besides its own keys, the W keys before it: the halo, exchanged by
kernels/context_parallel/halo.py (any W, both layouts; its backward sends each
halo's gradient back to the rank that owns those keys).

Per local chunk, the keys [halo; own chunk] are contiguous positions ending at
the chunk's end, which is exactly the single-device form's convention for S > T
(queries are the last T keys): `run_attention(q_chunk, k_ext, v_ext,
seq_ids=ids_ext, window=W)`, and autograd runs through it.
"""
from __future__ import annotations

import torch

from loom.kernels.attention.forms import run_attention
from loom.kernels.context_parallel.halo import halo_chunks, halo_extend
from loom.kernels.context_parallel.layout import CPContext, one_document_or_ids

__all__ = ["halo_attention"]


def halo_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp: CPContext, *, window: int,
                   seq_ids: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Sliding-window causal attention over a sequence sharded by `cp` (either layout).

    Args:
        q: (B, L, H, K); k, v: (B, L, G, K) this rank's shards, H % G == 0.
        cp: the CPContext of the group.
        scale: softmax scale, default K ** -0.5.
        window: W >= 0; keys at most W positions behind a query are visible. Any W
            works; the halo moved per chunk is min(W, chunk start) keys.
        seq_ids: (B, L) int64 global document ids of this rank's tokens, or None.

    Returns:
        o (B, L, H, K), equal to the single-process `attention(..., window=W)` shard.
        Must be called by every rank of cp.group.
    """
    B, L, H, K = q.shape
    if k.shape != v.shape or k.shape[:2] != (B, L) or H % k.shape[2] or k.shape[3] != K:
        raise ValueError(f"halo_attention: incompatible shards q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if window is None or window < 0:
        raise ValueError(f"halo_attention needs a window >= 0; got {window}")
    kv_ext, C = halo_chunks(torch.stack([k, v], dim=2), cp, window)  # per chunk (B, h + C, 2, G, K)
    sid_ext = [None] * len(kv_ext) if seq_ids is None else [one_document_or_ids(s)
                                                             for s in halo_extend(seq_ids, cp, window)]
    outs = [run_attention(q[:, i * C:(i + 1) * C], kv[:, :, 0], kv[:, :, 1], seq_ids=sid, window=window,
                          scale=scale) for i, (kv, sid) in enumerate(zip(kv_ext, sid_ext))]
    return torch.cat(outs, dim=1)
