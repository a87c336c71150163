"""Causal softmax attention (MHA/GQA, documents, sliding window).

attention(q, k, v, *, seq_ids=None, window=None, scale=None, impl="auto", return_lse=False, cp=None)

Legend: B batch, T queries, S keys (S >= T), H query heads, G key/value heads
(H % G == 0), K head dim; under cp, L = T / cp tokens of this rank's shard.

impl: "auto" picks flash-attn on CUDA when it is installed and the dtype is
fp16/bf16 and no lse is requested, else on CUDA "flex" (FlexAttention: documents and
windows in one fused kernel, flex.py); off CUDA "tiled" (tiled.py: each group of
packed documents gets only its own keys, fused causal SDPA inside a long
document) when seq_ids holds several documents; else "sdpa" (PyTorch SDPA with
the reference mask); "reference" runs reference.py as written (forms.py runs them).

Context parallelism (cp=CPContext): cp.py, by ring.py (K/V round the ring),
ulysses.py (all-to-all of heads) or halo.py (sliding windows: only the window's keys move).
"""
from __future__ import annotations

import torch

from loom.kernels.attention.cp import cp_attention
from loom.kernels.attention.forms import multi_document, run_attention, select_impl
from loom.kernels.attention.reference import attention_reference, visibility_mask

__all__ = ["attention", "attention_reference", "check_shapes", "visibility_mask", "select_impl", "multi_document",
           "cp_attention"]
IMPLS = ("auto", "sdpa", "tiled", "flash", "flex", "reference")


def check_shapes(op: str, q, k, v, seq_ids) -> None:
    """ValueError naming the shapes unless q (B,T,H,K), k=v (B,S,G,K), S >= T,
    H % G == 0 and seq_ids is None or (B, S). Shared by the attention-family ops."""
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"{op} expects q (B,T,H,K), k=v (B,S,G,K); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, T, H, K = q.shape
    S, G = k.shape[1], k.shape[2]
    if S < T or H % G or k.shape[0] != B or k.shape[3] != K:
        raise ValueError(f"incompatible shapes q {tuple(q.shape)} and k {tuple(k.shape)}")
    if seq_ids is not None and tuple(seq_ids.shape) != (B, S):
        raise ValueError(f"seq_ids must be (B, S) = ({B}, {S}); got {tuple(seq_ids.shape)}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, seq_ids: torch.Tensor | None = None,
              window: int | None = None, scale: float | None = None, impl: str = "auto", return_lse: bool = False,
              cp=None):
    """Causal softmax attention: query i (at position S - T + i) sees key j <= S - T + i
    of the same document, at most `window` positions behind it.

    Args:
        q: (B, T, H, K) queries, the last T of the S positions (prefill, decoding).
        k, v: (B, S, G, K) keys and values, S >= T, H % G == 0 (grouped-query heads).
        seq_ids: (B, S) int64 document ids of the keys (the queries use the last T), or None.
        window: keys at most `window` positions behind a query are visible; None: all.
        scale: softmax scale, default K ** -0.5.
        impl: "auto", "sdpa", "tiled", "flash", "flex" or "reference" (module docstring).
        return_lse: also return the log-sum-exp of each query's scores.
        cp: None, or the CPContext of a context-parallel group: q, k, v (B, L, ., K)
            and seq_ids (B, L) are then this rank's shard of the full sequence (S == T,
            global document ids) and the op runs cp.py (ring / Ulysses / halo).

    Returns:
        o (B, T, H, K) in q's dtype [, lse (B, T, H) fp32].

    Example:
        >>> o = attention(q, k, v, seq_ids=doc_ids)          # q (B, T, H, K), k, v (B, T, G, K)
    """
    check_shapes("attention", q, k, v, seq_ids)
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; choose one of {IMPLS}")
    if cp is not None:
        if return_lse:
            raise ValueError("attention: return_lse is not available under context parallelism")
        return cp_attention(q, k, v, cp, seq_ids=seq_ids, window=window, scale=scale)
    return run_attention(q, k, v, seq_ids=seq_ids, window=window, scale=scale, impl=impl, return_lse=return_lse)
