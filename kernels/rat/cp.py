"""RAT over a sequence sharded across cp ranks: gather chunk states, not K/V.

Legend: B batch, T full length, G q/k groups, H heads, K head dim, L RAT chunk
length, P tokens of one piece (T / (2 cp) zigzag, T / cp contiguous), N = T / P
pieces in position order, W = P // L + 1 chunk-state slots per piece.

A token of RAT sees (a) its running state, a gated recurrence restarted at
every chunk start (position % L == 0) and document start, and (b) the
chunk-final ("closing") states of its document's earlier chunks. Across a piece
boundary only two things travel:

  running state  the recurrent state after a piece's last token. Any L
                 consecutive tokens contain a restart, so with P >= L it depends
                 only on the piece's own last L tokens: each rank computes it
                 from its tails (a zero-start scan of L tokens) without waiting.
  closing states the closing states of the LAST document of each piece (right
                 aligned in W slots, with their count and whether that document
                 starts in the piece). The first document of piece c continues
                 the last document of pieces c0..c-1, where c0 is the last earlier
                 piece in which a document starts.

Algorithm (each rank, for each of its pieces, two all-gathers):
  1. tails: all-gather every piece's final running state (B, 2, H, K);
  2. scan the piece from the incoming running state (the previous piece's tail)
     and all-gather its last document's closing states (B, W, 2, H, K);
  3. run the single-device form (forms.py `run_rat`) on the piece with
     initial_state = {previous tail, closing states of pieces c0..c-1 of this
     row's continuing document, right-aligned}.
Both all-gathers are differentiable (gather.py), so gradients reach the ranks
that produced every state. Requirement: P >= L (the mixer asks P % L == 0 via
cp_chunk_tokens, which implies it). position_ids restart at 0 at every document
start (the trainer's packing), so a piece that starts a new document ignores the
incoming states.

Bytes one rank sends per layer (a = 4, or 8 for fp64 inputs; n = 2 pieces
zigzag, 1 contiguous; int64 metadata 2 * 8 B per row and piece):
    forward  = (cp - 1) * n * B * (2 H K a (1 + W) + 16)
    backward = (cp - 1) * n * B * 2 H K a (1 + W)       (reduce-scatter of the gradients)
versus ring attention's (cp - 1) * 2 B (T / cp) G K e forward: about L e / (2 a) times
less (W ~ P / L), see rat_comm_bytes. Measured at B = 1, T = 32768, H = 16, K = 64,
L = 16, cp = 4 (bf16 inputs, fp32 states; equal to the formula): 12,681,312 bytes
forward and 12,681,216 backward per rank and layer, against ring attention's
100,859,904 and 369,295,360 (comm_bytes("ring"), bf16 K/V, G = 16, with document ids):
8x less forward, 29x less backward.
"""
from __future__ import annotations

import torch

from loom.kernels.context_parallel.comm import CommBytes
from loom.kernels.context_parallel.gather import all_gather, all_gather_nograd, depend_on
from loom.kernels.context_parallel.layout import CPContext, check_seq_len, global_pieces
from loom.kernels.rat.chunked import SegmentScan
from loom.kernels.rat.forms import run_rat
from loom.kernels.rotary import rotate_heads

__all__ = ["cp_rat", "rat_comm_bytes"]


def _restarts(pos: torch.Tensor, seq_ids: torch.Tensor | None, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) document starts and recurrence restarts, as loom.kernels.rat defines them."""
    doc_start = pos == 0
    if seq_ids is not None:
        doc_start[:, 1:] |= seq_ids[:, 1:] != seq_ids[:, :-1]
    return doc_start, doc_start | (pos % L == 0)


def _running(k, v, f, restart, L: int, s0=None) -> torch.Tensor:
    """Running states (B, T, 2, H, K) of s_t = g_t s_{t-1} + (1 - g_t) [k_t ; v_t] (as
    loom.kernels.rat.chunked step 1), from s0 (B, 2, H, K) before the first token, or zero."""
    dt = torch.float64 if k.dtype == torch.float64 else torch.float32
    H, G = v.shape[2], k.shape[2]
    f = f.to(dt)
    keep = (torch.sigmoid(f) * ~restart[:, :, None, None])[:, :, None]  # (B, T, 1, H, K)
    b = torch.sigmoid(-f)[:, :, None] * torch.stack([k.to(dt).repeat(1, 1, H // G, 1), v.to(dt)], dim=2)
    if s0 is not None:
        b = torch.cat([b[:, :1] + keep[:, :1] * s0[:, None], b[:, 1:]], dim=1)
    return SegmentScan.apply(keep, b, L)


def _last_doc_closings(s, pos, doc_start, cos, sin, L: int, W: int):
    """The closing states of a piece's last document, right-aligned in W slots.

    s: (B, P, 2, H, K) running states. Returns kv (B, W, 2, H, K) (keys after RoPE,
    zero in unused slots) and meta (B, 2) int64: [count, 1 if the document starts here]."""
    B, P = pos.shape
    t = torch.arange(P, device=pos.device).expand(B, P)
    last_start = torch.where(doc_start, t, -1).amax(1)  # (B,) -1: the document began earlier
    sel = (pos % L == L - 1) & (t >= last_start[:, None])
    n = sel.sum(1)
    slot = torch.where(sel, W - n[:, None] + sel.cumsum(1) - 1, W)
    idx = torch.zeros(B, W + 1, dtype=torch.long, device=pos.device).scatter_(1, slot, t)[:, :W]  # (B, W)
    k_run, v_run = s.unbind(2)
    if cos is not None:
        k_run = rotate_heads(k_run, cos, sin)
    kv = torch.stack([k_run, v_run], dim=2)  # (B, P, 2, H, K)
    kv = torch.gather(kv, 1, idx[:, :, None, None, None].expand(-1, -1, *kv.shape[2:]))
    valid = torch.arange(W, device=pos.device) >= W - n[:, None]  # (B, W)
    return kv * valid[:, :, None, None, None], torch.stack([n, (last_start >= 0).long()], dim=1)


def _cache(closings: list[torch.Tensor], metas: list[torch.Tensor], W: int):
    """Right-aligned closing states of the document that continues into the next piece.

    closings: per earlier piece c' = 0..c-1, (B, W, 2, H, K); metas: (B, 2) each.
    Returns kv (B, c W, 2, H, K) and n (B,)."""
    meta = torch.stack(metas, dim=1)  # (B, c, 2)
    c = meta.shape[1]
    idx = torch.arange(c, device=meta.device)
    first = torch.where(meta[..., 1] == 1, idx, 0).amax(1)  # (B,) last earlier piece where the document starts
    slot = torch.arange(W, device=meta.device)
    valid = (idx[None, :, None] >= first[:, None, None]) & (slot >= W - meta[..., :1])  # (B, c, W)
    valid = valid.flatten(1)
    order = torch.sort(valid.int(), dim=1, stable=True).indices  # invalid slots first, valid in order last
    kv = torch.cat(closings, dim=1)  # (B, c W, 2, H, K)
    kv = torch.gather(kv, 1, order[:, :, None, None, None].expand(-1, -1, *kv.shape[2:]))
    return kv, valid.sum(1)


def cp_rat(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, f: torch.Tensor, position_ids: torch.Tensor,
           cp: CPContext, *, chunk: int = 16, seq_ids: torch.Tensor | None = None, cos: torch.Tensor | None = None,
           sin: torch.Tensor | None = None, scale: float | None = None, impl: str = "chunked") -> torch.Tensor:
    """`loom.kernels.rat.rat` over a sequence sharded by `cp` (either layout).

    Args (as loom.kernels.rat.rat, for this rank's shard of L_r = T / cp tokens):
        q, k: (B, L_r, G, K); v, f: (B, L_r, H, K).
        position_ids: (B, L_r) document-relative positions.
        cp: the CPContext of the group.
        chunk: L; each piece of T / (2 cp) (zigzag) tokens must hold at least L tokens
            (ValueError otherwise).
        seq_ids: (B, L_r) global document ids, or None.
        cos, sin: (B, L_r, K) RoPE tables at the chunk index, or None.
        scale: score scale, default K ** -0.5.
        impl: the single-device form each piece runs (forms.py FORMS; the dispatcher
            passes the one it resolved).

    Returns:
        o (B, L_r, H, K), equal to the shard of the single-device output.
        Collective: every rank of cp.group calls it.
    Example: o = cp_rat(q, k, v, f, pos, cp, chunk=16, seq_ids=ids, cos=cos, sin=sin)
    """
    B, Lr, G, K = q.shape
    H = v.shape[2]
    T = Lr * cp.world_size
    check_seq_len(T, cp)
    P, L = T // cp.n_chunks, chunk
    if P < L:
        raise ValueError(f"cp_rat: pieces of T / {cp.n_chunks} = {P} tokens are shorter than the RAT chunk "
                         f"L = {L}; use a longer sequence or a smaller parallel.cp")
    W = P // L + 1
    pieces = [slice(i * P, (i + 1) * P) for i in range(Lr // P)]
    # per piece: the pieces of a zigzag shard are not adjacent, so ids never compare across them
    starts = [_restarts(position_ids[:, sl], None if seq_ids is None else seq_ids[:, sl], L) for sl in pieces]
    mine = global_pieces(T, cp)

    def by_piece(gathered: torch.Tensor) -> dict[int, torch.Tensor]:
        return {c: gathered[r, i] for r in range(cp.world_size) for i, c in enumerate(global_pieces(T, cp, r))}

    # 1. every piece's final running state, from its last L tokens (exact: they hold a restart)
    tails = [_running(k[:, sl][:, -L:], v[:, sl][:, -L:], f[:, sl][:, -L:], restart[:, -L:], L)[:, -1]
             for sl, (_, restart) in zip(pieces, starts)]
    tails = all_gather(torch.stack(tails), cp)
    tail = by_piece(tails)  # c -> (B, 2, H, K)

    # 2. every piece's last-document closing states, scanned from the true incoming state
    closings, metas = [], []
    for sl, c, (doc_start, restart) in zip(pieces, mine, starts):
        s = _running(k[:, sl], v[:, sl], f[:, sl], restart, L, s0=tail[c - 1] if c else None)
        kv, meta = _last_doc_closings(s, position_ids[:, sl], doc_start,
                                      None if cos is None else cos[:, sl], None if sin is None else sin[:, sl], L, W)
        closings.append(kv)
        metas.append(meta)
    closings = all_gather(torch.stack(closings), cp)
    closing = by_piece(closings)
    meta = by_piece(all_gather_nograd(torch.stack(metas), cp))

    # 3. the single-device op on each piece, continuing from the earlier pieces
    outs = []
    for sl, c in zip(pieces, mine):
        state = None
        if c:
            kv, n = _cache([closing[j] for j in range(c)], [meta[j] for j in range(c)], W)
            state = {"k": kv[:, :, 0], "v": kv[:, :, 1], "n": n, "k_run": tail[c - 1][:, 0],
                     "v_run": tail[c - 1][:, 1]}
        outs.append(run_rat(impl, q[:, sl], k[:, sl], v[:, sl], f[:, sl], position_ids[:, sl], chunk=L,
                            seq_ids=None if seq_ids is None else seq_ids[:, sl],
                            cos=None if cos is None else cos[:, sl], sin=None if sin is None else sin[:, sl],
                            scale=scale, initial_state=state)[0])
    return depend_on(torch.cat(outs, dim=1), tails, closings)  # the gathers' backward runs on every rank


def rat_comm_bytes(*, batch: int, seq_len: int, n_heads: int, head_dim: int, chunk: int, cp: int,
                   state_bytes: int = 4, layout: str = "zigzag") -> CommBytes:
    """Bytes one rank sends per forward and per backward of one RAT layer under cp_rat.

    state_bytes: bytes per element of the exchanged states (4: they are fp32 for
    bf16/fp16/fp32 inputs; 8 for fp64). Compare with comm_bytes("ring", ...).
    Example: rat_comm_bytes(batch=1, seq_len=32768, n_heads=16, head_dim=64, chunk=16, cp=4)
    """
    if cp == 1:
        return CommBytes(0, 0)
    n_local = 2 if layout == "zigzag" else 1
    P = seq_len // (2 * cp if layout == "zigzag" else cp)
    W = P // chunk + 1
    states = (cp - 1) * n_local * batch * 2 * n_heads * head_dim * state_bytes * (1 + W)
    return CommBytes(states + (cp - 1) * n_local * batch * 16, states)
