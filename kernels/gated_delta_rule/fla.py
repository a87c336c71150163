"""Gated delta rule through fla-core's chunked Triton kernels (the CUDA path; `gpu` extra).

Legend: B batch, T tokens, HK q/k heads, HV value heads, K key dim, V value dim, N sequences.

fla's `chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state,
cu_seqlens, use_qk_l2norm_in_kernel)` computes exactly our recurrence (reference.py: the same
key-major (K, V) state, a_t = exp(g_t), l2norm eps 1e-6, then q * scale). The mapping:
    q, k             -> expanded to the HV value heads first (repeat_interleave, as transformers
                        does), so any fla version computes the grouped case exactly;
    seq_ids (B, T)   -> varlen: the B rows are flattened to one row of B * T tokens, cut at every
                        row start and every change of id (cu_seqlens, (N + 1,) int32 offsets);
    initial_state    -> per sequence: the row's state for each row's first sequence, zeros for
                        the documents that start inside a row; (N, HV, K, V) fp32;
    final state      -> the state after each row's last sequence; (B, HV, K, V) fp32;
    cu_seqlens       -> passed through (B = 1), initial and final states per sequence (N, ...).
fla's kernels need a GPU driver even under TRITON_INTERPRET=1 (its autotuner), so this path is
tested only on CUDA (tests/kernels/test_gated_delta_rule_fla.py).
"""
from __future__ import annotations

import torch

from loom.kernels.gated_delta_rule.reference import expand_heads


def gated_delta_rule_fla(q, k, v, g, beta, *, scale: float, initial_state=None, seq_ids=None, cu_seqlens=None,
                         use_qk_l2norm: bool = False, return_state: bool = False):
    """Same arguments and results as loom.kernels.gated_delta_rule.gated_delta_rule (CUDA tensors)."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    B, T, HV, V = v.shape
    K = k.shape[3]
    q, k = expand_heads(q, HV), expand_heads(k, HV)
    h0 = None if initial_state is None else initial_state.float().contiguous()  # cp passes an expanded [0, I]
    last = None
    if cu_seqlens is None:
        starts = torch.zeros(B, T, dtype=torch.bool, device=v.device)
        starts[:, 0] = True
        if seq_ids is not None:
            starts[:, 1:] |= seq_ids[:, 1:] != seq_ids[:, :-1]
        flat_starts = torch.nonzero(starts.flatten())[:, 0]  # (N,) token offsets
        cu_seqlens = torch.cat([flat_starts, flat_starts.new_tensor([B * T])]).to(torch.int32)
        if h0 is not None:
            row_first = flat_starts % T == 0  # (N,) the sequence a row opens with
            h0 = torch.where(row_first[:, None, None, None], h0[flat_starts // T],
                             h0.new_zeros(flat_starts.shape[0], HV, K, V))
        last = torch.searchsorted(flat_starts, torch.arange(1, B + 1, device=v.device) * T) - 1  # (B,)
        q, k, v, g, beta = (x.reshape(1, B * T, *x.shape[2:]) for x in (q, k, v, g, beta))
    # dtypes as transformers passes them: g in fp32, beta in the activations' dtype
    o, final = chunk_gated_delta_rule(q, k, v, g.float(), beta.to(v.dtype), scale=scale, initial_state=h0,
                                      output_final_state=return_state, cu_seqlens=cu_seqlens,
                                      use_qk_l2norm_in_kernel=use_qk_l2norm)
    o = o.reshape(B, T, HV, V)
    if not return_state:
        return o, None
    return o, (final if last is None else final[last]).float()
