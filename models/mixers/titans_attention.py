"""Attention with persistent memory tokens, for `titans_mag` and `titans_mac`.

Legend: B batch, T queries, S keys, H query heads, G key/value heads, K head
dim, P persistent tokens.

Persistent memory (paper Eq. 19) is N_p learned, data-independent tokens in
front of the sequence that every query sees. Since they never depend on the
input, their keys and values after projection are learned constants too, so
they are learned here directly as (P, G, K) tensors and skip RoPE.

MAG: loom.kernels.swa's sliding window, with the prefix merged through its
log-sum-exp. MAC: a segment's visibility pattern (prefix, its memory tokens,
itself, the cached start of the segment) is not one the attention kernels
offer, so `masked_attention` computes it explicitly, one segment at a time, in
the input dtype (at least fp32): O(segment^2) memory per segment and head.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from loom.kernels.swa import sliding_window_attention


class PersistentKV(nn.Module):
    """P learned key/value pairs per key/value head, visible to every query."""

    def __init__(self, n_tokens: int, n_kv_heads: int, head_dim: int, init_std: float):
        super().__init__()
        self.init_std = init_std
        self.k = nn.Parameter(torch.empty(n_tokens, n_kv_heads, head_dim))
        self.v = nn.Parameter(torch.empty(n_tokens, n_kv_heads, head_dim))

    def reset_parameters(self) -> None:
        """Keys and values N(0, init_std): near-uniform attention to them at the start."""
        nn.init.normal_(self.k, 0.0, self.init_std)
        nn.init.normal_(self.v, 0.0, self.init_std)


def masked_attention(q, k, v, visible, prefix: PersistentKV | None = None):
    """Softmax attention with an explicit mask.

    q (B, T, H, K); k, v (B, S, G, K); visible (B or 1, T, S) bool; the
    persistent prefix, if given, is visible to every query. Every query must
    see at least one key. Returns (B, T, H, K) in q's dtype."""
    B, T, H, K = q.shape
    G = k.shape[2]
    dt = torch.promote_types(q.dtype, torch.float32)
    qg = q.to(dt).view(B, T, G, H // G, K) * (1.0 / math.sqrt(K))
    scores = torch.einsum("btgrk,bsgk->bgrts", qg, k.to(dt))             # (B, G, H/G, T, S)
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    if prefix is not None:
        scores = torch.cat([torch.einsum("btgrk,pgk->bgrtp", qg, prefix.k.to(dt)), scores], dim=-1)
    p = torch.softmax(scores, dim=-1)
    P = 0 if prefix is None else prefix.k.shape[0]
    o = torch.einsum("bgrts,bsgk->btgrk", p[..., P:], v.to(dt))
    if prefix is not None:
        o = o + torch.einsum("bgrtp,pgk->btgrk", p[..., :P], prefix.v.to(dt))
    return o.reshape(B, T, H, K).to(q.dtype)


def window_attention_with_prefix(q, k, v, doc, window: int, prefix: PersistentKV | None = None):
    """loom.kernels.swa's sliding-window attention, plus the persistent prefix merged through
    the log-sum-exp. q (B, T, H, K); k, v (B, S, G, K), the queries being the last T
    keys; doc (B, S) document ids or None (one document per row)."""
    if prefix is None:
        return sliding_window_attention(q, k, v, window=window, seq_ids=doc)
    o, lse = sliding_window_attention(q, k, v, window=window, seq_ids=doc, return_lse=True)
    B, T, H, K = q.shape
    G = k.shape[2]
    dt = lse.dtype                                                      # fp32, or fp64 for fp64 inputs
    qg = q.to(dt).view(B, T, G, H // G, K) * (1.0 / math.sqrt(K))
    s = torch.einsum("btgrk,pgk->btgrp", qg, prefix.k.to(dt)).reshape(B, T, H, -1)  # (B, T, H, P)
    lse_p = torch.logsumexp(s, dim=-1)
    o_p = torch.einsum("btgrp,pgk->btgrk", torch.softmax(s, -1).view(B, T, G, H // G, -1), prefix.v.to(dt))
    total = torch.logaddexp(lse, lse_p)
    o = o.to(dt) * torch.exp(lse - total)[..., None] + o_p.reshape(B, T, H, K) * torch.exp(lse_p - total)[..., None]
    return o.to(q.dtype)
