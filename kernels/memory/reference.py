"""Neural memory (Titans LMM) written as its definition: test oracles, not fast.

Legend: B batch, T tokens, H heads, K head dim, L tokens in one chunk.

For every batch row, token by token (gates broadcast over the weights):

    if reset[t]:           W <- W0, S <- 0, chunk restarts        (document start)
    if t starts a chunk:   G <- W                                  (chunk-start weights)
    u_t = d/dW ||M_W(k_t) - v_t||^2  at W = G                     (sum over K; no 1/2; M as in common.py)
    S_t = eta_t * S_{t-1} - theta_t * u_t
    W_t = (1 - alpha_t) * W_{t-1} + S_t
      momentum_step="chunk" instead steps momentum and decay once per chunk, at its first token t0
      (S <- eta_t0 S, W <- (1 - alpha_t0) W + S), then S <- S - theta_t u_t and W <- W - theta_t u_t
      for every token t of the chunk; at chunk size 1 both rules are the same
    y_t = M_G(q_t)    retrieval="chunk"  (at chunk size 1: M_{W_{t-1}}(q_t), read before write)
    y_t = M_{W_t}(q_t) retrieval="token" (the paper's read after write)
Tokens with mask[t] = False are skipped: no update, no place in a chunk, y_t = 0.

Chunks are laid out on a grid that restarts at every reset: a chunk is the
next `chunk_size` tokens of the document, cut short by a reset; a carried
state with offset o > 0 continues its chunk for chunk_size - o more tokens.

Two oracles, both with Python loops (used in tests only):
- `neural_memory_reference`: the loop above, inner gradients by autograd.
- `neural_memory_naive_chunks`: a loop over chunks; the chunk's per-token
  gradients are materialised with torch.func (L copies of the weights), the
  momentum/decay recurrences in closed form with cumulative products, and
  per-token weights materialised for the read-out.
"""
from __future__ import annotations

import torch

from loom.kernels.memory.common import ACTIVATIONS, MemoryState, Weights, mlp_forward


def _assoc_loss(weights: Weights, k_HK: torch.Tensor, v_HK: torch.Tensor, act, norm_weight) -> torch.Tensor:
    """sum over heads and K of (M_W(k) - v)^2 for one token; weights[l] (H, D_in, D_out)."""
    out = mlp_forward(weights, k_HK[:, None, :], act, norm_weight)[:, 0]
    return ((out - v_HK) ** 2).sum()


def _token_grad(G: Weights, k_HK, v_HK, act, norm_weight) -> Weights:
    """u = d loss / dW at W = G for one token, differentiable w.r.t. G, k, v."""
    with torch.enable_grad():
        leaves = tuple(g if g.requires_grad else g.detach().requires_grad_() for g in G)
        loss = _assoc_loss(leaves, k_HK, v_HK, act, norm_weight)
        return torch.autograd.grad(loss, leaves, create_graph=True)


def _row_init(state: MemoryState | None, init_weights: Weights, b: int):
    if state is None:
        zeros = tuple(torch.zeros_like(w) for w in init_weights)
        return tuple(init_weights), zeros, tuple(init_weights), 0
    pick = lambda ws: tuple(w[b] for w in ws)  # noqa: E731
    return pick(state.weights), pick(state.momentum), pick(state.base), int(state.offset[b])


def _stack_state(rows, init_weights) -> MemoryState:
    W, S, G, off = zip(*rows)
    stack = lambda per_row: tuple(torch.stack(ws) for ws in zip(*per_row))  # noqa: E731
    return MemoryState(stack(W), stack(S), stack(G), torch.tensor(off, device=init_weights[0].device))


def neural_memory_reference(q, k, v, theta, eta, alpha, init_weights, *, chunk_size, state=None,
                            reset=None, mask=None, activation="gelu", retrieval="chunk", norm_weight=None,
                            momentum_step="token"):
    """The token-by-token definition. Shapes as `loom.kernels.memory.neural_memory`.

    Returns (y (B, T, H, K), final MemoryState)."""
    act = ACTIVATIONS[activation][0]
    B, T, H, K = q.shape
    zeros = tuple(torch.zeros_like(w) for w in init_weights)
    ys, finals = [], []
    for b in range(B):
        W, S, G, n = _row_init(state, init_weights, b)
        y_row = []
        for t in range(T):
            if mask is not None and not bool(mask[b, t]):  # a skipped token: no update, output 0
                y_row.append(torch.zeros_like(q[b, t]))
                continue
            if reset is not None and bool(reset[b, t]):
                W, S, n = tuple(init_weights), zeros, 0
            th, et, al = (g[b, t][:, None, None] for g in (theta, eta, alpha))  # (H, 1, 1)
            if n == 0:
                G = W
                if momentum_step == "chunk":
                    S = tuple(et * s for s in S)
                    W = tuple((1 - al) * w + s for w, s in zip(W, S))
            u = _token_grad(G, k[b, t], v[b, t], act, norm_weight)
            if momentum_step == "chunk":
                S = tuple(s - th * g for s, g in zip(S, u))
                W = tuple(w - th * g for w, g in zip(W, u))
            else:
                S = tuple(et * s - th * g for s, g in zip(S, u))
                W = tuple((1 - al) * w + s for w, s in zip(W, S))
            n = (n + 1) % chunk_size
            read = G if retrieval == "chunk" else W
            y_row.append(mlp_forward(read, q[b, t][:, None, :], act, norm_weight)[:, 0])  # (H, K)
        ys.append(torch.stack(y_row))
        finals.append((W, S, W if n == 0 else G, n))
    return torch.stack(ys), _stack_state(finals, init_weights)


def _row_chunks(reset_row, T: int, chunk_size: int, offset: int) -> list[tuple[int, int, bool]]:
    """[(start, end, starts_with_reset)] for one row, by walking the tokens."""
    chunks, n = [], offset
    for t in range(T):
        r = reset_row is not None and bool(reset_row[t])
        if r:
            n = 0
        if t == 0 or n == 0:
            chunks.append([t, t + 1, r])
        else:
            chunks[-1][1] = t + 1
        n = (n + 1) % chunk_size
    return [tuple(c) for c in chunks]


def neural_memory_naive_chunks(q, k, v, theta, eta, alpha, init_weights, *, chunk_size, state=None,
                               reset=None, mask=None, activation="gelu", retrieval="chunk", norm_weight=None,
                               momentum_step="token"):
    """Chunk by chunk with materialised per-token gradients and weights.

    Returns (y (B, T, H, K), final MemoryState)."""
    act = ACTIVATIONS[activation][0]
    B, T, H, K = q.shape
    zeros = tuple(torch.zeros_like(w) for w in init_weights)
    # d/dW of the loss of one token, vectorised over the tokens of a chunk: (L, H, D_in, D_out).
    per_token_grad = torch.func.vmap(
        torch.func.grad(lambda W, kk, vv: _assoc_loss(W, kk, vv, act, norm_weight)), in_dims=(None, 0, 0))
    read_token = torch.func.vmap(lambda W, qq: mlp_forward(W, qq[:, None, :], act, norm_weight)[:, 0])
    ys, finals = [], []
    for b in range(B):
        W, S, G, n = _row_init(state, init_weights, b)
        # Skipped (masked) tokens are dropped here and come back as zeros at the end.
        kept = torch.arange(T, device=q.device) if mask is None else torch.nonzero(mask[b])[:, 0]
        qr, kr, vr, thr, etr, alr = (x[b, kept] for x in (q, k, v, theta, eta, alpha))
        y_row = []
        reset_row = None if reset is None else reset[b, kept]
        for t0, t1, is_reset in _row_chunks(reset_row, len(kept), chunk_size, n):
            if is_reset:
                W, S, n = tuple(init_weights), zeros, 0
            if n == 0:
                G = W
            L = t1 - t0
            U = per_token_grad(G, kr[t0:t1], vr[t0:t1])  # per layer (L, H, D_in, D_out)
            th, et, al = (g[t0:t1] for g in (thr, etr, alr))  # (L, H)
            tril = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()[:, :, None]
            if momentum_step == "chunk":
                if n == 0:  # the chunk starts here (not a carried one): one momentum and decay step
                    S = tuple(et[0, :, None, None] * s for s in S)
                    W = tuple((1 - al[0, :, None, None]) * w + s for w, s in zip(W, S))
                # S_t = S' - sum_{i<=t} theta_i u_i ;  W_t = W' - sum_{i<=t} theta_i u_i
                sums = tuple(torch.einsum("tih,ihxy->thxy", tril * th[None], u) for u in U)
                S_all = tuple(s - c for s, c in zip(S, sums))
                W_all = tuple(w - c for w, c in zip(W, sums))
            else:
                p = torch.cumprod(et, 0)                      # p_t = prod_{j<=t} eta_j
                beta = torch.cumprod(1 - al, 0)               # beta_t = prod_{j<=t} (1 - alpha_j)
                ratio_p = torch.where(tril, p[:, None] / p[None, :], 0)          # (t, i, H): p_t / p_i
                ratio_b = torch.where(tril, beta[:, None] / beta[None, :], 0)    # (t, j, H)
                # S_t = p_t S_0 - sum_{i<=t} (p_t/p_i) theta_i u_i ;  W_t = beta_t W_0 + sum_{j<=t} (beta_t/beta_j) S_j
                S_all = tuple(p[:, :, None, None] * s - torch.einsum("tih,ihxy->thxy", ratio_p * th[None], u)
                              for s, u in zip(S, U))
                W_all = tuple(beta[:, :, None, None] * w + torch.einsum("tjh,jhxy->thxy", ratio_b, s_all)
                              for w, s_all in zip(W, S_all))
            if retrieval == "chunk":
                y_row.append(mlp_forward(G, qr[t0:t1].transpose(0, 1), act, norm_weight).transpose(0, 1))
            else:
                y_row.append(read_token(W_all, qr[t0:t1]))
            W = tuple(w_all[-1] for w_all in W_all)
            S = tuple(s_all[-1] for s_all in S_all)
            n = (n + L) % chunk_size
        y_full = q.new_zeros(T, H, K)
        ys.append(y_full.index_copy(0, kept, torch.cat(y_row)) if y_row else y_full)
        finals.append((W, S, W if n == 0 else G, n))
    return torch.stack(ys), _stack_state(finals, init_weights)
