"""Neural memory (Titans LMM), chunk-parallel: matmuls inside a chunk, a loop over chunks.

Legend: B batch, T tokens, H heads, K head dim, N chunk blocks per row,
C slots per block (<= chunk_size), D_in / D_out sides of one memory matrix.

Layout (layout.py). Chunks follow a grid that restarts at every document
reset, so rows may cut their chunks at different tokens. Each chunk is placed
left-aligned in a block of C slots: block n of row b holds that row's n-th
chunk; unused tail slots are padding (theta = 0, eta = 1, alpha = 0, and the
block's end state is read at its last real token). When nothing is reset
mid-row, nothing is masked and no offset is carried, the layout is a reshape.

Inside a block with start weights G (gradients), initial weights W_s and
momentum S_s, and local products p_t = prod_{j<=t} eta_j,
beta_t = prod_{j<=t} (1 - alpha_j):
    Ep[t, i] = p_t / p_i,    Db[t, j] = beta_t / beta_j          (i, j <= t; segment sums in log space)
    S_t = p_t S_s - sum_i Ep[t, i] theta_i u_i
    W_t = beta_t W_s + (Db p)_t S_s - sum_i (Db Ep diag(theta))[t, i] u_i
and u_i = h_i^T delta_i per layer is a rank-1 matrix (h_i the layer input,
delta_i the loss gradient w.r.t. the layer output, both at G), so every sum
over tokens is a matmul H^T diag(c) Delta and no per-token weights are
built. The "token" read-out uses the same identity on the query side:
    z_t = beta_t (h_t W_s) + (Db p)_t (h_t S_s) - sum_i Cw[t, i] (h_t . h_i) delta_i
i.e. a masked (C x C) product, as in chunked linear attention.

momentum_step="chunk" steps momentum and decay once per chunk, at its first
token, with that token's gates (eta_0, alpha_0); every gradient then enters
S and W with the same weight theta_i:
    S_t = eta_0 S_s - sum_{i<=t} theta_i u_i,   W_t = (1 - alpha_0) W_s + eta_0 S_s - sum_{i<=t} theta_i u_i
so a block needs one chunk-end sum per layer instead of two, and no (C x C)
decay products. A first block that continues a carried chunk takes no step.
"""
from __future__ import annotations

import torch

from loom.kernels.memory.common import FAST_ACTIVATIONS, NORM_EPS, MemoryState, Weights, mlp_forward, out_norm
from loom.kernels.memory.layout import doc_chunks


def _segsum(x: torch.Tensor) -> torch.Tensor:
    """x (..., C) -> (..., C, C): out[t, i] = sum_{i < l <= t} x_l, -inf where i > t.

    Summing masked copies (rather than differencing a cumsum) keeps exact
    zeros and avoids cancellation when the gates are tiny."""
    C = x.shape[-1]
    ones = torch.ones(C, C, dtype=torch.bool, device=x.device)
    xx = x[..., :, None].expand(*x.shape, C).masked_fill(~ones.tril(-1), 0)
    return xx.cumsum(dim=-2).masked_fill(~ones.tril(), float("-inf"))


def _out_norm_backward(z, g, norm_weight):
    """d loss / dz for o = z / r * gamma, r = sqrt(mean_K z^2 + eps), given g = d loss / do."""
    rinv = torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + NORM_EPS)
    gg = g * norm_weight[:, None, :]
    return rinv * gg - z * rinv.pow(3) * (gg * z).mean(-1, keepdim=True)


def _coefficients(theta, eta, alpha, last, retrieval: str, step_at_start=None) -> dict[str, tuple[torch.Tensor, ...]]:
    """The gate products of every block at once (they need no weights, so they leave the loop).
    theta, eta, alpha (B, N, H, C); last (B, N); step_at_start (B, N) bool for momentum_step="chunk"
    (the block starts a chunk), None for "token". Returns name -> N tensors of shape (B, H, ...)."""
    if step_at_start is not None:
        return _chunk_step_coefficients(theta, eta, alpha, retrieval, step_at_start)
    tiny = torch.finfo(eta.dtype).tiny
    log_eta = torch.log(eta.clamp_min(tiny))
    log_keep = torch.log((1 - alpha).clamp_min(tiny))
    p = torch.exp(log_eta.cumsum(-1))                       # (B, N, H, C)
    beta = torch.exp(log_keep.cumsum(-1))
    Ep = torch.exp(_segsum(log_eta))                        # (B, N, H, C, C)
    Db = torch.exp(_segsum(log_keep))
    E = Ep * theta[..., None, :]                            # S_t coefficient of u_i
    B, N, H, C = theta.shape
    row = last.view(B, N, 1, 1, 1).expand(B, N, H, 1, C)
    E_end = E.gather(-2, row)                               # (B, N, H, 1, C)
    Db_end = Db.gather(-2, row)
    out = {
        "end": torch.cat([E_end, Db_end @ E], dim=-2).transpose(-1, -2),  # (B, N, H, C, 2): S_end, W_end of u_i
        "p_end": p.gather(-1, row[..., 0])[..., None],      # (B, N, H, 1, 1)
        "beta_end": beta.gather(-1, row[..., 0])[..., None],
        "bS_end": Db_end @ p[..., None],                    # (B, N, H, 1, 1)
    }
    if retrieval == "token":
        out.update(Cw=Db @ E, bS=Db @ p[..., None], beta=beta[..., None])  # (B, N, H, C, C), (.., C, 1) x2
    return {name: x.unbind(1) for name, x in out.items()}


def _chunk_step_coefficients(theta, eta, alpha, retrieval: str, step_at_start) -> dict[str, tuple[torch.Tensor, ...]]:
    """`_coefficients` for momentum_step="chunk": the first slot's gates, where the block starts a chunk."""
    start = step_at_start[:, :, None]                                       # (B, N, 1)
    # S_t = p S_s - sum_i theta_i u_i,  W_t = keep W_s + bS S_s - sum_i theta_i u_i; without a step
    # p = keep = 1 and bS = 0
    p = torch.where(start, eta[..., 0], 1.0)[..., None, None]              # (B, N, H, 1, 1)
    keep = torch.where(start, 1 - alpha[..., 0], 1.0)[..., None, None]
    bS = torch.where(start, eta[..., 0], 0.0)[..., None, None]
    out = {"end": theta[..., None], "p_end": p, "beta_end": keep, "bS_end": bS}  # end: (B, N, H, C, 1)
    if retrieval == "token":
        C = theta.shape[-1]
        tril = torch.ones(C, C, dtype=torch.bool, device=theta.device).tril()
        out.update(Cw=theta[..., None, :] * tril, bS=bS, beta=keep)         # Cw[t, i] = theta_i for i <= t
    return {name: x.unbind(1) for name, x in out.items()}


def chunk_end_update(x, d, end, p_end, beta_end, bS_end, S_l, W_l):
    """One layer's chunk-end step: S_end = p_end S - sum_i cS_i x_i^T d_i and
    W_end = beta_end W + bS_end S - sum_i cW_i x_i^T d_i, as one matmul with the two coefficient
    columns of `end` multiplied into the narrower of the two sides. x (B, H, C, D_in), d (B, H, C,
    D_out), end (B, H, C, 2) [cS, cW] or (B, H, C, 1) [one shared row], p_end, beta_end, bS_end
    (B, H, 1, 1), S_l, W_l (B or 1, H, D_in, D_out). (memory/triton.py fuses the same step.)"""
    d_in, d_out = x.shape[-1], d.shape[-1]
    if end.shape[-1] == 1:
        x, d = (x * end, d) if d_in <= d_out else (x, d * end)
        s_sum = w_sum = x.transpose(-1, -2) @ d
    elif d_in <= d_out:
        scaled = (x[..., :, None, :] * end[..., None]).flatten(-2)   # (B, H, C, 2 * D_in)
        sums = (scaled.transpose(-1, -2) @ d).unflatten(-2, (2, d_in))  # (B, H, 2, D_in, D_out)
        s_sum, w_sum = sums.unbind(-3)
    else:
        scaled = (end[..., None] * d[..., :, None, :]).flatten(-2)   # (B, H, C, 2 * D_out)
        sums = x.transpose(-1, -2) @ scaled             # (B, H, D_in, 2 * D_out)
        s_sum, w_sum = sums[..., :d_out], sums[..., d_out:]
    return p_end * S_l - s_sum, beta_end * W_l + bS_end * S_l - w_sum


def chunk_start_grad(k, v, G: Weights, activation: str, norm_weight):
    """The per-token loss gradient at the chunk-start weights G, by hand: keys through the
    memory, the error against the values, and the backprop to every layer's output.
    k, v (B, H, C, K); G[l] (B or 1, H, D_in, D_out); norm_weight (H, K) or None.

    Returns inputs, deltas: inputs[l] (B, H, C, D_in) the input of layer l at G (inputs[0] = k),
    deltas[l] (B, H, C, D_out) d ||M_G(k) - v||^2 / d z_l, so that token c's gradient of layer l is
    inputs[l][c]^T deltas[l][c]. (memory/triton.py fuses the same step at depth 1 and 2.)"""
    act_and_grad = FAST_ACTIVATIONS[activation][1]
    depth = len(G)
    inputs, slopes = [k], []                                # inputs[l]: (B, H, C, D_in) of layer l
    h = k
    for l, g in enumerate(G):
        h = h @ g
        if l < depth - 1:
            h, slope = act_and_grad(h)
            inputs.append(h)
            slopes.append(slope)
    err = 2.0 * (out_norm(h, norm_weight) - v)              # d ||M(k) - v||^2 / d M(k), (B, H, C, K)
    deltas = [err if norm_weight is None else _out_norm_backward(h, err, norm_weight)]
    for l in range(depth - 1, 0, -1):
        deltas.insert(0, (deltas[0] @ G[l].transpose(-1, -2)) * slopes[l - 1])
    return inputs, deltas


def _block(q, k, v, co: dict, G: Weights, W: Weights, S: Weights, activation: str, retrieval: str,
           norm_weight, start_grad=None, end_update=None):
    """One block for all (B, H). q, k, v (B, H, C, K); co this block's `_coefficients`; G, W, S
    per layer (B or 1, H, D_in, D_out); norm_weight (H, K) or None; start_grad the gradient at
    the chunk start and end_update the chunk-end step of one layer (None: `chunk_start_grad`,
    `chunk_end_update`; memory/triton.py's on CUDA).

    Returns y (B, H, C, K), W_end, S_end."""
    act = FAST_ACTIVATIONS[activation][0]
    depth = len(G)
    inputs, deltas = (start_grad or chunk_start_grad)(k, v, G, activation, norm_weight)

    W_end, S_end = [], []
    for l in range(depth):
        s_end, w_end = (end_update or chunk_end_update)(inputs[l], deltas[l], co["end"], co["p_end"],
                                                         co["beta_end"], co["bS_end"], S[l], W[l])
        S_end.append(s_end)
        W_end.append(w_end)

    if retrieval == "chunk":
        y = mlp_forward(G, q, act, norm_weight)
    else:
        Cw, bS, beta = co["Cw"], co["bS"], co["beta"]
        h = q
        for l in range(depth):
            scores = (h @ inputs[l].transpose(-1, -2)) * Cw
            h_new = beta * (h @ W[l]) + bS * (h @ S[l]) - scores @ deltas[l]
            h = act(h_new) if l < depth - 1 else h_new
        y = out_norm(h, norm_weight)
    return y, tuple(W_end), tuple(S_end)


_COMPILED = {}


def _compiled(fn):
    """`fn` through torch.compile (inductor: fused C++ on CPU, Triton on CUDA), built once. The
    same maths; it fuses the elementwise work and the autograd nodes between the matmuls."""
    if fn.__name__ not in _COMPILED:
        _COMPILED[fn.__name__] = torch.compile(fn)
    return _COMPILED[fn.__name__]


def neural_memory_chunked(q, k, v, theta, eta, alpha, init_weights: Weights, *, chunk_size: int,
                          state: MemoryState | None = None, reset: torch.Tensor | None = None,
                          mask: torch.Tensor | None = None, activation: str = "gelu",
                          retrieval: str = "chunk", norm_weight: torch.Tensor | None = None,
                          momentum_step: str = "token", compiled: bool = False, start_grad=None,
                          end_update=None):
    """Chunk-parallel neural memory. Shapes and semantics as `loom.kernels.memory.neural_memory`;
    `compiled` runs the gate coefficients and each block through torch.compile; `start_grad` and
    `end_update` replace the gradient at the chunk start and the per-layer chunk-end step
    (memory/triton.py's kernels).

    Returns (y (B, T, H, K), final MemoryState)."""
    block, coefficients = (_compiled(_block), _compiled(_coefficients)) if compiled else (_block, _coefficients)
    B, T, H, K = q.shape
    if state is None:
        state = MemoryState.initial(init_weights, B)
    lay = doc_chunks(reset, state.offset, T, chunk_size, mask)
    N, C = lay.n_blocks, lay.width

    def blocks(x, pad):  # (B, T, H[, K]) -> (B, N, H, C[, K])
        return lay.to_blocks(x, pad).transpose(2, 3)

    # unbind, not indexing: the backward of x[n] would zero-fill all of x once per block.
    qb, kb, vb = (blocks(x, 0.0).unbind(1) for x in (q, k, v))
    step_at_start = None
    if momentum_step == "chunk":  # every block starts a chunk, but a first one that continues a carried chunk
        step_at_start = torch.ones(B, N, dtype=torch.bool, device=q.device)
        step_at_start[:, 0] = (state.offset == 0) | lay.block_reset[:, 0]
    co = coefficients(blocks(theta, 0.0), blocks(eta, 1.0), blocks(alpha, 0.0),
                      (lay.length - 1).clamp_min(0), retrieval, step_at_start)
    any_reset = lay.block_reset.any(dim=0).tolist()
    all_real = (lay.length > 0).all(dim=0).tolist()
    W0 = tuple(w[None] for w in init_weights)               # (1, H, D_in, D_out)

    G, W, S = state.base, state.weights, state.momentum
    G_last = G
    ys = []
    for n in range(N):
        if any_reset[n]:
            r = lay.block_reset[:, n].view(B, 1, 1, 1)
            G = tuple(torch.where(r, w0, g) for w0, g in zip(W0, G))
            W = tuple(torch.where(r, w0, w) for w0, w in zip(W0, W))
            S = tuple(torch.where(r, 0.0, s) for s in S)
        y, W_end, S_end = block(qb[n], kb[n], vb[n], {name: c[n] for name, c in co.items()}, G, W, S,
                                 activation, retrieval, norm_weight, start_grad, end_update)
        ys.append(y)
        if all_real[n]:
            G_last, W, S = G, W_end, S_end
        else:  # rows whose chunks have run out keep their state
            real = (lay.length[:, n] > 0).view(B, 1, 1, 1)
            G_last = tuple(torch.where(real, g, gl) for g, gl in zip(G, G_last))
            W = tuple(torch.where(real, a, b) for a, b in zip(W_end, W))
            S = tuple(torch.where(real, a, b) for a, b in zip(S_end, S))
        G = W
    y = lay.from_blocks(torch.stack(ys, dim=1).transpose(2, 3), T)  # (B, N, H, C, K) -> (B, T, H, K)
    done = (lay.end_offset == 0).view(B, 1, 1, 1)
    base = tuple(torch.where(done, w, g) for w, g in zip(W, G_last))
    return y, MemoryState(W, S, base, lay.end_offset)
