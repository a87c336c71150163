"""The Titans neural long-term memory (Behrouz et al., arXiv 2501.00663, §3.1 and §4.4), per token
in float64, for the memory, titans_mag and titans_mac references. Reads the weights of a built
`NeuralMemory` module (prefix e.g. "memory.") and nothing else of loom.

Per head, memory M_W an MLP without biases, rows as vectors: h = x W_1, act, ..., z = h W_L,
optionally M_W(x) = z / sqrt(mean(z^2) + 1e-6) * gamma. Per token of a document:
    q, k, v  = SiLU(causal depthwise conv(x W_q, x W_k, x W_v)); q, k l2-normalised
    theta    = theta_max sigmoid(.), eta = sigmoid(.), alpha = sigmoid(.)   (one x W_g + b, 3H wide)
    at a document start: W <- W0, S <- 0; at a chunk start: G <- W (gradients within a chunk at G)
    u_t      = d/dW ||M_W(k_t) - v_t||^2 at W = G
    S_t      = eta_t S_{t-1} - theta_t u_t            (momentum: past surprise)
    W_t      = (1 - alpha_t) W_{t-1} + S_t            (forgetting)
    y_t      = M_{W_t}(q_t)
momentum_step "chunk": at a chunk start S <- eta S, W <- (1 - alpha) W + S; then S -= theta u and
W -= theta u per token. retrieval "chunk": y_t = M_G(q_t).
"""
from __future__ import annotations

import math

import torch
from _refs import W, causal_conv, lin, sigmoid, silu


def gelu(z):
    return 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))


def mlp(ws, x, act, gamma):
    h = x
    for i, w in enumerate(ws):
        h = h @ w
        if i < len(ws) - 1:
            h = act(h)
    if gamma is not None:
        h = h / torch.sqrt((h * h).mean(-1, keepdim=True) + 1e-6) * gamma
    return h


def memory_reference(m, prefix, x, pos, *, n_heads, head_dim, chunk, depth, theta_max=None, act="gelu",
                     retrieval="token", momentum_step="token", norm=True, conv=True, reset=None):
    """y (B, T, H, K) of the NeuralMemory at `prefix` of mixer m on its input x (B, T, D_in).
    reset (B, T) bool: where the memory restarts (default: document starts, pos == 0)."""
    B, T, _ = x.shape
    Hh, Kh = n_heads, head_dim
    fn = gelu if act == "gelu" else silu
    lr = theta_max if theta_max is not None else 1.0 / (2 * chunk)
    w0 = [W(m, f"{prefix}w0.{i}") for i in range(depth)]
    gamma = W(m, f"{prefix}norm_weight") if norm else None
    y = torch.zeros(B, T, Hh, Kh, dtype=torch.float64)
    reset = pos == 0 if reset is None else reset
    for b in range(B):
        qkv = torch.cat([lin(x[b], W(m, f"{prefix}{n}_proj.weight")) for n in "qkv"], -1)
        if conv:
            qkv = torch.stack([causal_conv(qkv, W(m, f"{prefix}conv.weight"), pos[b], t) for t in range(T)])
        q, k, v = silu(qkv).view(T, 3, Hh, Kh).unbind(1)
        q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        k = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        gates = sigmoid(lin(x[b], W(m, f"{prefix}gate_proj.weight"), W(m, f"{prefix}gate_proj.bias"))).view(T, 3, Hh)
        for h in range(Hh):
            Wt = Sm = Gw = None
            n = 0
            for t in range(T):
                if bool(reset[b, t]) or Wt is None:
                    Wt, Sm, n = [w[h] for w in w0], [torch.zeros_like(w[h]) for w in w0], 0
                th, et, al = lr * gates[t, 0, h], gates[t, 1, h], gates[t, 2, h]
                g_h = None if gamma is None else gamma[h]
                if n == 0:
                    Gw = [w.clone() for w in Wt]
                    if momentum_step == "chunk":
                        Sm = [et * s for s in Sm]
                        Wt = [(1 - al) * w + s for w, s in zip(Wt, Sm)]
                leaves = [w.clone().requires_grad_() for w in Gw]
                with torch.enable_grad():
                    loss = ((mlp(leaves, k[t, h], fn, g_h) - v[t, h]) ** 2).sum()
                    u = torch.autograd.grad(loss, leaves)
                if momentum_step == "chunk":
                    Sm = [s - th * gi for s, gi in zip(Sm, u)]
                    Wt = [w - th * gi for w, gi in zip(Wt, u)]
                else:
                    Sm = [et * s - th * gi for s, gi in zip(Sm, u)]
                    Wt = [(1 - al) * w + s for w, s in zip(Wt, Sm)]
                n = (n + 1) % chunk
                y[b, t, h] = mlp(Gw if retrieval == "chunk" else Wt, q[t, h], fn, g_h)
    return y
