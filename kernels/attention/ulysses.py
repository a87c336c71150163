"""Ulysses attention: trade the sequence shard for a head shard with one
all-to-all, run ordinary attention on the full sequence, trade back.

Legend: B batch, T full length, L = T / cp tokens per rank, H query heads,
G key/value heads, K head dim.

    q (B, L, H, K) --all-to-all--> (B, T, H/cp, K)   rank j gets heads [j*H/cp, (j+1)*H/cp)
    k, v likewise with G heads; seq_ids are all-gathered (B, T) and dropped when
        every row is one document (no (T, T) mask: SDPA keeps its flash path)
    o = attention on the full sequence in TRUE position order (forms.py)
    o (B, T, H/cp, K) --all-to-all--> (B, L, H, K)

The all-to-all and its head rule (H % cp == 0; G % cp == 0, or cp % G == 0 with
each K/V head replicated cp / G times first): kernels/context_parallel/all_to_all.py.
"""
from __future__ import annotations

import torch

from loom.kernels.attention.forms import run_attention
from loom.kernels.context_parallel.all_to_all import head_to_seq, seq_to_head, ulysses_kv_heads
from loom.kernels.context_parallel.layout import CPContext, check_seq_len, gather_sequence, one_document_or_ids

__all__ = ["ulysses_attention"]


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp: CPContext, *,
                      seq_ids: torch.Tensor | None = None, window: int | None = None,
                      scale: float | None = None) -> torch.Tensor:
    """Ulysses (all-to-all) attention over a sequence sharded by `cp` (either layout).

    Args:
        q: (B, L, H, K); k, v: (B, L, G, K) this rank's shards; H % cp == 0 and
            G % cp == 0 or cp % G == 0 (ValueError otherwise).
        cp: the CPContext of the group.
        scale: softmax scale, default K ** -0.5.
        seq_ids: (B, L) int64 global document ids of this rank's tokens, or None.
        window: optional sliding window, applied on the full sequence.

    Returns:
        o (B, L, H, K), equal to the single-process `attention` shard.
        Must be called by every rank of cp.group (collective).
    """
    B, L, H, K = q.shape
    if k.shape != v.shape or k.shape[:2] != (B, L) or H % k.shape[2] or k.shape[3] != K:
        raise ValueError(f"ulysses_attention: incompatible shards q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    n = cp.world_size
    check_seq_len(L * n, cp)
    G = k.shape[2]
    Gr = ulysses_kv_heads(H, G, n)
    if Gr != G:
        k, v = k.repeat_interleave(Gr // G, dim=2), v.repeat_interleave(Gr // G, dim=2)
    sid = None if seq_ids is None else one_document_or_ids(gather_sequence(seq_ids, cp))  # (B, T)
    o = run_attention(seq_to_head(q, cp), seq_to_head(k, cp), seq_to_head(v, cp),
                      seq_ids=sid, window=window, scale=scale)  # (B, T, H/cp, K)
    return head_to_seq(o, cp)
