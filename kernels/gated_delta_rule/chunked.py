"""Gated delta rule in chunks (the WY / UT form of DeltaNet and Gated DeltaNet): the CPU path.

Legend: B batch, T tokens, H value heads (q and k already expanded to them), K key dim,
V value dim, N chunks, C chunk length (64), i, j positions inside a chunk.

Per chunk, with the state Z (K, V) before it, gam_i = sum_{s <= i} g_s (log-decay from the
chunk start), d_i the document of token i counted from the chunk start (0: the document
the chunk opens in) and D[i, j] = exp(gam_i - gam_j) [j <= i, d_i = d_j]:

    A    = strict lower part of (beta_i k_i . k_j) D[i, j]            (C, C)
    U, W = (I + A)^-1 [beta v, beta exp(gam) [d = 0] k]               (UT transform, one solve)
    Vn   = U - W Z                                                     new values, (C, V)
    o    = (exp(gam) [d = 0] q) Z + ((q k^T) * D) Vn
    Z'   = exp(gam_C) [no reset in the chunk] Z + (exp(gam_C - gam) [d = d_C] k)^T Vn

Every exponent is <= 0 (g <= 0), so nothing overflows; the entries above the diagonal are
masked before the exp. A document start inside a chunk masks D and A (tokens of different
documents never meet), stops the reads of the incoming state Z after it and keeps only the
last document's keys in Z'. The last chunk is padded with beta = g = 0 and zero keys, which
leaves Z' exact. Everything is a batched matmul over the chunks of a segment (32 chunks,
2K tokens, kept in cache) except the chunk-to-chunk scan of Z, a loop over chunks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _chunks(x: torch.Tensor, n: int, C: int) -> torch.Tensor:
    """(B, T, H, *X) -> zero-padded (B, H, N, C, *X)."""
    B, T, H = x.shape[:3]
    x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, 0, 0, n * C - T))
    x = x.view(B, n, C, H, *x.shape[3:])
    return x.permute(0, 3, 1, 2, *range(4, x.dim()))


def _segment(q, k, v, g, beta, reset, C: int, Z):
    """One stretch of whole chunks. q, k: (B, T, H, K); v: (B, T, H, V); g, beta: (B, T, H);
    reset: (B, T) bool (a document starts there, the first token included); Z: (B, H, K, V).
    Returns o (B, T, H, V) and the state after the stretch."""
    B, T, H, _ = k.shape
    n = -(-T // C)
    qc, kc, vc = _chunks(q, n, C), _chunks(k, n, C), _chunks(v, n, C)  # (B, H, N, C, X)
    gc, bc = _chunks(g[..., None], n, C)[..., 0], _chunks(beta[..., None], n, C)[..., 0]  # (B, H, N, C)
    doc = F.pad(reset, (0, n * C - T)).view(B, 1, n, C).long().cumsum(-1)  # (B, 1, N, C)
    gam = gc.cumsum(-1)  # (B, H, N, C)

    i = torch.arange(C, device=k.device)
    visible = (i[:, None] >= i[None, :]) & (doc[..., :, None] == doc[..., None, :])  # (B, 1, N, C, C)
    D = torch.exp(torch.where(visible, gam[..., :, None] - gam[..., None, :], float("-inf")))  # (B, H, N, C, C)
    strict = (i[:, None] > i[None, :])
    A = (kc @ kc.transpose(-1, -2)) * D * strict * bc[..., :, None]
    first = doc == 0  # (B, 1, N, C) tokens that still read the incoming state
    read = torch.exp(gam) * first  # (B, H, N, C)
    rhs = torch.cat([bc[..., None] * vc, (bc * read)[..., None] * kc], dim=-1)  # (B, H, N, C, V + K)
    eye = torch.eye(C, dtype=A.dtype, device=A.device)
    UW = torch.linalg.solve_triangular(A + eye, rhs, upper=False, unitriangular=True)
    U, W = UW.split([v.shape[3], k.shape[3]], dim=-1)
    P = (qc @ kc.transpose(-1, -2)) * D  # (B, H, N, C, C)
    q_read = qc * read[..., None]
    k_end = kc * (torch.exp(gam[..., -1:] - gam) * (doc == doc[..., -1:]))[..., None]
    carry = (torch.exp(gam[..., -1]) * first[..., -1])[..., None, None]  # (B, H, N, 1, 1)

    outs = []
    # unbind, not indexing: indexing in a loop makes autograd build one full-size gradient per step
    for U_n, W_n, P_n, qr_n, ke_n, c_n in zip(U.unbind(2), W.unbind(2), P.unbind(2), q_read.unbind(2),
                                              k_end.unbind(2), carry.unbind(2)):
        Vn = U_n - W_n @ Z  # (B, H, C, V)
        outs.append(qr_n @ Z + P_n @ Vn)
        Z = c_n * Z + ke_n.transpose(-1, -2) @ Vn
    o = torch.stack(outs, dim=2)  # (B, H, N, C, V)
    return o.permute(0, 2, 3, 1, 4).reshape(B, n * C, H, -1)[:, :T], Z


def gated_delta_rule_chunked(q, k, v, g, beta, *, reset=None, initial_state=None, chunk: int = 64,
                             segment_chunks: int = 32):
    """q, k: (B, T, H, K) already normalised, scaled and expanded to the value heads; v: (B, T, H, V);
    g, beta: (B, T, H); reset: (B, T) bool or None (ignored at t = 0, where initial_state
    (B, H, K, V) applies); all in the compute dtype. Returns o (B, T, H, V) and the final state
    (B, H, K, V), both in the compute dtype."""
    B, T, H, K = k.shape
    if reset is None:
        reset = torch.zeros(B, T, dtype=torch.bool, device=k.device)
    reset = torch.cat([torch.zeros_like(reset[:, :1]), reset[:, 1:]], dim=1)
    Z = v.new_zeros(B, H, K, v.shape[3]) if initial_state is None else initial_state.to(v.dtype)
    chunk = min(chunk, T)  # a decoding step (T = 1) is one chunk of one token, not 64 padded ones
    span = chunk * segment_chunks
    outs = []
    # split, not slicing in the loop: each slice's backward would build a full-size gradient
    for parts in zip(*(x.split(span, dim=1) for x in (q, k, v, g, beta, reset))):
        o, Z = _segment(*parts, chunk, Z)
        outs.append(o)
    return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)), Z
