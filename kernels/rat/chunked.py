"""RAT in matmul-shaped PyTorch: the CPU path (and the specification kernels must match).

Legend: B batch, T tokens, G q/k groups, H heads, K head dim, L chunk length,
J chunk states a query block may see (cached + this call's), Q queries per
attention block.

Three steps, none of them a Python loop over tokens:
1. The gated recurrence s_t = a_t s_{t-1} + b_t over [k ; v] (a_t = g_t, or 0
   where a chunk or document starts; b_t = (1 - g_t) [k_t ; v_t]) is a
   log-depth (Hillis-Steele) scan in the row layout. Every run of nonzero a_t
   is shorter than L, so ceil(log2 L) doubling steps give the exact result
   without aligning chunks to the row: documents may start anywhere and T
   need not be a multiple of L. Backward is the same scan run in reverse.
2. The chunk-final states (position % L == L - 1) are gathered into a compact
   list of J keys/values per row, after the cached states of earlier calls.
   A query's visible states are one contiguous range [lo, hi) of that list:
   from its document's first chunk state to the last one before the query.
3. Softmax attention over that range plus the query's own running state,
   merged exactly through the log-sum-exp, by blocks of Q queries, each
   block touching only the J range it can see; the backward recomputes the
   probabilities block by block (flash-attention style), so memory is
   O(T * H * K + Q * J), not O(T * T / L).
"""
from __future__ import annotations

import torch

from loom.kernels.rotary import rotate_heads


# ----- 1. the segmented linear recurrence -----

def _doubling_scan(a: torch.Tensor, b: torch.Tensor, span: int, reverse: bool) -> torch.Tensor:
    """Inclusive scan along dim 1: s_t = a_t s_{t-1} + b_t (reverse: s_t = a_t s_{t+1} + b_t),
    s = 0 before the first step. Exact if every run of nonzero a is shorter than `span`.
    a broadcasts against b."""
    d = 1
    while d < span:
        nb = torch.empty_like(b)
        if reverse:
            nb[:, -d:] = b[:, -d:]
            torch.addcmul(b[:, :-d], a[:, :-d], b[:, d:], out=nb[:, :-d])
        else:
            nb[:, :d] = b[:, :d]
            torch.addcmul(b[:, d:], a[:, d:], b[:, :-d], out=nb[:, d:])
        if 2 * d < span:  # the last step needs no combined coefficient
            na = torch.empty_like(a)
            if reverse:
                na[:, -d:] = a[:, -d:]
                torch.mul(a[:, :-d], a[:, d:], out=na[:, :-d])
            else:
                na[:, :d] = a[:, :d]
                torch.mul(a[:, d:], a[:, :-d], out=na[:, d:])
            a = na
        b = nb
        d *= 2
    return b


class SegmentScan(torch.autograd.Function):
    """s = scan(a, b) as in `_doubling_scan`; a (B, T, ...) broadcastable to b (B, T, ...)."""

    @staticmethod
    def forward(ctx, a, b, span: int):
        s = _doubling_scan(a, b, span, reverse=False)
        ctx.save_for_backward(a, s)
        ctx.span = span
        return s

    @staticmethod
    def backward(ctx, ds):
        a, s = ctx.saved_tensors
        # lam_t = ds_t + a_{t+1} lam_{t+1}: a reverse scan with the coefficients shifted by one.
        a_next = torch.zeros_like(a)
        a_next[:, :-1] = a[:, 1:]
        lam = _doubling_scan(a_next, ds.contiguous(), ctx.span, reverse=True)
        da = torch.zeros_like(lam)
        torch.mul(lam[:, 1:], s[:, :-1], out=da[:, 1:])
        return da.sum_to_size(a.shape), lam, None


# ----- 3. attention over chunk states with the running state merged in -----

def _masked_scores(qb, kcb, lo, hi, t0, t1, j0, j1, a, b):
    """(B, H, Q, J) scores q . kc_j for j in [j0, j1), -inf where j is outside [lo_t, hi_t).

    Columns in [a, b) are visible to every query of the block, so only the two
    edge bands are masked (for one document: the last Q/L columns)."""
    s = torch.matmul(qb, kcb.transpose(-1, -2))
    bands = [(j0, a), (b, j1)] if a < b else [(j0, j1)]
    for c0, c1 in bands:
        if c1 > c0:
            j = torch.arange(c0, c1, device=lo.device)
            hidden = (j < lo[:, t0:t1, None]) | (j >= hi[:, t0:t1, None])  # (B, Q, c1 - c0)
            s[..., c0 - j0:c1 - j0].masked_fill_(hidden[:, None], float("-inf"))
    return s


class ChunkStateAttention(torch.autograd.Function):
    """o_t = softmax([q_t . kc_j  for lo_t <= j < hi_t ; q_t . kd_t]) @ [vc_j ; vd_t].

    q, kd, vd: (B, H, T, K) queries (scale already applied) and each query's own
    running state; kc, vc: (B, H, J, K) compact chunk-final states; lo, hi: (B, T)
    int64. Returns o (B, H, T, K) and lse (B, H, T) (not differentiable).
    """

    @staticmethod
    def forward(ctx, q, kd, vd, kc, vc, lo, hi, block: int):
        B, H, T, K = q.shape
        o = torch.empty_like(q)
        lse = q.new_empty(B, H, T)
        ranges = _block_ranges(lo, hi, block)
        for t0, t1, j0, j1, a, b in ranges:
            qb = q[:, :, t0:t1]
            sd = (qb * kd[:, :, t0:t1]).sum(-1)  # (B, H, Q) own-state score
            if j1 <= j0:  # no earlier chunk state: the query attends to its own state only
                o[:, :, t0:t1] = vd[:, :, t0:t1]
                lse[:, :, t0:t1] = sd
                continue
            p = _masked_scores(qb, kc[:, :, j0:j1], lo, hi, t0, t1, j0, j1, a, b)  # (B, H, Q, J)
            m = torch.maximum(p.amax(-1), sd)  # finite: the own state is always visible
            p = p.sub_(m[..., None]).exp_()
            pd = torch.exp(sd - m)
            denom = p.sum(-1) + pd
            ob = torch.matmul(p, vc[:, :, j0:j1]).add_(pd[..., None] * vd[:, :, t0:t1])
            o[:, :, t0:t1] = ob / denom[..., None]
            lse[:, :, t0:t1] = m + torch.log(denom)
        ctx.save_for_backward(q, kd, vd, kc, vc, lo, hi, o, lse)
        ctx.ranges = ranges
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, kd, vd, kc, vc, lo, hi, o, lse = ctx.saved_tensors
        do = do.contiguous()
        dq, dkd, dvd = torch.empty_like(q), torch.empty_like(kd), torch.empty_like(vd)
        dkc, dvc = torch.zeros_like(kc), torch.zeros_like(vc)
        for t0, t1, j0, j1, a, b in ctx.ranges:
            qb, dob = q[:, :, t0:t1], do[:, :, t0:t1]
            kdb, vdb, lseb = kd[:, :, t0:t1], vd[:, :, t0:t1], lse[:, :, t0:t1]
            delta = (dob * o[:, :, t0:t1]).sum(-1)  # (B, H, Q)
            pd = torch.exp((qb * kdb).sum(-1) - lseb)
            dsd = pd * ((dob * vdb).sum(-1) - delta)
            dvd[:, :, t0:t1] = pd[..., None] * dob
            dkd[:, :, t0:t1] = dsd[..., None] * qb
            dqb = dsd[..., None] * kdb
            if j1 > j0:
                kcb, vcb = kc[:, :, j0:j1], vc[:, :, j0:j1]
                p = _masked_scores(qb, kcb, lo, hi, t0, t1, j0, j1, a, b).sub_(lseb[..., None]).exp_()
                ds = torch.matmul(dob, vcb.transpose(-1, -2)).sub_(delta[..., None]).mul_(p)  # (B, H, Q, J)
                dqb = dqb.add_(torch.matmul(ds, kcb))
                dkc[:, :, j0:j1] += torch.matmul(ds.transpose(-1, -2), qb)
                dvc[:, :, j0:j1] += torch.matmul(p.transpose(-1, -2), dob)
            dq[:, :, t0:t1] = dqb
        return dq, dkd, dvd, dkc, dvc, None, None, None


def _block_ranges(lo: torch.Tensor, hi: torch.Tensor, block: int) -> list[tuple[int, ...]]:
    """[(t0, t1, j0, j1, a, b)] per block of queries: the compact range [j0, j1) its
    rows can see, of which [a, b) is visible to all of them (one host sync)."""
    B, T = lo.shape
    nblk = -(-T // block)
    pad = nblk * block - T
    lo_b = torch.cat([lo, lo[:, -1:].expand(B, pad)], dim=1).view(B, nblk, block)  # pad: repeat the last query
    hi_b = torch.cat([hi, hi[:, -1:].expand(B, pad)], dim=1).view(B, nblk, block)
    bounds = torch.stack([lo_b.amin(dim=(0, 2)), hi_b.amax(dim=(0, 2)),
                          lo_b.amax(dim=(0, 2)), hi_b.amin(dim=(0, 2))], dim=1).tolist()
    return [(i * block, min(T, (i + 1) * block), *bounds[i]) for i in range(nblk)]


# ----- the op -----

def rat_chunked(q, k, v, f, position_ids, *, chunk: int, seq_ids=None, cos=None, sin=None, scale=None,
                initial_state=None, return_state=False, return_stats=False, block_q: int = 256,
                scan=None, attend=None):
    """See `loom.kernels.rat.rat`. Returns (o (B, T, H, K), stats, state or None).

    scan, attend: the GPU backends of steps 1 and 3 (rat/triton.py's TritonSegmentScan.apply and
    rat/flex.py's chunk_state_attention_flex, same contracts); None runs the PyTorch forms here."""
    B, T, G, K = q.shape
    H = v.shape[2]
    L = chunk
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = K ** -0.5 if scale is None else scale
    dev = q.device
    pos = position_ids
    doc_start = pos == 0
    if seq_ids is not None:
        doc_start[:, 1:] |= seq_ids[:, 1:] != seq_ids[:, :-1]
    reset = doc_start | (pos % L == 0)
    final = pos % L == L - 1  # (B, T) the state here closes a chunk

    # 1. s_t = g_t s_{t-1} + (1 - g_t) x_t over x = [k ; v], one gate for both. The [k ; v] axis
    # sits outside (H, K) so that broadcasting the gate keeps the inner loops contiguous.
    f = f.to(dt)
    keep = (torch.sigmoid(f) * ~reset[:, :, None, None])[:, :, None]  # (B, T, 1, H, K)
    k_h = k.to(dt).repeat(1, 1, H // G, 1)  # (B, T, H, K) tiled: head h uses group h % G
    b = torch.sigmoid(-f)[:, :, None] * torch.stack([k_h, v.to(dt)], dim=2)  # (B, T, 2, H, K)
    if initial_state is not None:
        s0 = torch.stack([initial_state["k_run"], initial_state["v_run"]], dim=1).to(dt)  # (B, 2, H, K)
        b = torch.cat([b[:, :1] + keep[:, :1] * s0[:, None], b[:, 1:]], dim=1)
    s = (scan or SegmentScan.apply)(keep, b, L)
    k_run, v_run = s.unbind(2)  # (B, T, H, K) each

    q_h = q.to(dt).repeat(1, 1, H // G, 1)  # (B, T, H, K)
    k_rot = k_run
    if cos is not None:
        q_h, k_rot = rotate_heads(q_h, cos, sin), rotate_heads(k_run, cos, sin)

    # 2. compact list [cached states (right-aligned, C) ; this call's chunk-final states (F)].
    n_final = final.sum(1)  # (B,)
    F = int(n_final.max())
    t_idx = torch.arange(T, device=dev).expand(B, T)
    slot = torch.where(final, final.cumsum(1) - 1, F)
    idx = torch.zeros(B, F + 1, dtype=torch.long, device=dev).scatter_(1, slot, t_idx)[:, :F]  # (B, F)
    gather = idx[:, :, None, None].expand(B, F, H, K)
    kc, vc = torch.gather(k_rot, 1, gather), torch.gather(v_run, 1, gather)  # (B, F, H, K)
    C = 0
    n_cache = torch.zeros(B, dtype=torch.long, device=dev)
    if initial_state is not None:
        C = initial_state["k"].shape[1]
        n_cache = initial_state["n"].to(dev)
        kc = torch.cat([initial_state["k"].to(dt), kc], dim=1)
        vc = torch.cat([initial_state["v"].to(dt), vc], dim=1)
    before = final.cumsum(1) - final.long()  # chunk-final states strictly before t
    hi = C + before
    last_start = torch.where(doc_start, t_idx, -1).cummax(1).values  # (B, T) -1: continuing document
    lo = torch.where(last_start >= 0, C + before.gather(1, last_start.clamp_min(0)), C - n_cache[:, None])

    # 3. attention over [lo, hi) plus the own running state.
    q_h = q_h * scale
    o, lse = (attend or ChunkStateAttention.apply)(
        q_h.transpose(1, 2).contiguous(), k_rot.transpose(1, 2).contiguous(), v_run.transpose(1, 2).contiguous(),
        kc.transpose(1, 2).contiguous(), vc.transpose(1, 2).contiguous(), lo, hi, block_q)
    o = o.transpose(1, 2).to(v.dtype)  # (B, T, H, K)
    lse = None if lse is None else lse.transpose(1, 2)  # (B, T, H); None: a backend skipped it (no stats asked)
    stats = None
    if return_stats:
        with torch.no_grad():
            local = torch.exp((q_h * k_rot).sum(-1) - lse)
            first_idx = lo.clamp(0, max(kc.shape[1] - 1, 0))[:, :, None, None].expand(B, T, H, K)
            k_first = torch.gather(kc, 1, first_idx) if kc.shape[1] else k_rot
            first = torch.where((lo < hi)[:, :, None], torch.exp((q_h * k_first).sum(-1) - lse), local)
        stats = {"lse": lse, "local": local, "first": first}

    state = None
    if return_state:
        # The last document's chunk states, right-aligned, and the running state after token T-1.
        end = C + n_final
        lo_last = lo[:, -1]
        n_new = end - lo_last
        width = int(n_new.max())
        src = end[:, None] - width + torch.arange(width, device=dev)  # (B, width)
        valid = (src >= lo_last[:, None])[:, :, None, None]
        sel = src.clamp_min(0)[:, :, None, None].expand(B, width, H, K)
        state = {"k": (torch.gather(kc, 1, sel) * valid).to(v.dtype),
                 "v": (torch.gather(vc, 1, sel) * valid).to(v.dtype),
                 "n": n_new, "k_run": k_run[:, -1], "v_run": v_run[:, -1]}
    return o, stats, state
