"""Packed-document attention on CPU: each document group gets only its own keys.

Legend: B batch, T queries, S keys (S >= T), H query heads, G key/value heads,
K head dim, N groups of one row.

A packed row holds several documents back to back, and no query sees another
document. The dense path (reference.py) gives SDPA a (B, 1, T, S) boolean
mask, which leaves PyTorch's fused causal kernel and computes all T x S scores
although most are masked. Here each row is cut into *groups* of whole
documents along the key axis:

    a document longer than TILE tokens is a group of its own: its queries see
        the keys of that document only, with the plain causal (bottom-right)
        rule, so SDPA runs its fused causal kernel (is_causal) when the
        document's queries and keys coincide;
    consecutive short documents are merged into one group of at most TILE
        tokens, run with the small (t, s) document mask, so a row of many
        tiny documents is still a handful of calls.

Queries are the last T of the S keys; a group's queries are its keys that lie
in that range, so a group that starts in the cache (T < S) reads its earlier
keys too. Every visible pair (same document, causal, window) is computed
exactly as in reference.py, so the result equals it; the work is the sum over
groups of t x s instead of T x S.

Groups are found on the host (one synchronisation per call): this path is for
CPU, where that costs nothing. Inputs whose document ids are not
non-decreasing along a row (an id that comes back later) are outside the
packing contract and go to the dense path.
"""
from __future__ import annotations

import torch

from loom.kernels.attention.reference import attention_reference

__all__ = ["tiled_attention", "document_groups", "TILE"]

TILE = 512  # short documents are merged into groups of at most this many tokens


def document_groups(seq_ids_row: torch.Tensor, tile: int) -> list[tuple[int, int, bool]]:
    """[(start, end, several_documents)] covering [0, S) for one row's (S,) ids.

    Groups are whole documents: one long document, or consecutive short ones
    whose total is at most `tile` tokens.
    """
    S = seq_ids_row.shape[0]
    cuts = (torch.nonzero(seq_ids_row[1:] != seq_ids_row[:-1]).flatten() + 1).tolist()
    bounds = [0, *cuts, S]
    groups: list[tuple[int, int, bool]] = []
    start, docs = 0, 0
    for a, b in zip(bounds[:-1], bounds[1:]):
        if docs and b - start > tile:
            groups.append((start, a, docs > 1))
            start, docs = a, 0
        docs += 1
        if b - a > tile:  # a long document closes its own group
            groups.append((start, b, docs > 1))
            start, docs = b, 0
    if docs:
        groups.append((start, S, docs > 1))
    return groups


def is_packed(seq_ids: torch.Tensor) -> bool:
    """True when every row's document ids never decrease (documents are contiguous runs)."""
    return bool((seq_ids[:, 1:] >= seq_ids[:, :-1]).all())


def tiled_attention(q, k, v, *, seq_ids, window=None, scale=None, return_lse=False, tile: int | None = None):
    """Causal attention of packed documents, equal to `attention_reference`.

    q: (B, T, H, K); k, v: (B, S, G, K); seq_ids: (B, S) int64, non-decreasing
    along each row. window, scale, return_lse: as in loom.kernels.attention.
    Returns o (B, T, H, K) [, lse (B, T, H) fp32].

    Example:
        >>> o = tiled_attention(q, k, v, seq_ids=torch.tensor([[0] * 300 + [1] * 724]))
    """
    T, S = q.shape[1], k.shape[1]
    tile = TILE if tile is None else tile
    outs, lses = [], []
    # torch.split (not slicing) so that backward is one concatenation, not a full-size
    # zero tensor per piece
    for q_b, k_b, v_b, sid_b in zip(q.split(1), k.split(1), v.split(1), seq_ids.split(1)):
        groups = document_groups(sid_b[0], tile)
        sizes = [e - a for a, e, _ in groups]
        k_parts, v_parts, sid_parts = k_b.split(sizes, dim=1), v_b.split(sizes, dim=1), sid_b.split(sizes, dim=1)
        # query rows of each group: its keys that are queries (the last T of S)
        q_parts = iter(q_b.split([max(0, e - max(a, S - T)) for a, e, _ in groups], dim=1))
        row_o, row_l = [], []
        for (a, e, several), k_g, v_g, sid_g in zip(groups, k_parts, v_parts, sid_parts):
            q_g = next(q_parts)
            if e <= S - T:
                continue
            res = attention_reference(q_g, k_g, v_g, seq_ids=sid_g if several else None,
                                      window=window, scale=scale, return_lse=return_lse)
            row_o.append(res[0] if return_lse else res)
            if return_lse:
                row_l.append(res[1])
        outs.append(torch.cat(row_o, dim=1))
        if return_lse:
            lses.append(torch.cat(row_l, dim=1))
    o = torch.cat(outs, dim=0)
    return (o, torch.cat(lses, dim=0)) if return_lse else o
