"""Causal linear attention with per-head decay: the defining forms (tests only).

Legend: B batch, T tokens, H heads, K key dim, V value dim.

With lambda_h = exp(-decay_h) and the state reset at document starts:
    S_t = lambda * S_{t-1} * (1 - reset_t) + k_t^T v_t        (K, V) per head
    o_t = (scale * q_t) S_t
Equivalently o_t = sum_{j <= t, same document} lambda^(t-j) (scale * q_t . k_j) v_j.
"""
from __future__ import annotations

import torch


def linear_attention_reference(q, k, v, decay, *, reset=None, initial_state=None, scale: float = 1.0):
    """The recurrence, token by token. q, k: (B, T, H, K); v: (B, T, H, V); decay: (H,); reset: (B, T) bool.
    Returns o (B, T, H, V) and the final state (B, H, K, V)."""
    B, T, H, K = q.shape
    lam = torch.exp(-decay.to(q.dtype))[:, None, None]  # (H, 1, 1)
    S = q.new_zeros(B, H, K, v.shape[-1]) if initial_state is None else initial_state.to(q.dtype)
    outs = []
    for t in range(T):
        if reset is not None:
            S = S * (~reset[:, t]).to(q.dtype)[:, None, None, None]
        S = lam * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S))
    return torch.stack(outs, dim=1), S


def linear_attention_dense(q, k, v, decay, *, reset=None, scale: float = 1.0):
    """O(T^2) masked form: ((q k^T) * D) v with D[t, j] = lambda^(t-j) for j <= t in the same document."""
    B, T, H, K = q.shape
    t = torch.arange(T, device=q.device)
    dist = (t[:, None] - t[None, :]).to(q.dtype)  # (T, T)
    D = torch.exp(-decay.to(q.dtype)[:, None, None] * dist.clamp_min(0)) * (dist >= 0)  # (H, T, T)
    D = D[None].expand(B, H, T, T)
    if reset is not None:
        seg = reset.long().cumsum(1)
        D = D * (seg[:, None, :, None] == seg[:, None, None, :])
    scores = torch.einsum("bthk,bshk->bhts", q * scale, k) * D
    return torch.einsum("bhts,bshv->bthv", scores, v)
