"""SSD over a sequence sharded across cp ranks: each piece's end state is affine in
its start state, so ranks exchange one (transition, offset) pair per piece.

Legend: B batch, T full length, H heads, P head dim, G groups, N state size,
Lp tokens of one piece (T / (2 cp) zigzag, T / cp contiguous), n = T / Lp pieces
in position order.

Inside a piece the recurrence h_t = exp(g_t) h_{t-1} + v_t B_t^T (g = dt A) gives

    h_end = transition * h_start + offset,   transition = exp(sum_t g_t) per (row, head),
                                             or 0 if a document starts in the piece;
    y_t   = y_t|h_start=0 + exp(g_0 + ... + g_t) [no document start in 0..t] * h_start C_t

with offset the piece's end state from a zero start. So each rank
  1. runs the single-device op on each of its pieces from zero (y, offset);
  2. all-gathers every piece's (offset, transition): B (H P N + H) numbers per piece,
     whatever the length;
  3. composes them in GLOBAL piece order 0..n-1 (zigzag: rank r holds pieces r and
     2 cp - 1 - r): h_in(0) = 0, h_in(c + 1) = transition_c h_in(c) + offset_c;
  4. adds each of its pieces' read of h_in.
The all-gather is differentiable (context_parallel/gather.py: its backward
reduce-scatters), so dx, dt, A, B and C of earlier ranks receive their gradients.
Bytes one rank sends per layer: forward (cp - 1) n_local B (H P N + H) a, backward the
same (a = 4, or 8 for fp64 inputs; n_local = 2 zigzag, 1 contiguous).
"""
from __future__ import annotations

from typing import Callable

import torch

from loom.kernels.context_parallel.gather import all_gather, depend_on
from loom.kernels.context_parallel.layout import CPContext, check_seq_len, chunk_ranges

__all__ = ["cp_ssd"]


def cp_ssd(run: Callable, x, dt, A, B, C, cp: CPContext, *, D=None, doc_starts=None):
    """`loom.kernels.ssd.ssd` over this rank's shard (either layout), dt discretised.

    run(x, dt, B, C, doc_starts) -> (y, final state): the single-device op on one piece
        from a zero state (D and A bound).
    x: (B, L, H, P); dt: (B, L, H); A: (H,); B, C: (B, L, G, N); doc_starts: (B, L) bool.
    Returns y (B, L, H, P), the shard of the single-process output, and the state after
    the whole sequence (B, H, P, N), the same on every rank. Collective."""
    Bt, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    T = L * cp.world_size
    check_seq_len(T, cp)
    if doc_starts is None:
        doc_starts = torch.zeros(Bt, L, dtype=torch.bool, device=x.device)
    Lp = T // cp.n_chunks
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    g = dt.to(cd) * A.to(cd)                                                    # (B, L, H)

    pieces = list(zip(*(t.split(Lp, dim=1) for t in (x, dt, B, C, doc_starts, g))))
    outs, pairs = [], []
    for x_i, dt_i, B_i, C_i, s_i, g_i in pieces:                              # 1. from a zero state
        y, offset = run(x_i, dt_i, B_i, C_i, s_i)
        transition = g_i.sum(1).exp() * ~s_i.any(1, keepdim=True)             # (B, H)
        outs.append(y)
        pairs.append(torch.cat([offset.to(cd).reshape(Bt, -1), transition], dim=1))  # (B, H P N + H)
    gathered = all_gather(torch.stack(pairs), cp)                               # 2. (cp, n_local, B, H P N + H)
    by_piece = {}
    for r in range(cp.world_size):
        for i, (a, _) in enumerate(chunk_ranges(T, cp.world_size, r, cp.layout)):
            by_piece[a // Lp] = gathered[r, i]
    h = torch.zeros(Bt, H, P, N, dtype=cd, device=x.device)                   # 3. compose in position order
    incoming = []
    for c in range(cp.n_chunks):
        incoming.append(h)
        offset, transition = by_piece[c].split([H * P * N, H], dim=1)
        h = transition[..., None, None] * h + offset.view(Bt, H, P, N)
    fixed = []
    for (a, _), y, (_, _, _, C_i, s_i, g_i) in zip(chunk_ranges(T, cp.world_size, cp.rank, cp.layout), outs, pieces):
        fac = g_i.cumsum(1).exp() * (s_i.cumsum(1) == 0)[..., None]          # 4. (B, Lp, H)
        C_h = C_i.to(cd).repeat_interleave(H // G, dim=2)                      # (B, Lp, H, N)
        read = torch.einsum("bthn,bhpn->bthp", C_h * fac[..., None], incoming[a // Lp])
        fixed.append((y.to(cd) + read).to(x.dtype))
    return depend_on(torch.cat(fixed, dim=1), gathered), h  # the gather's backward runs on every rank
