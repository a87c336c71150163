"""Banded block attention: the CPU path of sliding-window attention, and the
engine S2-Attention's block-sparse path reuses for its local window.

Legend: B batch, H heads, N query blocks, Q query-block length, W key blocks
read per query block, C query blocks per chunk, E extra keys, K head dim.

The caller lays the sequence out on integer *coordinates* (SWA: token index in
the row; S2: a padded, block-aligned layout). Queries come in N blocks of Q
consecutive coordinates; query block n reads the W key blocks n .. n+W-1 of a
key buffer that starts (W-1)*Q coordinates before the first query, so each
query sees the W*Q coordinates ending at its own block. A key in that window
is visible when

    q_doc == k_doc and k_pos <= q_pos                    always
    q_pos - k_pos <= window                              if window is set
    q_pos // sb - k_pos // sb < lb                       if span = (sb, lb) is set

Optionally every query also sees "extra" keys (S2's vertical blocks), one list
per head sorted by coordinate e_pos, visible when they lie in the query's
document and in a block strictly outside its local span (so nothing is counted
twice):  q_first <= e_pos  and  e_pos // sb <= q_pos // sb - lb,  with q_first
the coordinate of the first token of the query's document. The caller
guarantees that every coordinate between q_first and the query holds a real
token of that document (no padding inside a document), so the visible extra
keys of a query are one contiguous range of the list, found by binary search.

Slots that are not queries carry q_doc = -1 and see every key of their window
(so their softmax is finite; their outputs are dropped by the caller and get a
zero gradient). Key padding carries k_doc = -2 and is never visible.

Work is matmul-shaped and linear in T for the local part: scores are
(B, H, C, Q, W*Q) per chunk of C query blocks, never T x T. Extra keys are
visited in tiles of EXTRA_TILE with an online softmax (running max and sum), so
the scores in flight stay cache-sized however long the list is. The autograd
Function keeps only o and the log-sum-exp and recomputes the scores in
backward (FlashAttention's recipe), so memory is O(T) whatever T is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# Score elements in flight per chunk (local window plus one extra-key tile):
# about 4 MB in fp32, so a chunk's scores stay in cache.
CHUNK_ELEMENTS = 1 << 20
# Extra keys per tile of the online softmax.
EXTRA_TILE = 256


@dataclass
class Band:
    """Index data of one banded call (no gradients). Shapes in the module legend."""

    block: int  # Q
    n_win: int  # W
    q_doc: Tensor  # (B, N*Q) int64; -1: slot is not a query
    q_pos: Tensor  # (B, N*Q) int64 coordinates
    k_doc: Tensor  # (B, (N+W-1)*Q) int64; -2: padding
    k_pos: Tensor  # (B, (N+W-1)*Q) int64 coordinates
    window: int | None = None
    span: tuple[int, int] | None = None  # (sb, lb)
    e_pos: Tensor | None = None  # (H, E) int64 coordinates of the extra keys, ascending along E
    q_first: Tensor | None = None  # (B, N*Q) int64; first coordinate of the query's document
    chunk: int | None = None  # query blocks per chunk; None: from CHUNK_ELEMENTS

    @property
    def n_blocks(self) -> int:
        return self.q_doc.shape[1] // self.block


def _windows(x_blk: Tensor, n0: int, n1: int, w: int) -> Tensor:
    """(B, H, Nk, Q, K) key blocks -> (B, H, C, W*Q, K): the window of each query block."""
    return torch.cat([x_blk[:, :, n0 + t:n1 + t] for t in range(w)], dim=-2)


def _local_mask(band: Band, n0: int, n1: int) -> Tensor:
    """(B, 1, C, Q, W*Q) bool, True where the key is visible."""
    B, Q, W = band.q_doc.shape[0], band.block, band.n_win
    qd = band.q_doc[:, n0 * Q:n1 * Q].view(B, -1, Q, 1)
    qp = band.q_pos[:, n0 * Q:n1 * Q].view(B, -1, Q, 1)
    kd = _windows(band.k_doc.view(B, 1, -1, Q, 1), n0, n1, W).view(B, -1, 1, W * Q)
    kp = _windows(band.k_pos.view(B, 1, -1, Q, 1), n0, n1, W).view(B, -1, 1, W * Q)
    mask = (qd == kd) & (kp <= qp)
    if band.window is not None:
        mask &= qp - kp <= band.window
    if band.span is not None:
        sb, lb = band.span
        mask &= torch.div(qp, sb, rounding_mode="floor") - torch.div(kp, sb, rounding_mode="floor") < lb
    mask |= qd == -1
    return mask[:, None]


def _extra_range(band: Band, n0: int, n1: int):
    """Visible extra keys of the queries of blocks [n0, n1): per row the
    half-open index range [lo, hi) of the list as (B, H, C*Q, 1) tensors
    (empty for slots that are not queries), and over the chunk's queries the
    union [e0, e1) and the columns [a, z) every query sees (python ints).
    None when the chunk holds no query."""
    Q, (sb, lb) = band.block, band.span
    H = band.e_pos.shape[0]
    rows = slice(n0 * Q, n1 * Q)
    real = (band.q_doc[:, rows] != -1)[:, None, :, None]  # (B, 1, C*Q, 1)
    if not bool(real.any()):
        return None
    first = band.q_first[:, rows]  # (B, C*Q)
    limit = (torch.div(band.q_pos[:, rows], sb, rounding_mode="floor") - lb + 1) * sb
    B, M = first.shape
    lo = torch.searchsorted(band.e_pos, first.reshape(1, -1).expand(H, -1).contiguous())
    hi = torch.searchsorted(band.e_pos, limit.reshape(1, -1).expand(H, -1).contiguous())
    lo = lo.view(H, B, M).transpose(0, 1)[..., None]
    hi = torch.maximum(hi.view(H, B, M).transpose(0, 1)[..., None], lo)
    lo_r, hi_r = lo.masked_select(real), hi.masked_select(real)
    lo, hi = lo.masked_fill(~real, 0), hi.masked_fill(~real, 0)
    return lo, hi, int(lo_r.min()), int(hi_r.max()), int(lo_r.max()), int(hi_r.min())


def _local_scores(band: Band, q_c: Tensor, k_blk: Tensor, n0: int, n1: int) -> tuple[Tensor, Tensor]:
    """Masked local scores (B, H, C, Q, W*Q) of one chunk and its key windows (B, H, C, W*Q, K)."""
    kw = _windows(k_blk, n0, n1, band.n_win)
    return (q_c @ kw.transpose(-1, -2)).masked_fill_(~_local_mask(band, n0, n1), float("-inf")), kw


def _extra_tiles(band: Band, q_f: Tensor, ke: Tensor | None, n0: int, n1: int):
    """Yield (slice of the extra keys, masked scores (B, H, C*Q, tile)) over the
    extra keys the chunk's queries may see. Rows of slots that are not queries
    may see extra keys: their outputs are dropped and their gradient is zero."""
    rng = _extra_range(band, n0, n1) if ke is not None else None
    if rng is None:
        return
    lo, hi, e0, e1, a, z = rng
    if z <= a:  # columns every query sees: [a, z); the others need the mask
        a = z = e1
    for t0 in range(e0, e1, EXTRA_TILE):
        t1 = min(e1, t0 + EXTRA_TILE)
        se = q_f @ ke[:, :, t0:t1].transpose(-1, -2)  # (B, H, C*Q, t1 - t0)
        for c0, c1 in ((t0, min(t1, a)), (max(t0, z), t1)):
            if c1 > c0:
                idx = torch.arange(c0, c1, device=se.device)
                se[..., c0 - t0:c1 - t0].masked_fill_((idx < lo) | (idx >= hi), float("-inf"))
        yield slice(t0, t1), se


def _chunks(band: Band, H: int, extra: bool):
    B, Q = band.q_doc.shape[0], band.block
    n = band.chunk or max(1, CHUNK_ELEMENTS // (B * H * Q * (band.n_win * Q + EXTRA_TILE * extra)))
    for n0 in range(0, band.n_blocks, n):
        yield n0, min(band.n_blocks, n0 + n)


class BandedAttention(torch.autograd.Function):
    """(q, k, v, ke, ve, band, scale) -> (o, lse).

    q: (B, H, N*Q, K); k, v: (B, H, (N+W-1)*Q, K); ke, ve: (B, H, E, K) or None.
    o: (B, H, N*Q, K) in q's dtype; lse: (B, H, N*Q) fp32 (fp64 for fp64 inputs).
    Computation is in fp32 at least. Both outputs are differentiable.
    """

    @staticmethod
    def forward(ctx, q, k, v, ke, ve, band: Band, scale: float):
        cd = torch.promote_types(q.dtype, torch.float32)
        B, H, L, K = q.shape
        Q = band.block
        qs = (q.to(cd) * scale).contiguous()
        k_blk = k.to(cd).contiguous().view(B, H, -1, Q, K)
        v_blk = v.to(cd).contiguous().view(B, H, -1, Q, K)
        ke_c = ke.to(cd) if ke is not None else None
        ve_c = ve.to(cd) if ve is not None else None
        o = torch.empty(B, H, L, K, dtype=cd, device=q.device)
        lse = torch.empty(B, H, L, dtype=cd, device=q.device)
        for n0, n1 in _chunks(band, H, ke is not None):
            rows = slice(n0 * Q, n1 * Q)
            q_c = qs[:, :, rows].view(B, H, -1, Q, K)
            s, _ = _local_scores(band, q_c, k_blk, n0, n1)
            m = s.amax(-1, keepdim=True)  # finite: every row sees a local key
            p = s.sub_(m).exp_()  # unnormalised probabilities, in place
            m, tot = m.view(B, H, -1, 1), p.sum(-1).view(B, H, -1, 1)
            acc = (p @ _windows(v_blk, n0, n1, band.n_win)).view(B, H, -1, K)
            q_f = q_c.view(B, H, -1, K)
            for e, se in _extra_tiles(band, q_f, ke_c, n0, n1):  # online softmax over the tiles
                m_new = torch.maximum(m, se.amax(-1, keepdim=True))
                alpha = (m - m_new).exp_()
                pe = se.sub_(m_new).exp_()
                tot = tot * alpha + pe.sum(-1, keepdim=True)
                acc = acc * alpha + pe @ ve_c[:, :, e]
                m = m_new
            o[:, :, rows] = acc / tot  # normalise the (C*Q, K) output, not the scores
            lse[:, :, rows] = (m + tot.log()).squeeze(-1)
        ctx.save_for_backward(q, k, v, ke, ve, o, lse)
        ctx.band, ctx.scale = band, scale
        return o.to(q.dtype), lse.to(torch.promote_types(q.dtype, torch.float32))

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, ke, ve, o, lse = ctx.saved_tensors
        band, scale = ctx.band, ctx.scale
        cd = o.dtype
        B, H, L, K = q.shape
        Q, W = band.block, band.n_win
        qs = (q.to(cd) * scale).contiguous()
        k_blk = k.to(cd).contiguous().view(B, H, -1, Q, K)
        v_blk = v.to(cd).contiguous().view(B, H, -1, Q, K)
        ke_c = ke.to(cd) if ke is not None else None
        ve_c = ve.to(cd) if ve is not None else None
        do = torch.zeros_like(o) if do is None else do.to(cd).contiguous()
        delta = (do * o).sum(-1)  # (B, H, L)
        if dlse is not None:
            delta = delta - dlse.to(cd)
        dq = torch.empty_like(qs)
        dk_blk = torch.zeros_like(k_blk)
        dv_blk = torch.zeros_like(v_blk)
        dke = torch.zeros_like(ke_c) if ke is not None else None
        dve = torch.zeros_like(ve_c) if ke is not None else None
        for n0, n1 in _chunks(band, H, ke is not None):
            rows = slice(n0 * Q, n1 * Q)
            q_c = qs[:, :, rows].view(B, H, -1, Q, K)
            do_c = do[:, :, rows]  # (B, H, C*Q, K)
            dl_c = delta[:, :, rows, None]  # (B, H, C*Q, 1)
            lse_c = lse[:, :, rows, None]
            s, kw = _local_scores(band, q_c, k_blk, n0, n1)
            p = s.sub_(lse_c.view(*s.shape[:-1], 1)).exp_()  # (B, H, C, Q, W*Q)
            do_b = do_c.view(q_c.shape)
            dvw = p.transpose(-1, -2) @ do_b  # (B, H, C, W*Q, K)
            ds = p.mul_((do_b @ _windows(v_blk, n0, n1, W).transpose(-1, -2)).sub_(dl_c.view(*p.shape[:-1], 1)))
            dq_c = (ds @ kw).view(B, H, -1, K)
            dkw = ds.transpose(-1, -2) @ q_c
            C = n1 - n0
            for t in range(W):  # fold the overlapping windows back onto the key blocks
                dk_blk[:, :, n0 + t:n1 + t] += dkw[:, :, :, t * Q:(t + 1) * Q].view(B, H, C, Q, K)
                dv_blk[:, :, n0 + t:n1 + t] += dvw[:, :, :, t * Q:(t + 1) * Q].view(B, H, C, Q, K)
            q_f = q_c.view(B, H, -1, K)
            for e, se in _extra_tiles(band, q_f, ke_c, n0, n1):
                pe = se.sub_(lse_c).exp_()  # (B, H, C*Q, tile)
                dve[:, :, e] += pe.transpose(-1, -2) @ do_c
                dse = pe.mul_((do_c @ ve_c[:, :, e].transpose(-1, -2)).sub_(dl_c))
                dq_c += dse @ ke_c[:, :, e]
                dke[:, :, e] += dse.transpose(-1, -2) @ q_f
            dq[:, :, rows] = dq_c
        dq = (dq * scale).to(q.dtype)
        dk = dk_blk.view(k.shape).to(k.dtype)
        dv = dv_blk.view(v.shape).to(v.dtype)
        if ke is not None:
            dke, dve = dke.to(ke.dtype), dve.to(ve.dtype)
        return dq, dk, dv, dke, dve, None, None


def banded_attention(q: Tensor, k: Tensor, v: Tensor, band: Band, scale: float,
                     ke: Tensor | None = None, ve: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Autograd entry point; shapes as BandedAttention."""
    return BandedAttention.apply(q, k, v, ke, ve, band, scale)


def swa_block_size(window: int) -> int:
    """Query-block length Q for a window: a quarter of the window, a power of
    two in [16, 128]. Each query then reads W*Q = Q*(1 + ceil(window/Q))
    keys, i.e. at most window + 2Q, with matmuls large enough to be efficient."""
    return min(128, max(16, 1 << max(0, math.ceil(math.log2(max(1, math.ceil(window / 4)))))))


def banded_swa(q: Tensor, k: Tensor, v: Tensor, *, window: int, seq_ids: Tensor | None = None,
               scale: float | None = None, block: int | None = None,
               chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """Sliding-window causal attention, banded. Same contract as
    loom.kernels.attention.attention(window=...): q (B, T, H, K); k, v (B, S, G, K),
    queries are the last T of the S keys; seq_ids (B, S) or None.
    Returns o (B, T, H, K) and lse (B, T, H) (fp32, fp64 for fp64 inputs).
    """
    B, T, H, K = q.shape
    S, G = k.shape[1], k.shape[2]
    scale = scale if scale is not None else 1.0 / math.sqrt(K)
    Q = block or swa_block_size(window)
    W = 1 + math.ceil(window / Q)
    N = math.ceil(T / Q)
    dev = q.device
    # Coordinates: key index in the row; query i sits at S - T + i.
    q_pos = (S - T + torch.arange(N * Q, device=dev)).expand(B, -1)
    k0 = S - T - (W - 1) * Q
    k_pos = (k0 + torch.arange((N + W - 1) * Q, device=dev)).expand(B, -1)
    k_real = (k_pos >= 0) & (k_pos < S)
    if seq_ids is None:
        doc = torch.zeros(B, S, dtype=torch.long, device=dev)
    else:
        doc = seq_ids.to(torch.long)
    q_doc = torch.full((B, N * Q), -1, dtype=torch.long, device=dev)
    q_doc[:, :T] = doc[:, S - T:]
    k_doc = torch.where(k_real, torch.gather(doc, 1, k_pos.clamp(0, S - 1)), -2)
    band = Band(Q, W, q_doc, q_pos, k_doc, k_pos, window=window, chunk=chunk)
    # Buffers (B, H, ., K); GQA keys repeated per query head.
    lo, hi = max(k0, 0), min(S, k0 + (N + W - 1) * Q)
    kb = k[:, lo:hi].transpose(1, 2)  # (B, G, hi - lo, K)
    vb = v[:, lo:hi].transpose(1, 2)
    pad = (0, 0, lo - k0, k0 + (N + W - 1) * Q - hi)
    kb = torch.nn.functional.pad(kb, pad).repeat_interleave(H // G, dim=1)
    vb = torch.nn.functional.pad(vb, pad).repeat_interleave(H // G, dim=1)
    qb = torch.nn.functional.pad(q.transpose(1, 2), (0, 0, 0, N * Q - T))
    o, lse = banded_attention(qb, kb, vb, band, scale)
    return o[:, :, :T].transpose(1, 2), lse[:, :, :T].transpose(1, 2)
