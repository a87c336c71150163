"""S2-Attention over a sequence sharded across cp ranks: Ulysses (all-to-all).

Legend: B batch, T full length, L = T / cp tokens per rank, H query heads, G
key/value heads, P pattern heads (G or H), K head dim.

    q (B, L, H, K) --all-to-all--> (B, T, H/cp, K)   rank j gets query heads [j H/cp, (j+1) H/cp)
    k, v likewise (K/V heads replicated first when G < cp: context_parallel/all_to_all.py)
    position_ids, seq_ids all-gathered to (B, T) in position order
    o = the single-device form (forms.py run_s2) on the full sequence for this rank's heads
    o (B, T, H/cp, K) --all-to-all--> (B, L, H, K)

Why Ulysses rather than ring with block skipping: the pattern is per head and
lives on DOCUMENT-relative blocks (position // block), so which (query block,
key block) pairs a ring step may skip depends on every document's start and on
the head; the single-device kernel already handles that by re-laying documents
on padded coordinates of the full sequence. Ulysses gives it the full sequence,
so the sharded result is the single-device op itself, with nothing to merge.
The only subtlety is the head pattern: offsets belong to GLOBAL heads, so they
are expanded to one per query head and this rank's slice is passed (P = H/cp).
Cost: H % cp == 0 (and the K/V head rule of all_to_all.py); bytes as
comm_bytes("ulysses") plus the all-gather of the (B, L) int64 positions.
"""
from __future__ import annotations

import torch

from loom.kernels.attention.forms import multi_document
from loom.kernels.context_parallel.all_to_all import head_to_seq, seq_to_head, ulysses_kv_heads
from loom.kernels.context_parallel.layout import CPContext, check_seq_len, gather_sequence
from loom.kernels.s2.forms import run_s2

__all__ = ["cp_s2_attention", "rank_head_offsets"]


def rank_head_offsets(head_offsets: torch.Tensor, n_heads: int, cp: CPContext) -> torch.Tensor:
    """(H / cp,) pattern offsets of the query heads this rank holds after the all-to-all.

    head_offsets: (P,) with P = G (query heads of a KV group share it) or P = H."""
    per_head = head_offsets.repeat_interleave(n_heads // head_offsets.shape[0])  # (H,) global heads
    n = n_heads // cp.world_size
    return per_head[cp.rank * n:(cp.rank + 1) * n]


def cp_s2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp: CPContext, *, block: int,
                    local_blocks: int, vert_stride: int, head_offsets: torch.Tensor, position_ids: torch.Tensor,
                    seq_ids: torch.Tensor | None = None, scale: float | None = None,
                    impl: str = "blocksparse") -> torch.Tensor:
    """`loom.kernels.s2.s2_attention` over a sequence sharded by `cp` (either layout), via Ulysses.

    Args:
        q: (B, L, H, K); k, v: (B, L, G, K) this rank's shards (H % cp == 0; G % cp == 0
            or cp % G == 0).
        cp: the CPContext of the group.
        block, local_blocks, vert_stride: the pattern, as in s2_attention.
        head_offsets: (P,) offsets of the GLOBAL pattern heads (P = G or H).
        position_ids: (B, L) document-relative positions.
        seq_ids: (B, L) global document ids, or None.
        scale: softmax scale, default K ** -0.5.
        impl: the single-device form run on the full sequence (forms.py FORMS; the
            dispatcher passes the one it resolved).

    Returns:
        o (B, L, H, K), equal to the shard of the single-device output.
        Collective: every rank of cp.group calls it.
    Example: o = cp_s2_attention(q, k, v, cp, block=16, local_blocks=4, vert_stride=4,
                                 head_offsets=offs, position_ids=pos, seq_ids=ids)
    """
    B, L, H, K = q.shape
    G = k.shape[2]
    check_seq_len(L * cp.world_size, cp)
    if head_offsets.dim() != 1 or head_offsets.shape[0] not in (G, H):
        raise ValueError(f"cp_s2_attention: head_offsets must be (G,) = ({G},) or (H,) = ({H},); "
                         f"got {tuple(head_offsets.shape)}")
    Gr = ulysses_kv_heads(H, G, cp.world_size)
    if Gr != G:
        k, v = k.repeat_interleave(Gr // G, dim=2), v.repeat_interleave(Gr // G, dim=2)
    pos = gather_sequence(position_ids, cp)  # (B, T)
    sid = None if seq_ids is None else gather_sequence(seq_ids, cp)
    offs = rank_head_offsets(head_offsets.cpu(), H, cp).to(q.device)  # (H/cp,)
    o = run_s2(impl, seq_to_head(q, cp), seq_to_head(k, cp), seq_to_head(v, cp), block=block,
               local_blocks=local_blocks, vert_stride=vert_stride, head_offsets=offs, seq_ids=multi_document(sid),
               position_ids=pos, scale=scale)  # (B, T, H/cp, K)
    return head_to_seq(o, cp)
