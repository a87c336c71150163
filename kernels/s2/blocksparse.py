"""S2-Attention, block-sparse: computes only the blocks each head needs.

Legend: B batch, T queries, S keys (queries are the last T), H query heads, G
key/value heads, P pattern heads (G or H), K head dim; b sparse block size, L
local_blocks, V vert_stride; A = V * b; Q engine query-block length.

Pattern and document semantics: see reference.py.

Layout. Blocks are document-relative, so a packed row is first re-laid on
padded coordinates where every document starts at a multiple of A (plus the
in-block offset of its first position, for a document that began before this
row): a token at document-relative position p of document d goes to

    c = base_d + p - (p0_d - p0_d % A)          (p0_d: first position of d here)

Then b-block c // b of the layout is the document's block p // b, and block
indices agree with the document's modulo V. Padding costs < A tokens per
document. On this layout, for pattern head h with residue r_h = -o_h mod V:

    local part     each query block of Q coordinates reads a band of
                   W = 1 + ceil((L*b - 1) / Q) key blocks, masked to the same
                   document, causal, and block distance < L
                   (loom.kernels.swa.banded: matmuls, linear in T);
    vertical part  the b-blocks r_h, r_h + V, r_h + 2V, ... of the layout form
                   one strided key list per head (S / V keys); a query sees the
                   ones of its own document at block distance >= L.

Cost per head: O(T * (L*b + Q) * K) for the local part and O(T * T/(2V) * K) for
the vertical part: the vertical stride keeps the pattern quadratic, V times
cheaper than dense attention. Memory O(T) (chunked, scores recomputed in
backward). Both parts share one softmax (a joint log-sum-exp).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from loom.kernels.s2.reference import doc_positions
from loom.kernels.swa.banded import Band, banded_attention


def engine_block(block: int) -> int:
    """Q: a multiple of the sparse block near 64 coordinates (efficient matmuls)."""
    return block * max(1, 64 // block)


def padded_layout(pos: Tensor, doc: Tensor, align: int) -> tuple[Tensor, Tensor, int]:
    """(B, S) positions and documents -> (B, S) padded coordinates, (B, S)
    coordinate of the first token of each token's document, and the padded
    row length (a multiple of `align`, the max over rows)."""
    B, S = pos.shape
    start = torch.ones(B, S, dtype=torch.bool, device=pos.device)
    start[:, 1:] = doc[:, 1:] != doc[:, :-1]
    if bool(((pos[:, 1:] != pos[:, :-1] + 1) & ~start[:, 1:]).any()):
        raise ValueError("position_ids must increase by 1 inside each document (seq_ids)")
    didx = start.long().cumsum(1) - 1  # (B, S) document index inside the row
    big = torch.iinfo(torch.long).max
    p0 = torch.full((B, S), big, dtype=torch.long, device=pos.device).scatter_reduce(1, didx, pos, "amin")
    p1 = torch.full((B, S), -1, dtype=torch.long, device=pos.device).scatter_reduce(1, didx, pos, "amax")
    used = p1 >= 0
    shift = torch.where(used, p0 - p0 % align, 0)
    extent = torch.where(used, p1 - shift + 1, 0)
    padded = (extent + align - 1) // align * align  # (B, S) per document slot
    base = padded.cumsum(1) - padded
    coord = torch.gather(base - shift, 1, didx) + pos
    first = torch.gather(base - shift + torch.where(used, p0, 0), 1, didx)
    return coord, first, int(padded.sum(1).max())


def s2_blocksparse(q: Tensor, k: Tensor, v: Tensor, *, block: int, local_blocks: int, vert_stride: int,
                   head_offsets: Tensor, seq_ids: Tensor | None = None, position_ids: Tensor | None = None,
                   scale: float | None = None, chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """q (B, T, H, K); k, v (B, S, G, K); head_offsets (P,) with P in {G, H}.
    Returns o (B, T, H, K) and lse (B, T, H) (fp32, fp64 for fp64 inputs)."""
    B, T, H, K = q.shape
    S, G = k.shape[1], k.shape[2]
    P = head_offsets.shape[0]
    sb, lb, V = block, local_blocks, vert_stride
    scale = scale if scale is not None else 1.0 / math.sqrt(K)
    dev = q.device
    pos = position_ids.to(torch.long) if position_ids is not None else doc_positions(seq_ids, B, S, dev)
    doc = seq_ids.to(torch.long) if seq_ids is not None else torch.zeros(B, S, dtype=torch.long, device=dev)
    A = V * sb
    coord, first, Lp = padded_layout(pos, doc, A)
    bidx = torch.arange(B, device=dev)[:, None]

    # Query blocks cover the coordinates from the first query to the end.
    Q = engine_block(sb)
    W = 1 + math.ceil((lb * sb - 1) / Q)
    q_coord = coord[:, S - T:]  # (B, T)
    c0 = int(q_coord[:, 0].min()) // Q * Q
    N = math.ceil((Lp - c0) / Q)
    end = c0 + N * Q
    k0 = c0 - (W - 1) * Q  # first coordinate of the key band (may be < 0)

    full_k = k.new_zeros(B, end, G, K).index_put((bidx, coord), k)
    full_v = v.new_zeros(B, end, G, K).index_put((bidx, coord), v)
    full_doc = torch.full((B, end), -2, dtype=torch.long, device=dev).index_put((bidx, coord), doc)

    q_doc = torch.full((B, N * Q), -1, dtype=torch.long, device=dev).index_put((bidx, q_coord - c0), doc[:, S - T:])
    q_pos = (c0 + torch.arange(N * Q, device=dev)).expand(B, -1)
    q_first = torch.full((B, N * Q), end, dtype=torch.long, device=dev).index_put((bidx, q_coord - c0),
                                                                                  first[:, S - T:])
    k_pos = (k0 + torch.arange((N + W - 1) * Q, device=dev)).expand(B, -1)
    lo = max(k0, 0)
    k_doc = F.pad(full_doc[:, lo:], (lo - k0, 0), value=-2)
    band_k = F.pad(full_k[:, lo:].transpose(1, 2), (0, 0, lo - k0, 0)).repeat_interleave(H // G, dim=1)
    band_v = F.pad(full_v[:, lo:].transpose(1, 2), (0, 0, lo - k0, 0)).repeat_interleave(H // G, dim=1)
    qb = q.new_zeros(B, N * Q, H, K).index_put((bidx, q_coord - c0), q).transpose(1, 2)

    # Vertical keys: per query head, the b-blocks of its residue class.
    rep = H // G
    head = torch.arange(H, device=dev)
    residue = (-head_offsets.to(dev)[head // (H // P)]) % V  # (H,)
    groups = Lp // A
    e_blk = torch.arange(groups, device=dev)[None, :, None] * V + residue[:, None, None]  # (H, groups, 1)
    e_pos = (e_blk * sb + torch.arange(sb, device=dev)).reshape(H, groups * sb)
    last = ((end - 1) // sb - lb + 1) * sb  # no query sees a vertical key at or past this coordinate
    e = int(torch.searchsorted(e_pos, torch.full((H, 1), last, device=dev)).max()) if groups else 0
    ke = ve = None
    if e > 0:
        g = head // rep
        ke = full_k[:, :Lp].view(B, groups, V, sb, G, K)[:, :, residue, :, g]  # (H, B, groups, b, K)
        ve = full_v[:, :Lp].view(B, groups, V, sb, G, K)[:, :, residue, :, g]
        ke = ke.permute(1, 0, 2, 3, 4).reshape(B, H, groups * sb, K)[:, :, :e]
        ve = ve.permute(1, 0, 2, 3, 4).reshape(B, H, groups * sb, K)[:, :, :e]
        e_pos = e_pos[:, :e].contiguous()

    band = Band(Q, W, q_doc, q_pos, k_doc, k_pos, span=(sb, lb), e_pos=e_pos if e > 0 else None,
                q_first=q_first, chunk=chunk)
    o, lse = banded_attention(qb, band_k, band_v, band, scale, ke, ve)  # (B, H, N*Q, K), (B, H, N*Q)
    o = o.transpose(1, 2)[bidx, q_coord - c0]  # (B, T, H, K)
    lse = lse.transpose(1, 2)[bidx, q_coord - c0]  # (B, T, H)
    return o, lse
