"""Lightning linear attention through fla-core's chunked Triton kernel (the CUDA path; `gpu` extra).

Legend: B batch, T tokens, H heads, K key dim, V value dim, N documents (varlen sequences).

Our operator (linear/reference.py)

    S_t = lambda_h S_{t-1} (1 - reset_t) + k_t^T v_t,    o_t = scale * q_t S_t,    lambda_h = exp(-decay_h)

is fla's simple_gla with a constant per-head log-decay g_gamma = -decay (fla: S_t = exp(g) S_{t-1}
+ k_t^T v_t, o_t = scale q_t S_t). The mapping:
    decay            -> g_gamma = -decay, (H,)
    reset (B, T)     -> varlen: the B rows are flattened to one row of B * T tokens, cut at every row
                        start and every reset (cu_seqlens, (N + 1,) int32 offsets);
    initial_state    -> per sequence: the row's state for the first sequence of a row that does not
                        start with a reset, zeros for every other one; (N, H, K, V);
    final state      -> the state after the last sequence of each row; (B, H, K, V) fp32.
fla's kernels need a GPU driver even under TRITON_INTERPRET=1 (its autotuner), so this path is
tested only on CUDA (tests/kernels/test_linear_fla.py).
"""
from __future__ import annotations

import torch


def linear_attention_fla(q, k, v, decay, *, reset=None, initial_state=None, return_state=False, scale=1.0):
    """Same arguments and results as loom.kernels.linear.linear_attention (no `block`: fla picks it)."""
    from fla.ops.simple_gla import chunk_simple_gla

    B, T, H, K = q.shape
    V = v.shape[3]
    starts = torch.zeros(B, T, dtype=torch.bool, device=q.device)
    starts[:, 0] = True
    if reset is not None:
        starts |= reset
    flat_starts = torch.nonzero(starts.flatten())[:, 0]                       # (N,) token offsets
    cu = torch.cat([flat_starts, flat_starts.new_tensor([B * T])]).to(torch.int32)
    N = flat_starts.shape[0]
    row = flat_starts // T                                                    # (N,) row of each sequence
    h0 = None
    if initial_state is not None:
        carries = flat_starts % T == 0                                          # the row's first sequence...
        if reset is not None:
            carries = carries & ~reset.flatten()[flat_starts]                   # ...unless it starts a document
        h0 = torch.where(carries[:, None, None, None], initial_state.float()[row],
                         torch.zeros(N, H, K, V, device=q.device))            # (N, H, K, V)
    g_gamma = -decay.float().to(q.device)
    flat = lambda x: x.reshape(1, B * T, H, x.shape[-1])  # noqa: E731
    o, final = chunk_simple_gla(flat(q), flat(k), flat(v), g_gamma=g_gamma, scale=scale, initial_state=h0,
                                output_final_state=return_state, cu_seqlens=cu)
    o = o.reshape(B, T, H, V)
    if not return_state:
        return o, None
    last = torch.searchsorted(flat_starts, torch.arange(1, B + 1, device=q.device) * T) - 1  # (B,) last sequence of row
    return o, final[last].float()
