"""RAT's attention over chunk states through FlexAttention (the CUDA path of step 3 in chunked.py).

Legend: B batch, H heads, T queries, J compact chunk states, K head dim.

chunked.ChunkStateAttention computes, per query t,
    o_t = softmax([q_t . kc_j for lo_t <= j < hi_t ; q_t . kd_t]) @ [vc_j ; vd_t]
i.e. attention over a contiguous range of chunk-final states merged exactly (through the
log-sum-exp) with the query's own running state. Here the running states are appended as T
extra keys after the J chunk states and the mask lets query t see column J + t only:

    visible(t, c) = (c < J and lo_t <= c < hi_t)  or  c == J + t

so FlexAttention's online softmax performs the LSE merge inside the kernel, and its BlockMask
skips every tile outside the chunk-state band and the diagonal of the running states. Queries
arrive already scaled (scale 1 here). The block mask is cached per (lo, hi) layout.
"""
from __future__ import annotations

import torch

from loom.kernels.attention.flex import cached_block_mask, create_block_mask, flex_attend


def chunk_state_attention_flex(q, kd, vd, kc, vc, lo, hi, block: int = 0, *, need_lse: bool = True):
    """Same contract as chunked.ChunkStateAttention.apply: q, kd, vd (B, H, T, K); kc, vc
    (B, H, J, K); lo, hi (B, T) int64. Returns o (B, H, T, K) and lse (B, H, T) (None when
    need_lse is False). `block` (the PyTorch form's query block) is unused."""
    B, H, T, K = q.shape
    J = kc.shape[2]

    def build():
        def mask_mod(b, h, qi, ki):
            j, qc = ki - T, qi.clamp(max=T - 1)  # lookups clamped: the kernel also visits padded indices
            return (ki == qi) | ((j >= lo[b, qc]) & (j < hi[b, qc]))

        return create_block_mask(mask_mod, B, 1, T, T + J, q.device)

    bm = cached_block_mask(("rat", B, T, J), (lo, hi), build)
    keys, values = torch.cat([kd, kc], dim=2), torch.cat([vd, vc], dim=2)  # (B, H, T + J, K)
    out = flex_attend(q, keys, values, bm, 1.0, need_lse)
    if need_lse:
        o, lse = out
        return o, lse.detach()
    return out, None
