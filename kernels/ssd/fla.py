"""SSD through fla-core's chunk_simple_gla (the CUDA path; the `gpu` extra).

Legend: B batch, T tokens, H heads, P head dim, G groups, N state size, S sequences (varlen).

SSD with a scalar decay per head is fla's simple GLA with a per-token log decay
(fla: S_t = exp(g_t) S_{t-1} + k_t^T v_t, o_t = scale q_t S_t, S_t of shape (K, V)):
    q = C, k = B (each group's (N,) vector repeated for its H / G heads), K = N
    v = dt x, V = P;   g = dt A, (B, T, H);   scale = 1;   D x is added here
    state: fla's (K, V) = (N, P) is the transpose of ours (P, N)
    doc_starts (B, T) -> varlen: the B rows flattened to one row of B T tokens, cut at
        every row start and every document start (cu_seqlens, (S + 1,) int32 offsets);
        initial_state (B, H, P, N) goes to the first sequence of a row that does not
        start a document, zeros to every other one; the final state is that of each
        row's last sequence.
    cu_seqlens given: passed through, with per-sequence initial/final states (S, H, P, N).
fla's kernels need a GPU driver even under TRITON_INTERPRET=1 (its autotuner), so this
path is tested only on CUDA (tests/kernels/test_ssd_fla.py).
"""
from __future__ import annotations

import torch

__all__ = ["ssd_fla"]


def ssd_fla(x, dt, A, B, C, *, D=None, doc_starts=None, cu_seqlens=None, initial_state=None,
            return_state: bool = False):
    """Same arguments and results as kernels/ssd/chunked.ssd_chunked (dt discretised), plus
    cu_seqlens (S + 1,) for a (1, T) varlen batch, whose states are per sequence."""
    from fla.ops.simple_gla import chunk_simple_gla

    Bt, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    q = C.repeat_interleave(H // G, dim=2)               # (B, T, H, N)
    k = B.repeat_interleave(H // G, dim=2)
    v = x * dt[..., None].to(x.dtype)                    # (B, T, H, P)
    g = (dt.float() * A.float())                         # (B, T, H)
    h0 = None if initial_state is None else initial_state.float().transpose(-1, -2).contiguous()  # (., H, N, P)
    if cu_seqlens is None:
        starts = torch.zeros(Bt, T, dtype=torch.bool, device=x.device)
        starts[:, 0] = True
        if doc_starts is not None:
            starts |= doc_starts
        first = torch.nonzero(starts.flatten())[:, 0]                            # (S,) token offsets
        cu = torch.cat([first, first.new_tensor([Bt * T])]).to(torch.int32)
        if h0 is not None:
            carries = first % T == 0                                              # a row's first sequence...
            if doc_starts is not None:
                carries = carries & ~doc_starts.flatten()[first]                  # ...unless it starts a document
            h0 = torch.where(carries[:, None, None, None], h0[first // T],
                             torch.zeros(first.shape[0], H, N, P, device=x.device))  # (S, H, N, P)
    else:
        cu = cu_seqlens.to(torch.int32)
    flat = lambda t: t.reshape(1, Bt * T, H, t.shape[-1])  # noqa: E731
    y, final = chunk_simple_gla(flat(q).contiguous(), flat(k).contiguous(), flat(v), g=g.reshape(1, Bt * T, H),
                                scale=1.0, initial_state=h0, output_final_state=return_state, cu_seqlens=cu)
    y = y.reshape(Bt, T, H, P)
    if D is not None:
        y = y + D.to(y.dtype)[:, None] * x
    if not return_state:
        return y, None
    if cu_seqlens is None:
        last = torch.searchsorted(first, torch.arange(1, Bt + 1, device=x.device) * T) - 1  # (B,) last sequence
        final = final[last]
    return y, final.float().transpose(-1, -2)            # (., H, P, N)
