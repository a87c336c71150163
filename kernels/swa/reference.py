"""Sliding-window causal attention, the specification: a dense masked SDPA.

Legend: B batch, T queries, S keys (S >= T; queries are the last T), H query
heads, G key/value heads, K head dim.

Query i sits at key index S - T + i. Key j is visible when
    0 <= (S - T + i) - j <= window            (itself plus `window` past tokens)
    seq_ids[j] == seq_ids[S - T + i]          (same document, if seq_ids is set)
This is loom.kernels.attention's masked reference with `window` set; it costs
O(T * S) time and memory, so it is the yardstick for tests, not the CPU path
(banded.py is).
"""
from __future__ import annotations

from loom.kernels.attention.reference import attention_reference


def swa_reference(q, k, v, *, window: int, seq_ids=None, scale=None, return_lse=False):
    """q (B, T, H, K); k, v (B, S, G, K) -> o (B, T, H, K) [, lse (B, T, H)]."""
    return attention_reference(q, k, v, seq_ids=seq_ids, window=window, scale=scale, return_lse=return_lse)
