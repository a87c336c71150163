"""S2-Attention, the specification: the dense boolean mask of the pattern and a
masked SDPA over it. O(T * S) memory; for tests only (blocksparse.py is the
path that runs).

Legend: B batch, T queries, S keys (S >= T; queries are the last T), H query
heads, G key/value heads, P pattern heads (G or H: see `head_offsets`), K head
dim, b the sparse block size, L local_blocks, V vert_stride.

Blocks live on document-relative positions: a token at position p (restarting
at 0 at each document start) is in block p // b of its document. For pattern
head h with offset o_h, key j is visible to query i when

    j <= S - T + i  and  seq_ids[j] == seq_ids[S - T + i]    causal, same document
    and ( m - n < L  or  (n + o_h) % V == 0 )                local window or vertical stride

with m = pos[S - T + i] // b and n = pos[j] // b. Inside the query's own block
the causal condition acts token by token; every other visible block is seen in
full. Off-diagonal vertical blocks are "absolute" (dkernel's causal mode): a
block used by one query is used by every later query of the document, so a
head's KV cache only ever needs its local window and its own residue class.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def doc_positions(seq_ids: torch.Tensor | None, B: int, S: int, device) -> torch.Tensor:
    """(B, S) position of each token inside its document: index minus the
    index of the document's first token in the row (arange when seq_ids is None)."""
    idx = torch.arange(S, device=device).expand(B, S)
    if seq_ids is None:
        return idx
    start = torch.ones(B, S, dtype=torch.bool, device=device)
    start[:, 1:] = seq_ids[:, 1:] != seq_ids[:, :-1]
    first = torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - first


def s2_mask(T: int, S: int, *, block: int, local_blocks: int, vert_stride: int, head_offsets: torch.Tensor,
            seq_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
            batch: int = 1, device=None) -> torch.Tensor:
    """(B, P, T, S) bool, True where key j is visible to query i for pattern head h.

    head_offsets: (P,) int64. position_ids: (B, S) document-relative positions
    of the keys (queries use the last T); default from seq_ids (or arange).
    """
    B = seq_ids.shape[0] if seq_ids is not None else (position_ids.shape[0] if position_ids is not None else batch)
    if position_ids is None:
        position_ids = doc_positions(seq_ids, B, S, device)
    kblk = torch.div(position_ids, block, rounding_mode="floor")  # (B, S)
    qblk = kblk[:, S - T:]  # (B, T)
    i = torch.arange(S - T, S, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    mask = (j <= i)[None]  # (1, T, S)
    if seq_ids is not None:
        mask = mask & (seq_ids[:, S - T:, None] == seq_ids[:, None, :])
    local = (qblk[:, :, None] - kblk[:, None, :]) < local_blocks  # (B, T, S)
    vertical = (kblk[:, None, :] + head_offsets.to(device)[None, :, None]) % vert_stride == 0  # (B, P, S)
    return mask[:, None] & (local[:, None] | vertical[:, :, None, :])


def s2_attention_reference(q, k, v, *, block: int, local_blocks: int, vert_stride: int,
                           head_offsets: torch.Tensor, seq_ids=None, position_ids=None, scale=None,
                           return_lse: bool = False):
    """q (B, T, H, K); k, v (B, S, G, K); head_offsets (G,) or (H,).
    Returns o (B, T, H, K) [, lse (B, T, H) in fp32, fp64 for fp64 inputs]."""
    B, T, H, K = q.shape
    S, G = k.shape[1], k.shape[2]
    scale = scale if scale is not None else 1.0 / math.sqrt(K)
    mask = s2_mask(T, S, block=block, local_blocks=local_blocks, vert_stride=vert_stride,
                   head_offsets=head_offsets, seq_ids=seq_ids, position_ids=position_ids, batch=B,
                   device=q.device)
    mask = mask.repeat_interleave(H // mask.shape[1], dim=1)  # (B, H, T, S)
    cd = torch.promote_types(q.dtype, torch.float32)
    qh = q.transpose(1, 2).to(cd)
    kh = k.transpose(1, 2).to(cd).repeat_interleave(H // G, dim=1)
    vh = v.transpose(1, 2).to(cd).repeat_interleave(H // G, dim=1)
    if not return_lse:
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
        return o.transpose(1, 2).to(q.dtype)
    s = (qh @ kh.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    o = torch.exp(s - lse[..., None]) @ vh
    return o.transpose(1, 2).to(q.dtype), lse.transpose(1, 2)
