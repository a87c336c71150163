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


class HeadMemory:
    """The memory of one (row, head): weights W, momentum S, chunk-start weights G, chunk counter n."""

    def __init__(self, w0, gamma, act, chunk, retrieval="token", momentum_step="token"):
        self.w0, self.gamma, self.act, self.chunk = w0, gamma, act, chunk
        self.retrieval, self.momentum_step = retrieval, momentum_step
        self.reset()

    def reset(self):
        self.W, self.S, self.n = list(self.w0), [torch.zeros_like(w) for w in self.w0], 0
        self.G = list(self.w0)

    def read(self, q, weights=None):
        return mlp(self.W if weights is None else weights, q, self.act, self.gamma)

    def step(self, q, k, v, th, et, al):
        """Write (k, v) with gates theta, eta, alpha; return the read of q."""
        if self.n == 0:
            self.G = [w.clone() for w in self.W]
            if self.momentum_step == "chunk":
                self.S = [et * s for s in self.S]
                self.W = [(1 - al) * w + s for w, s in zip(self.W, self.S)]
        leaves = [w.clone().requires_grad_() for w in self.G]
        with torch.enable_grad():
            loss = ((mlp(leaves, k, self.act, self.gamma) - v) ** 2).sum()
            u = torch.autograd.grad(loss, leaves)
        if self.momentum_step == "chunk":
            self.S = [s - th * g for s, g in zip(self.S, u)]
            self.W = [w - th * g for w, g in zip(self.W, u)]
        else:
            self.S = [et * s - th * g for s, g in zip(self.S, u)]
            self.W = [(1 - al) * w + s for w, s in zip(self.W, self.S)]
        self.n = (self.n + 1) % self.chunk
        return self.read(q, self.G if self.retrieval == "chunk" else self.W)


def memory_inputs(m, prefix, x_row, pos_row, n_heads, head_dim, chunk, theta_max=None, conv=True):
    """q, k, v (T, H, K) and theta, eta, alpha (T, H) of the memory at `prefix` for one row's inputs."""
    T = x_row.shape[0]
    lr = theta_max if theta_max is not None else 1.0 / (2 * chunk)
    qkv = torch.cat([lin(x_row, W(m, f"{prefix}{n}_proj.weight")) for n in "qkv"], -1)
    if conv:
        qkv = torch.stack([causal_conv(qkv, W(m, f"{prefix}conv.weight"), pos_row, t) for t in range(T)])
    q, k, v = silu(qkv).view(T, 3, n_heads, head_dim).unbind(1)
    q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    k = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    g = sigmoid(lin(x_row, W(m, f"{prefix}gate_proj.weight"), W(m, f"{prefix}gate_proj.bias"))).view(T, 3, n_heads)
    return q, k, v, lr * g[:, 0], g[:, 1], g[:, 2]


def head_memories(m, prefix, n_heads, depth, chunk, act="gelu", norm=True, **kw):
    w0 = [W(m, f"{prefix}w0.{i}") for i in range(depth)]
    gamma = W(m, f"{prefix}norm_weight") if norm else None
    fn = gelu if act == "gelu" else silu
    return [HeadMemory([w[h] for w in w0], None if gamma is None else gamma[h], fn, chunk, **kw)
            for h in range(n_heads)]


def memory_reference(m, prefix, x, pos, *, n_heads, head_dim, chunk, depth, theta_max=None, act="gelu",
                     retrieval="token", momentum_step="token", norm=True, conv=True):
    """y (B, T, H, K) of the NeuralMemory at `prefix` of mixer m on its input x (B, T, D_in);
    the memory restarts at document starts (pos == 0)."""
    B, T, _ = x.shape
    y = torch.zeros(B, T, n_heads, head_dim, dtype=torch.float64)
    for b in range(B):
        q, k, v, th, et, al = memory_inputs(m, prefix, x[b], pos[b], n_heads, head_dim, chunk, theta_max, conv)
        mems = head_memories(m, prefix, n_heads, depth, chunk, act, norm, retrieval=retrieval,
                             momentum_step=momentum_step)
        for t in range(T):
            for h, mem in enumerate(mems):
                if int(pos[b, t]) == 0:
                    mem.reset()
                y[b, t, h] = mem.step(q[t, h], k[t, h], v[t, h], th[t, h], et[t, h], al[t, h])
    return y
