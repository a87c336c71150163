"""RAT, token by token: the readable definition (tests only; O(T * T/L) Python steps).

Legend: B batch, T tokens, G q/k groups, H heads (H % G == 0), K head dim,
L chunk length, C cached chunk states.

For every row, walking the tokens in order, with p = position_ids[b, t]:
    a new document starts at p == 0 (or where seq_ids changes): forget its chunk states;
    g = sigmoid(f_t)                                      (B, T, H, K) -> (H, K)
    k_t, q_t tiled from G groups to H heads: head h uses group h % G
    s_t = (1 - g) * [k_t ; v_t]                 if p % L == 0 or new document
    s_t = g * s_{t-1} + (1 - g) * [k_t ; v_t]   otherwise
    q', k~' = RoPE(q_t), RoPE(k~_t) at chunk index p // L (cos/sin given per token)
    o_t = softmax_j(q' . key_j * scale) value_j over
          [chunk-final states of this document's earlier chunks ; (k~'_t, v~_t)]
    if p % L == L - 1: (k~'_t, v~_t) becomes a chunk-final state of the document.
"""
from __future__ import annotations

import torch

from loom.kernels.rotary import rotate


def rat_reference(q, k, v, f, position_ids, *, chunk: int, seq_ids=None, cos=None, sin=None, scale=None,
                  initial_state=None):
    """Same arguments as `loom.kernels.rat.rat`. Returns (o (B, T, H, K), stats, state)."""
    B, T, G, K = q.shape
    H = v.shape[2]
    L = chunk
    scale = K ** -0.5 if scale is None else scale
    o = q.new_zeros(B, T, H, K)
    lse, local, first = q.new_zeros(B, T, H), q.new_zeros(B, T, H), q.new_zeros(B, T, H)
    finals_k, finals_v, runs_k, runs_v = [], [], [], []
    for b in range(B):
        keys, vals = [], []  # chunk-final states of the current document, each (H, K)
        s_k = q.new_zeros(H, K)
        s_v = q.new_zeros(H, K)
        if initial_state is not None:
            n = int(initial_state["n"][b])
            C = initial_state["k"].shape[1]
            keys = [initial_state["k"][b, j] for j in range(C - n, C)]
            vals = [initial_state["v"][b, j] for j in range(C - n, C)]
            s_k, s_v = initial_state["k_run"][b].to(q.dtype), initial_state["v_run"][b].to(q.dtype)
        for t in range(T):
            p = int(position_ids[b, t])
            new_doc = p == 0 or (seq_ids is not None and t > 0 and bool(seq_ids[b, t] != seq_ids[b, t - 1]))
            if new_doc:
                keys, vals = [], []
            g = torch.sigmoid(f[b, t])
            k_t = k[b, t].repeat(H // G, 1)
            q_t = q[b, t].repeat(H // G, 1)
            if p % L == 0 or new_doc:
                s_k, s_v = (1 - g) * k_t, (1 - g) * v[b, t]
            else:
                s_k = g * s_k + (1 - g) * k_t
                s_v = g * s_v + (1 - g) * v[b, t]
            k_rot, q_rot = s_k, q_t
            if cos is not None:
                k_rot, q_rot = rotate(s_k, cos[b, t], sin[b, t]), rotate(q_t, cos[b, t], sin[b, t])
            key = torch.stack(keys + [k_rot])  # (n + 1, H, K)
            val = torch.stack(vals + [s_v])
            scores = torch.einsum("hk,nhk->hn", q_rot, key) * scale
            p_t = torch.softmax(scores, dim=-1)  # (H, n + 1)
            lse[b, t] = torch.logsumexp(scores, dim=-1)
            local[b, t], first[b, t] = p_t[:, -1], p_t[:, 0]
            o[b, t] = torch.einsum("hn,nhk->hk", p_t, val)
            if p % L == L - 1:
                keys, vals = keys + [k_rot], vals + [s_v]
        finals_k.append(keys)
        finals_v.append(vals)
        runs_k.append(s_k)
        runs_v.append(s_v)
    C = max(len(x) for x in finals_k)
    state_k = q.new_zeros(B, C, H, K)
    state_v = q.new_zeros(B, C, H, K)
    for b in range(B):  # right-aligned: the valid entries are the last n
        n = len(finals_k[b])
        if n:
            state_k[b, C - n:] = torch.stack(finals_k[b])
            state_v[b, C - n:] = torch.stack(finals_v[b])
    state = {"k": state_k, "v": state_v, "n": torch.tensor([len(x) for x in finals_k], dtype=torch.long),
             "k_run": torch.stack(runs_k), "v_run": torch.stack(runs_v)}
    return o, {"lse": lse, "local": local, "first": first}, state
