"""S2-Attention: per-head block-sparse causal attention (local window of blocks
plus a vertical stride of earlier blocks with a head-dependent offset).

s2_attention(q, k, v, *, block, local_blocks, vert_stride, head_offsets=None,
             seq_ids=None, position_ids=None, scale=None, impl="auto", return_lse=False, cp=None)
    q: (B, T, H, K); k, v: (B, S, G, K), S >= T, H % G == 0; the queries are
        the last T of the S keys (prefill, decoding with a cache).
    block: b, tokens per sparse block. local_blocks: L, blocks of the local
        window, the query's own block included. vert_stride: V.
    head_offsets: (P,) int64 in [0, V), P = G (one pattern per KV head, shared
        by its query heads: KV-cache efficient, as the paper) or P = H (one
        per query head). Default: default_head_offsets(H, G, V).
    seq_ids: (B, S) int64 document ids; attention never crosses documents.
    position_ids: (B, S) int64 document-relative positions of the keys (queries
        use the last T); default: index minus the document's first index.
        Blocks are position // b, so a packed row equals separate documents.
    cp: None, or a CPContext: q, k, v, seq_ids, position_ids are this rank's
        shard (S == T); the op trades sequence for heads (Ulysses) and runs on
        the full sequence for H / cp heads (cp.py).
    Returns o (B, T, H, K) [, lse (B, T, H), fp32 (fp64 for fp64 inputs)].

For pattern head h, key block n is visible to query block m (same document,
n <= m, token-causal inside block m) when m - n < L or (n + o_h) % V == 0.

impl: "blocksparse" (blocksparse.py, the CPU path), "flex" (flex.py: FlexAttention with the
per-head BlockMask, fused forward and backward on CUDA), "reference" (reference.py: dense
mask, tests only); "auto" = "flex" on CUDA, else "blocksparse". forms.py runs them.

Example:
    offs = default_head_offsets(n_heads=8, n_kv_heads=8, vert_stride=4)    # [0, 1, 2, 3, 0, 1, 2, 3]
    o = s2_attention(q, k, v, block=16, local_blocks=4, vert_stride=4, head_offsets=offs)
"""
from __future__ import annotations

import torch

from loom.kernels.attention import multi_document
from loom.kernels.backends import have_flex, on_gpu, require
from loom.kernels.dispatch import announce
from loom.kernels.s2.blocksparse import s2_blocksparse
from loom.kernels.s2.cp import cp_s2_attention
from loom.kernels.s2.forms import FORMS, run_s2
from loom.kernels.s2.reference import s2_attention_reference, s2_mask

__all__ = ["s2_attention", "default_head_offsets", "covers_all_residues", "s2_mask",
           "s2_attention_reference", "s2_blocksparse", "cp_s2_attention"]
IMPLS = ("auto",) + FORMS


def default_head_offsets(n_heads: int, n_kv_heads: int, vert_stride: int, shift: int = 0) -> torch.Tensor:
    """Offsets o_h = (h * max(1, V // P) + shift) % V over P pattern heads.

    P = n_kv_heads when n_kv_heads >= vert_stride (the paper's per-KV-head
    pattern: the union over KV heads covers every residue and each KV head
    caches only its own); otherwise P = n_heads, so that the union over query
    heads still covers the context (a KV head then caches the residues of its
    query heads). Use covers_all_residues() to check a choice.
    """
    P = n_kv_heads if n_kv_heads >= vert_stride else n_heads
    step = max(1, vert_stride // P)
    return torch.tensor([(p * step + shift) % vert_stride for p in range(P)], dtype=torch.long, device="cpu")


def covers_all_residues(head_offsets: torch.Tensor, vert_stride: int) -> bool:
    """True when the heads' vertical blocks together cover every block."""
    return set(head_offsets.tolist()) == set(range(vert_stride))


def s2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block: int, local_blocks: int,
                 vert_stride: int, head_offsets: torch.Tensor | None = None, seq_ids: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None, scale: float | None = None, impl: str = "auto",
                 return_lse: bool = False, cp=None):
    """S2-Attention: causal attention over each head's local blocks and its vertical stride.

    Args:
        q: (B, T, H, K) queries, the last T of the S positions.
        k, v: (B, S, G, K) keys and values, S >= T, H % G == 0.
        block: b, tokens per block; local_blocks: L, blocks of the local window
            (the query's own block included); vert_stride: V.
        head_offsets: (P,) int64 in [0, V), P = G or H; default default_head_offsets(H, G, V).
        seq_ids: (B, S) int64 document ids, or None.
        position_ids: (B, S) int64 document-relative positions of the keys, or None.
        scale: softmax scale, default K ** -0.5.
        impl: "auto", "blocksparse", "flex" or "reference" (module docstring).
        return_lse: also return the log-sum-exp of each query's scores.
        cp: None, or a CPContext: q, k, v, seq_ids, position_ids are this rank's (B, L, ...) shard.

    Returns:
        o (B, T, H, K) [, lse (B, T, H) fp32 (fp64 for fp64 inputs)].
    """
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"s2_attention expects q (B,T,H,K), k=v (B,S,G,K); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, T, H, K = q.shape
    S, G = k.shape[1], k.shape[2]
    if S < T or H % G or k.shape[0] != B or k.shape[3] != K:
        raise ValueError(f"incompatible shapes q {tuple(q.shape)} and k {tuple(k.shape)}")
    for name, ids in (("seq_ids", seq_ids), ("position_ids", position_ids)):
        if ids is not None and tuple(ids.shape) != (B, S):
            raise ValueError(f"{name} must be (B, S) = ({B}, {S}); got {tuple(ids.shape)}")
    if block < 1 or local_blocks < 1 or vert_stride < 1:
        raise ValueError(f"block, local_blocks and vert_stride must be >= 1; got {block}, {local_blocks}, "
                         f"{vert_stride}")
    if head_offsets is None:
        head_offsets = default_head_offsets(H, G, vert_stride)
    head_offsets = torch.as_tensor(head_offsets, dtype=torch.long, device=q.device)
    if head_offsets.dim() != 1 or head_offsets.shape[0] not in (G, H) or \
            bool(((head_offsets < 0) | (head_offsets >= vert_stride)).any()):
        raise ValueError(f"head_offsets must be (G,) = ({G},) or (H,) = ({H},) with values in "
                         f"[0, {vert_stride}); got {head_offsets.tolist()}")
    if impl not in IMPLS:
        raise ValueError(f"unknown s2 impl {impl!r}; choose one of {IMPLS}")
    if impl == "auto":
        impl = "flex" if on_gpu(q) and have_flex() else "blocksparse"
    require(impl != "flex" or have_flex(), "s2_attention", impl, "this PyTorch has no FlexAttention")
    announce("s2 attention", impl)
    if cp is not None:
        if return_lse:
            raise ValueError("s2_attention: return_lse is not available under context parallelism")
        return cp_s2_attention(q, k, v, cp, block=block, local_blocks=local_blocks, vert_stride=vert_stride,
                               head_offsets=head_offsets, position_ids=position_ids, seq_ids=seq_ids, scale=scale,
                               impl=impl)
    return run_s2(impl, q, k, v, block=block, local_blocks=local_blocks, vert_stride=vert_stride,
                  head_offsets=head_offsets, seq_ids=multi_document(seq_ids), position_ids=position_ids,
                  scale=scale, return_lse=return_lse)
