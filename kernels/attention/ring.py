"""Ring attention: K/V blocks travel around the cp ring, every rank merges the
partial attention of its queries against each visiting block.

Legend: B batch, T full length, L = T / cp tokens per rank, C chunk length
(L / 2 zigzag, L contiguous), H query heads, G key/value heads, R = H / G,
K head dim, t query rows of one tile (<= _TILE_ROWS), s key rows of one chunk.

Forward, on rank r, for step i = 0 .. cp-1 (block of source rank r - i):
    post send(own buffer -> r+1), recv(next buffer <- r-1)    # overlaps the compute
    for every (query tile, key chunk) pair that is not fully masked:
        o_b, lse_b = softmax attention of the pair (causality by GLOBAL positions,
                     document ids, window), in fp32 (fp64 for fp64 inputs)
        lse' = logaddexp(lse, lse_b);  o = o*exp(lse - lse') + o_b*exp(lse_b - lse')
    wait
Only K and V (stacked, G heads: GQA is never expanded on the wire) and the key
document ids travel; key positions follow from the source rank and the layout.

Backward recomputes each block's probabilities from the saved final lse
(P = exp(S - lse), dS = P * (dP - rowsum(dO * O))) while K/V go round the ring a
second time; each block's dK/dV accumulator (fp32) travels with it (one step behind, so
that it too overlaps the compute) and a final hop brings it home. Exact: every
rank ends with the gradient of its own K/V summed over all queries.

With the zigzag layout every step costs every rank the same half block of work
(rank r's chunks are r and 2cp-1-r; each pair of chunks is either fully visible,
fully future and skipped, or the causal diagonal). The contiguous layout is
exact too but leaves rank 0 idle for most steps.

Memory: each query chunk is cut into tiles of at most _TILE_ROWS rows, so the
fp32 scores / probabilities / dP / dS of a pair are (B, H, t, s), never
(B, H, C, C). Tiling is exact: a query row's softmax over one key chunk lies
entirely inside its tile, dq rows are independent, and dK/dV sum over tiles.
"""
from __future__ import annotations

import math

import torch

from loom.kernels.context_parallel.layout import CPContext, check_seq_len, chunk_ranges
from loom.kernels.context_parallel.p2p import exchange, wait

__all__ = ["ring_attention"]

_TAG_KV, _TAG_SEQ, _TAG_DKV = 0, 1, 2
_TILE_ROWS = 512  # query rows per tile: bounds the per-pair fp32 blocks at H x 512 x C


def _pair_mask(qa: int, qb: int, ka: int, kb: int, window: int | None, q_sid, k_sid, device):
    """Visibility of keys at global positions [ka, kb) to queries at [qa, qb).

    Returns (visible, mask): visible=False when no key is visible to any query
    (the pair is skipped); mask None when all are visible, else (B|1, 1, 1, t, s) bool.
    """
    if ka > qb - 1 or (window is not None and qa - (kb - 1) > window):
        return False, None
    mask = None
    if kb - 1 > qa or (window is not None and (qb - 1) - ka > window):
        qpos = torch.arange(qa, qb, device=device)[:, None]
        kpos = torch.arange(ka, kb, device=device)[None, :]
        mask = kpos <= qpos
        if window is not None:
            mask = mask & (qpos - kpos <= window)
        mask = mask[None, None, None]
    if q_sid is not None:
        # packed documents: a pair whose id ranges do not meet is skipped, and one
        # inside a single document needs no document mask
        q_lo, q_hi, k_lo, k_hi = (int(x) for x in torch.stack([q_sid.min(), q_sid.max(), k_sid.min(), k_sid.max()]))
        if q_lo > k_hi or q_hi < k_lo:
            return False, None
        if not q_lo == q_hi == k_lo == k_hi:
            same = (q_sid[:, :, None] == k_sid[:, None, :])[:, None, None]  # (B, 1, 1, t, s)
            mask = same if mask is None else mask & same
    return True, mask


def _scores(q_g, k, mask, scale):
    s = torch.einsum("bgrtk,bsgk->bgrts", q_g, k) * scale  # (B, G, R, t, s)
    return s if mask is None else s.masked_fill(~mask, float("-inf"))


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """lse with -inf (no visible key) replaced by 0, so exp(x - lse) stays 0, not NaN."""
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


def _block_forward(q_g, k, v, mask, scale):
    """q_g (B, G, R, t, K), k/v (B, s, G, K) -> o (B, G, R, t, K), lse (B, G, R, t)."""
    s = _scores(q_g, k, mask, scale)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - _finite(lse)[..., None])
    return torch.einsum("bgrts,bsgk->bgrtk", p, v), lse


def _merge_(o, lse, o_b, lse_b) -> None:
    """Online-softmax merge of a block result into the running (o, lse), in place."""
    new = torch.logaddexp(lse, lse_b)
    safe = _finite(new)
    o.mul_(torch.exp(lse - safe)[..., None]).add_(o_b * torch.exp(lse_b - safe)[..., None])
    lse.copy_(new)


def _block_backward(q_g, k, v, do_g, lse, delta, mask, scale):
    """Gradients of one block given the final lse and delta = rowsum(dO * O).

    q_g, do_g (B, G, R, t, K); k, v (B, s, G, K); lse, delta (B, G, R, t).
    Returns dq (B, G, R, t, K), dk, dv (B, s, G, K); GQA heads are summed over R.
    """
    p = torch.exp(_scores(q_g, k, mask, scale) - lse[..., None])
    dv = torch.einsum("bgrts,bgrtk->bsgk", p, do_g)
    dp = torch.einsum("bgrtk,bsgk->bgrts", do_g, v)
    ds = p * (dp - delta[..., None])
    dq = torch.einsum("bgrts,bsgk->bgrtk", ds, k) * scale
    dk = torch.einsum("bgrts,bgrtk->bsgk", ds, q_g) * scale
    return dq, dk, dv


def _visible_pairs(cp: CPContext, T: int, src: int, window, q_sid, k_sid, device):
    """Yield (query rows, key rows, mask) of the local-query-tile x block-of-`src` pairs to compute.

    Query rows come in tiles of at most _TILE_ROWS inside one chunk; key rows are a whole chunk.
    """
    C = T // cp.n_chunks
    q_chunks = chunk_ranges(T, cp.world_size, cp.rank, cp.layout)
    k_chunks = chunk_ranges(T, cp.world_size, src, cp.layout)
    for i, (qa, qb) in enumerate(q_chunks):
        for ta in range(qa, qb, _TILE_ROWS):
            tb = min(ta + _TILE_ROWS, qb)
            rows = slice(i * C + ta - qa, i * C + tb - qa)
            for j, (ka, kb) in enumerate(k_chunks):
                cols = slice(j * C, (j + 1) * C)
                visible, mask = _pair_mask(ta, tb, ka, kb, window,
                                           None if q_sid is None else q_sid[:, rows],
                                           None if k_sid is None else k_sid[:, cols], device)
                if visible:
                    yield rows, cols, mask


def _to_groups(x: torch.Tensor, G: int) -> torch.Tensor:
    """(B, L, H, K) -> (B, G, R, L, K), query head h = g * R + r uses key head g."""
    B, L, H, K = x.shape
    return x.reshape(B, L, G, H // G, K).permute(0, 2, 3, 1, 4)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, seq_ids, cp: CPContext, window, scale):
        B, L, H, K = q.shape
        G, T, n = k.shape[2], q.shape[1] * cp.world_size, cp.world_size
        acc = torch.promote_types(q.dtype, torch.float32)
        nxt, prv = (cp.rank + 1) % n, (cp.rank - 1) % n
        q_g = _to_groups(q.to(acc), G)
        o = torch.zeros_like(q_g)
        lse = torch.full(q_g.shape[:-1], float("-inf"), dtype=acc, device=q.device)
        kv, k_sid = torch.stack([k, v], dim=2), seq_ids  # (B, L, 2, G, K)
        for step in range(n):
            works = []
            if step < n - 1:
                kv_next = torch.empty_like(kv)
                sends, recvs = [(kv, nxt, _TAG_KV)], [(kv_next, prv, _TAG_KV)]
                if seq_ids is not None:
                    sid_next = torch.empty_like(k_sid)
                    sends.append((k_sid, nxt, _TAG_SEQ))
                    recvs.append((sid_next, prv, _TAG_SEQ))
                works = exchange(cp, sends, recvs)
            src = (cp.rank - step) % n
            kv_acc = kv.to(acc)
            for rows, cols, mask in _visible_pairs(cp, T, src, window, seq_ids, k_sid, q.device):
                o_b, lse_b = _block_forward(q_g[..., rows, :], kv_acc[:, cols, 0], kv_acc[:, cols, 1], mask, scale)
                _merge_(o[..., rows, :], lse[..., rows], o_b, lse_b)
            wait(works)
            if step < n - 1:
                kv = kv_next
                k_sid = sid_next if seq_ids is not None else None
        out = o.permute(0, 3, 1, 2, 4).reshape(B, L, H, K).to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, seq_ids)
        ctx.cp, ctx.window, ctx.scale = cp, window, scale
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, seq_ids = ctx.saved_tensors
        cp, window, scale = ctx.cp, ctx.window, ctx.scale
        G, T, n = k.shape[2], q.shape[1] * cp.world_size, cp.world_size
        acc = lse.dtype
        nxt, prv = (cp.rank + 1) % n, (cp.rank - 1) % n
        q_g, do_g = _to_groups(q.to(acc), G), _to_groups(do.to(acc), G)
        delta = _to_groups((do.to(acc) * out.to(acc)).sum(-1, keepdim=True), G)[..., 0]  # (B, G, R, L)
        dq = torch.zeros_like(q_g)
        kv, k_sid = torch.stack([k, v], dim=2), seq_ids
        dkv = None  # accumulated dK/dV of the block held in the previous step
        for step in range(n):
            sends, recvs = [], []
            if step < n - 1:
                kv_next = torch.empty_like(kv)
                sends.append((kv, nxt, _TAG_KV))
                recvs.append((kv_next, prv, _TAG_KV))
                if seq_ids is not None:
                    sid_next = torch.empty_like(k_sid)
                    sends.append((k_sid, nxt, _TAG_SEQ))
                    recvs.append((sid_next, prv, _TAG_SEQ))
            if step > 0:
                dkv_in = torch.empty_like(dkv)
                sends.append((dkv, nxt, _TAG_DKV))
                recvs.append((dkv_in, prv, _TAG_DKV))
            works = exchange(cp, sends, recvs)
            src = (cp.rank - step) % n
            kv_acc = kv.to(acc)
            dkv_local = torch.zeros_like(kv_acc)  # (B, L, 2, G, K)
            for rows, cols, mask in _visible_pairs(cp, T, src, window, seq_ids, k_sid, q.device):
                dq_b, dk_b, dv_b = _block_backward(q_g[..., rows, :], kv_acc[:, cols, 0], kv_acc[:, cols, 1],
                                                   do_g[..., rows, :], lse[..., rows], delta[..., rows],
                                                   mask, scale)
                dq[..., rows, :] += dq_b
                dkv_local[:, cols, 0] += dk_b
                dkv_local[:, cols, 1] += dv_b
            wait(works)
            dkv = dkv_local if step == 0 else dkv_local + dkv_in
            if step < n - 1:
                kv = kv_next
                k_sid = sid_next if seq_ids is not None else None
        # After the last step this rank holds block r+1's complete accumulator: one
        # more hop takes every accumulator home.
        dkv_home = dkv
        if n > 1:
            dkv_home = torch.empty_like(dkv)
            wait(exchange(cp, [(dkv, nxt, _TAG_DKV)], [(dkv_home, prv, _TAG_DKV)]))
        B, L, H, K = q.shape
        dq = dq.permute(0, 3, 1, 2, 4).reshape(B, L, H, K).to(q.dtype)
        return dq, dkv_home[:, :, 0].to(k.dtype), dkv_home[:, :, 1].to(v.dtype), None, None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp: CPContext, *,
                   seq_ids: torch.Tensor | None = None, window: int | None = None,
                   scale: float | None = None) -> torch.Tensor:
    """Ring attention over a sequence sharded by `cp` (either layout; zigzag balances it).

    Args:
        q: (B, L, H, K); k, v: (B, L, G, K) this rank's shards, H % G == 0.
        cp: the CPContext of the group.
        scale: softmax scale, default K ** -0.5.
        seq_ids: (B, L) int64 global document ids of this rank's tokens, or None.
        window: optional sliding window (pairs of chunks beyond it are skipped; the
            dispatcher prefers halo.py, which moves only the window's keys).

    Returns:
        o (B, L, H, K), equal to the single-process `attention` shard.
        Must be called by every rank of cp.group (collective), with cp.world_size >= 2.
    """
    B, L, H, K = q.shape
    if k.shape != v.shape or k.shape[:2] != (B, L) or H % k.shape[2] or k.shape[3] != K:
        raise ValueError(f"ring_attention: incompatible shards q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    check_seq_len(L * cp.world_size, cp)
    scale = scale if scale is not None else 1.0 / math.sqrt(K)
    return _RingAttention.apply(q, k, v, seq_ids, cp, window, scale)
