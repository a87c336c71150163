"""Causal softmax attention in plain PyTorch: the specification and CPU path.

Legend: B batch, T queries, S keys (S >= T), H query heads, G key/value
heads (H % G == 0), K head dim.

Query i sits at absolute position S - T + i (queries are the last T keys'
positions, as in prefill and decoding). Key j is visible to query i when
    j <= S - T + i                        (causal)
    S - T + i - j <= window              (sliding window, if window is set)
    seq_ids[j] == seq_ids[S - T + i]     (same document, if seq_ids is set)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def visibility_mask(T: int, S: int, seq_ids: torch.Tensor | None, window: int | None,
                    device: torch.device) -> torch.Tensor | None:
    """(B or 1, 1, T, S) bool mask, True where a key is visible; None when plain causal T == S."""
    if seq_ids is None and window is None and T == S:
        return None
    qpos = torch.arange(S - T, S, device=device)[:, None]
    kpos = torch.arange(S, device=device)[None, :]
    mask = kpos <= qpos
    if window is not None:
        mask = mask & (qpos - kpos <= window)
    mask = mask[None, None]
    if seq_ids is not None:
        same = seq_ids[:, S - T:, None] == seq_ids[:, None, :]  # (B, T, S)
        mask = mask & same[:, None]
    return mask


def attention_reference(q, k, v, *, seq_ids=None, window=None, scale=None, return_lse=False,
                        block_q: int = 1024):
    """Returns o (B, T, H, K) and, if return_lse, lse (B, T, H) in fp32 (natural log)."""
    B, T, H, K = q.shape
    S, G = k.shape[1], k.shape[2]
    scale = scale if scale is not None else 1.0 / math.sqrt(K)
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|G, T|S, K)
    if not return_lse:
        mask = visibility_mask(T, S, seq_ids, window, q.device)
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=mask is None,
                                           scale=scale, enable_gqa=G != H)
        return o.transpose(1, 2)
    # Math path with the log-sum-exp, by query blocks to bound memory at O(block_q * S).
    kh = kh.repeat_interleave(H // G, dim=1)
    vh = vh.repeat_interleave(H // G, dim=1)
    outs, lses = [], []
    for t0 in range(0, T, block_q):
        t1 = min(T, t0 + block_q)
        s = torch.einsum("bhtk,bhsk->bhts", qh[:, :, t0:t1].float(), kh.float()) * scale
        full = visibility_mask(T, S, seq_ids, window, q.device)
        if full is None:
            full = visibility_mask(T, S, None, None, q.device) if T != S else \
                torch.ones(T, S, dtype=torch.bool, device=q.device).tril()[None, None]
        s = s.masked_fill(~full[:, :, t0:t1], float("-inf"))
        lse = torch.logsumexp(s, dim=-1)  # (B, H, t)
        p = torch.exp(s - lse[..., None])
        outs.append(torch.einsum("bhts,bhsk->bhtk", p, vh.float()))
        lses.append(lse)
    o = torch.cat(outs, dim=2).transpose(1, 2).to(q.dtype)
    return o, torch.cat(lses, dim=2).transpose(1, 2)
