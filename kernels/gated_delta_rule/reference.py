"""Gated delta rule: the defining token-by-token recurrence (tests only).

Legend: B batch, T tokens, HK query/key heads, HV value heads (HV % HK == 0), K key dim,
V value dim.

Per value head h (its query/key head is h // (HV / HK), as transformers' Qwen3-Next and
fla), with the state S (K, V) stored key-major as fla and transformers store it:

    S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T,    a_t = exp(g_t)
    o_t = S_t^T (scale * q_t)

In the (V, K) orientation of the Gated DeltaNet paper this is S_t = a_t S_{t-1} (I - b_t k_t
k_t^T) + b_t v_t k_t^T, o_t = S_t q_t. With use_qk_l2norm q and k are first divided by
sqrt(|x|^2 + 1e-6) (fla's l2norm), then q is multiplied by scale. A token with reset_t
(the first token of a document that is not the row's first) drops the state before it.
"""
from __future__ import annotations

import torch

L2_EPS = 1e-6  # fla's and transformers' l2norm epsilon


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """x / sqrt(sum(x^2) + 1e-6) over the last dim (fla's l2norm)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + L2_EPS)


def expand_heads(x: torch.Tensor, n_v_heads: int) -> torch.Tensor:
    """(B, T, HK, K) -> (B, T, HV, K): each q/k head serves HV / HK consecutive value heads."""
    return x if x.shape[2] == n_v_heads else x.repeat_interleave(n_v_heads // x.shape[2], dim=2)


def prepare(q, k, v, g, beta, scale: float, use_qk_l2norm: bool):
    """Common first step of every CPU form: compute dtype (fp64 stays fp64, else fp32), the
    l2 norm, the q scale and the head expansion. Returns q, k (B, T, HV, K), v, g, beta."""
    dt = torch.float64 if v.dtype == torch.float64 else torch.float32
    q, k, v, g, beta = (x.to(dt) for x in (q, k, v, g, beta))
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    HV = v.shape[2]
    return expand_heads(q * scale, HV), expand_heads(k, HV), v, g, beta


def gated_delta_rule_reference(q, k, v, g, beta, *, scale: float, reset=None, initial_state=None,
                               use_qk_l2norm: bool = False):
    """Token loop. q, k: (B, T, HK, K); v: (B, T, HV, V); g, beta: (B, T, HV);
    reset: (B, T) bool or None (True drops the state before that token; ignored at t = 0, where
    initial_state (B, HV, K, V) applies). Returns o (B, T, HV, V) in v's dtype and the final
    state (B, HV, K, V) in fp32 (fp64 for fp64 inputs)."""
    out_dtype = v.dtype
    q, k, v, g, beta = prepare(q, k, v, g, beta, scale, use_qk_l2norm)
    B, T, HV, K = k.shape
    S = v.new_zeros(B, HV, K, v.shape[3]) if initial_state is None else initial_state.to(v.dtype)
    outs = []
    for t in range(T):
        if reset is not None and t > 0:
            S = S * (~reset[:, t]).to(S.dtype)[:, None, None, None]
        S = S * torch.exp(g[:, t])[..., None, None]
        k_t = k[:, t]  # (B, HV, K)
        delta = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhk,bhkv->bhv", k_t, S))  # (B, HV, V)
        S = S + k_t[..., :, None] * delta[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(outs, dim=1).to(out_dtype), S
