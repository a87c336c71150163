"""The SSD chunk algorithm (Mamba-2, section 6): the CPU path.

Legend: B batch, T tokens, H heads = G groups x R heads per group, P head dim,
N state size, M chunks, Q chunk length, t, j offsets inside a chunk.
Inside, a group's state is kept as (N, R P): its R heads' (P, N) states transposed, side by side.

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


# exp(x) below which a decay factor is set to exactly 0: e^-60 ~ 1e-26 in fp32 (its smallest normal
# number is ~1e-38), e^-600 in fp64. Mamba-2's decays reach exp(-100s) within a chunk; left to
# underflow gradually they become subnormal numbers, on which CPU arithmetic (the matmuls they
# enter) runs tens of times slower. Terms that small do not change any result at its precision.
CUTOFF = {torch.float32: -60.0, torch.float64: -600.0}


def _decay(x: torch.Tensor, cut: float) -> torch.Tensor:
    """exp(x) for x <= 0, exactly 0 where x < cut (or masked to -inf)."""
    return torch.where(x > cut, x, -torch.inf).exp()


def _scan(U: torch.Tensor, a: torch.Tensor, S: torch.Tensor):
    """U: (B, G, M, N, R, P) chunk contributions; a: (B, G, M, 1, R, 1) chunk transitions;
    S: (B, G, N, R, P). Returns the states before each chunk (B, G, M, N, R, P) and after the last."""
    before = []
    # unbind, not U[:, :, m]: indexing in a loop makes autograd build one full-size gradient per step
    for U_m, a_m in zip(U.unbind(2), a.unbind(2)):
        before.append(S)
        S = a_m * S + U_m
    return torch.stack(before, dim=2), S


def _segment(v, g, Bm, Cm, starts, S, Q: int):
    """One stretch of whole chunks. v: (B, T, H, P); g: (B, T, H); Bm, Cm: (B, T, G, N);
    starts: (B, T) bool; S: (B, G, N, R, P). Returns y (B, T, H, P) and the state after it.

    The R heads of a group are merged into one matmul dimension (R P) wherever they share
    B or C, so every big product is a plain batched matmul over (B, G, M) with no operand
    broadcast over heads (several times faster on CPU than broadcasting B and C)."""
    Bt, T, H, P = v.shape
    G, N = Bm.shape[2], Bm.shape[3]
    R = H // G
    M = -(-T // Q)
    pad = M * Q - T
    v6 = F.pad(v, (0, 0, 0, 0, 0, pad)).view(Bt, M, Q, G, R, P).permute(0, 3, 1, 2, 4, 5)  # (B, G, M, Q, R, P)
    L = F.pad(g, (0, 0, 0, pad)).view(Bt, M, Q, G, R).permute(0, 3, 4, 1, 2).cumsum(-1)  # (B, G, R, M, Q)
    Bc, Cc = (F.pad(t, (0, 0, 0, 0, 0, pad)).view(Bt, M, Q, G, N).transpose(1, 3).transpose(2, 3)
              for t in (Bm, Cm))                                                        # (B, G, M, Q, N)
    seg = F.pad(starts, (0, pad)).view(Bt, 1, 1, M, Q).long().cumsum(-1)             # document index in the chunk
    L_last = L[..., -1:]
    heads_last = lambda f: f.permute(0, 1, 3, 4, 2)[..., None]  # (B, G, R, M, Q) -> (B, G, M, Q, R, 1)  # noqa: E731

    i = torch.arange(Q, device=v.device)
    visible = (i[:, None] >= i[None, :]) & (seg[..., :, None] == seg[..., None, :])  # (B, 1, 1, M, Q, Q)
    cut = CUTOFF[v.dtype]
    W = _decay(torch.where(visible, L[..., :, None] - L[..., None, :], -torch.inf), cut)  # (B, G, R, M, Q, Q)
    scores = torch.matmul(Cc, Bc.transpose(-1, -2))[:, :, None] * W                  # (B, G, R, M, Q, Q)
    y = torch.matmul(scores, v6.permute(0, 1, 4, 2, 3, 5)).permute(0, 1, 3, 4, 2, 5)  # (B, G, M, Q, R, P)

    k_fac = _decay(L_last - L, cut) * (seg == seg[..., -1:])   # (B, G, R, M, Q): padding shares the last segment
    vk = (v6 * heads_last(k_fac)).reshape(Bt, G, M, Q, R * P)
    U = torch.matmul(Bc.transpose(-1, -2), vk).view(Bt, G, M, N, R, P)               # (B, G, M, N, R, P)
    a = _decay(L_last[..., 0], cut) * (seg[..., -1] == 0)                               # (B, G, R, M)
    before, S = _scan(U, a.permute(0, 1, 3, 2)[:, :, :, None, :, None], S)
    read = torch.matmul(Cc, before.view(Bt, G, M, N, R * P)).view(Bt, G, M, Q, R, P)
    q_fac = _decay(L, cut) * (seg == 0)                                                 # (B, G, R, M, Q)
    y = y + read * heads_last(q_fac)
    y = y.permute(0, 2, 3, 1, 4, 5).reshape(Bt, M * Q, H, P)[:, :T]                  # (B, T, H, P)
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
    R = H // G
    S = (x.new_zeros(Bt, H, P, N, dtype=cd) if initial_state is None else initial_state.to(cd))
    S = S.view(Bt, G, R, P, N).permute(0, 1, 4, 2, 3)  # (B, G, N, R, P): the heads of a group side by side
    span = chunk * segment_chunks
    outs = []
    # split, not slicing in the loop: each slice's backward would build a full-size gradient
    for parts in zip(*(t.split(span, dim=1) for t in (v, g, Bm, Cm, starts))):
        y, S = _segment(*parts, S, chunk)
        outs.append(y)
    y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    if D is not None:
        y = y + D.to(cd)[:, None] * xf
    return y.to(x.dtype), (S.permute(0, 1, 3, 4, 2).reshape(Bt, H, P, N) if return_state else None)
