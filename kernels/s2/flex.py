"""S2-Attention through FlexAttention: the per-head pattern as a mask_mod and a BlockMask, so that
the fused kernel visits only the tiles a head needs (the CUDA path).

Legend: B batch, T queries, S keys (queries are the last T), H query heads, G key/value heads,
P pattern heads (G or H), K head dim; b sparse block size, L local_blocks, V vert_stride.

The mask is reference.py's, word for word: for query head h with pattern p = h // (H / P),
key j is visible to query i (at key position S - T + i) when

    j <= S - T + i,  seq_ids[j] == seq_ids[S - T + i],
    and ( m - n < L  or  (n + o_p) % V == 0 ),    m = pos[S - T + i] // b,  n = pos[j] // b

FlexAttention's BlockMask marks the 128 x 128 tiles with any visible pair (per batch row and
head); the kernel skips every other tile and applies mask_mod inside partial ones. Local blocks
and each head's own strided columns are exactly the tiles that stay, so the work per head is
the local band plus T / V columns, as blocksparse.py. The mask is built once per batch layout
(positions, documents, offsets) and cached (kernels/attention/flex.py).
"""
from __future__ import annotations

import math

import torch

from loom.kernels.attention.flex import cached_block_mask, create_block_mask, flex_attend
from loom.kernels.s2.reference import doc_positions


def s2_block_mask(B: int, H: int, T: int, S: int, *, block: int, local_blocks: int, vert_stride: int,
                  head_offsets: torch.Tensor, seq_ids: torch.Tensor | None, position_ids: torch.Tensor,
                  device):
    """The (B, H) BlockMask of the pattern over T queries and S keys (cached per layout)."""
    P = head_offsets.shape[0]
    group = H // P
    off = S - T

    def build():
        def mask_mod(b, h, qi, ki):
            qp = qi + off
            qc, kc = qp.clamp(max=S - 1), ki.clamp(max=S - 1)  # lookups clamped: padded indices are visited
            m = position_ids[b, qc] // block
            n = position_ids[b, kc] // block
            keep = (ki <= qp) & (((m - n) < local_blocks) | ((n + head_offsets[h // group]) % vert_stride == 0))
            if seq_ids is not None:
                keep = keep & (seq_ids[b, qc] == seq_ids[b, kc])
            return keep

        return create_block_mask(mask_mod, B, H, T, S, device)

    layout = (position_ids, head_offsets) + (() if seq_ids is None else (seq_ids,))
    kind = ("s2", B, H, T, S, block, local_blocks, vert_stride, seq_ids is None)
    return cached_block_mask(kind, layout, build)


def s2_flex(q, k, v, *, block: int, local_blocks: int, vert_stride: int, head_offsets: torch.Tensor,
            seq_ids=None, position_ids=None, scale=None, return_lse: bool = False):
    """q (B, T, H, K); k, v (B, S, G, K); head_offsets (P,) with P in {G, H}.
    Returns o (B, T, H, K) [, lse (B, T, H) fp32]."""
    B, T, H, K = q.shape
    S = k.shape[1]
    scale = scale if scale is not None else 1.0 / math.sqrt(K)
    pos = position_ids.to(torch.long) if position_ids is not None else doc_positions(seq_ids, B, S, q.device)
    bm = s2_block_mask(B, H, T, S, block=block, local_blocks=local_blocks, vert_stride=vert_stride,
                       head_offsets=head_offsets.to(q.device), seq_ids=seq_ids, position_ids=pos, device=q.device)
    out = flex_attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), bm, scale, return_lse)
    if return_lse:
        o, lse = out
        return o.transpose(1, 2), lse.transpose(1, 2)
    return out.transpose(1, 2)
