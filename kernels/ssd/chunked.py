"""The SSD chunk algorithm (Mamba-2, section 6): the CPU path.

Legend: B batch, T tokens, H heads = G groups x R heads per group, P head dim,
N state size, M chunks, Q chunk length, t, j offsets inside a chunk.

With v_t = dt_t x_t and the log decay g_t = dt_t A_h (<= 0, per token and head),
split the zero-padded sequence into M chunks of Q tokens and let
L_t = g_0 + ... + g_t inside a chunk (padding has g = 0, v = 0, so the state
passes through it unchanged). With S_m the state before chunk m:

    intra  Y_m  = [(C_m B_m^T) * W] v_m,   W[t, j] = exp(L_t - L_j), j <= t, same document
    inter  Y_m += exp(L_t) [no document start in 0..t] * C_m S_m^T
    state  S_{m+1} = a_m S_m + U_m,
           U_m = sum_j exp(L_last - L_j) [j in the chunk's last document] v_j B_j^T
           a_m = exp(L_last) if no document starts in the chunk, else 0

Every exponent is <= 0, so nothing overflows. C B^T is computed once per group
and shared by its R heads. Everything is a batched matmul over the chunks of a
segment (`segment_chunks` chunks) at once, except the scan S_{m+1} = a_m S_m + U_m,
a loop over chunks on (B, H, P, N) states; segments run one after another with
the state carried, which keeps the working set in cache at long T.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ssd_chunked"]


def _chunks(x: torch.Tensor, M: int, Q: int, G: int) -> torch.Tensor:
    """(B, T, H, X) -> zero-padded (B, G, H / G, M, Q, X); (B, T, H) -> (B, G, H / G, M, Q)."""
    flat = x.dim() == 3
    if flat:
        x = x[..., None]
    Bt, T, H, X = x.shape
    x = F.pad(x, (0, 0, 0, 0, 0, M * Q - T))
    x = x.view(Bt, M, Q, G, H // G, X).permute(0, 3, 4, 1, 2, 5)
    return x[..., 0] if flat else x


def _scan(U: torch.Tensor, a: torch.Tensor, S: torch.Tensor):
    """States before each chunk (B, G, R, M, P, N) and after the last one."""
    before = []
    # unbind, not U[..., m, :, :]: indexing in a loop makes autograd build one full-size gradient per step
    for U_m, a_m in zip(U.unbind(3), a[..., None, None].unbind(3)):
        before.append(S)
        S = a_m * S + U_m
    return torch.stack(before, dim=3), S


def _segment(v, g, Bm, Cm, starts, S, Q: int):
    """One stretch of whole chunks. v: (B, T, H, P); g: (B, T, H); Bm, Cm: (B, T, G, N);
    starts: (B, T) bool; S: (B, G, R, P, N). Returns y (B, T, H, P) and the state after it."""
    Bt, T, H, P = v.shape
    G = Bm.shape[2]
    M = -(-T // Q)
    vc, gc = _chunks(v, M, Q, G), _chunks(g, M, Q, G)         # (B, G, R, M, Q, P), (B, G, R, M, Q)
    Bc, Cc = _chunks(Bm, M, Q, G), _chunks(Cm, M, Q, G)       # (B, G, 1, M, Q, N)
    seg = F.pad(starts, (0, M * Q - T)).view(Bt, 1, 1, M, Q).long().cumsum(-1)  # document index in the chunk
    L = gc.cumsum(-1)                                         # (B, G, R, M, Q)
    L_last = L[..., -1:]

    i = torch.arange(Q, device=v.device)
    visible = (i[:, None] >= i[None, :]) & (seg[..., :, None] == seg[..., None, :])  # (B, 1, 1, M, Q, Q)
    W = torch.where(visible, L[..., :, None] - L[..., None, :], -torch.inf).exp()    # (B, G, R, M, Q, Q)
    y = torch.matmul(torch.matmul(Cc, Bc.transpose(-1, -2)) * W, vc)                 # (B, G, R, M, Q, P)

    k_fac = torch.exp(L_last - L) * (seg == seg[..., -1:])   # (B, G, R, M, Q): padding shares the last segment
    U = torch.matmul((vc * k_fac[..., None]).transpose(-1, -2), Bc)                  # (B, G, R, M, P, N)
    a = torch.exp(L_last[..., 0]) * (seg[..., -1] == 0)                               # (B, G, R, M)
    before, S = _scan(U, a, S)
    q_fac = torch.exp(L) * (seg == 0)                                                 # (B, G, R, M, Q)
    y = y + torch.matmul(Cc * q_fac[..., None], before.transpose(-1, -2))
    y = y.permute(0, 3, 4, 1, 2, 5).reshape(Bt, M * Q, H, P)[:, :T]                  # (B, T, H, P)
    return y, S


def ssd_chunked(x, dt, A, B, C, *, D=None, starts=None, initial_state=None, return_state: bool = False,
                chunk: int = 64, segment_chunks: int = 32):
    """See `loom.kernels.ssd.ssd`; dt is already discretised (reference.discretize).
    x: (B, T, H, P); dt: (B, T, H); A: (H,); B, C: (B, T, G, N); D: (H,) or None;
    starts: (B, T) bool or None; initial_state: (B, H, P, N) or None.
    Returns y (B, T, H, P) in x's dtype and the final state (B, H, P, N) (fp32, fp64 for
    fp64 inputs) or None."""
    Bt, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf, dtf = x.to(cd), dt.to(cd)
    v = xf * dtf[..., None]                          # (B, T, H, P)
    g = dtf * A.to(cd)                               # (B, T, H) log decay
    Bm, Cm = B.to(cd), C.to(cd)
    if starts is None:
        starts = torch.zeros(Bt, T, dtype=torch.bool, device=x.device)
    S = (x.new_zeros(Bt, H, P, N, dtype=cd) if initial_state is None else initial_state.to(cd))
    S = S.view(Bt, G, H // G, P, N)
    span = chunk * segment_chunks
    outs = []
    # split, not slicing in the loop: each slice's backward would build a full-size gradient
    for parts in zip(*(t.split(span, dim=1) for t in (v, g, Bm, Cm, starts))):
        y, S = _segment(*parts, S, chunk)
        outs.append(y)
    y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    if D is not None:
        y = y + D.to(cd)[:, None] * xf
    return y.to(x.dtype), (S.reshape(Bt, H, P, N) if return_state else None)
