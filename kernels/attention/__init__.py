"""Causal softmax attention (MHA/GQA, documents, sliding window).

attention(q, k, v, seq_ids=None, window=None, scale=None, impl="auto", return_lse=False, cp=None)
    q: (B, T, H, K); k, v: (B, S, G, K) with S >= T and H % G == 0.
    seq_ids: (B, S) int64 document ids of the keys (queries use the last T).
    window: keys at most `window` tokens behind the query are visible.
    cp: None, or the CPContext of a context-parallel group: q, k, v and seq_ids
        are then this rank's shard of the full sequence (S == T) and the op runs
        kernels.context_parallel.cp_attention (ring / Ulysses / halo).
    Returns o (B, T, H, K) [, lse (B, T, H) fp32].

impl: "auto" picks flash-attn on CUDA when it is installed and the dtype is
fp16/bf16 and no lse is requested, else on CUDA "flex" (FlexAttention: documents and
windows in one fused kernel, flex.py); off CUDA "tiled" (tiled.py: each group of
packed documents gets only its own keys, fused causal SDPA inside a long
document) when seq_ids holds several documents; else "sdpa" (PyTorch SDPA with
the reference mask); "reference" runs reference.py as written.
"""
from __future__ import annotations

import functools
import importlib.util

import torch

from loom.kernels.attention.reference import attention_reference, visibility_mask
from loom.kernels.attention.tiled import is_packed, tiled_attention
from loom.kernels.backends import have_flex, on_gpu
from loom.kernels.dispatch import announce

__all__ = ["attention", "check_shapes", "visibility_mask", "select_impl", "multi_document"]
IMPLS = ("auto", "sdpa", "tiled", "flash", "flex", "reference")


@functools.lru_cache(maxsize=None)
def _have_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def select_impl(q: torch.Tensor, return_lse: bool) -> str:
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and not return_lse and _have_flash_attn():
        return "flash"
    if on_gpu(q) and have_flex():  # documents and windows in one fused kernel (attention/flex.py)
        return "flex"
    return "sdpa"


def _flash(q, k, v, seq_ids, window, scale):
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    B, T, H, K = q.shape
    S = k.shape[1]
    win = (window, 0) if window is not None else (-1, -1)
    if seq_ids is None or T != S:
        # flash-attn aligns causal masks bottom-right, as the reference does.
        return flash_attn_func(q, k, v, softmax_scale=scale, causal=True, window_size=win)
    # Documents: each (row, document) is one varlen sequence.
    starts = torch.ones_like(seq_ids, dtype=torch.bool)
    starts[:, 1:] = seq_ids[:, 1:] != seq_ids[:, :-1]
    idx = torch.nonzero(starts.flatten()).flatten()
    cu = torch.cat([idx, idx.new_tensor([B * T])]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    o = flash_attn_varlen_func(q.reshape(B * T, H, K), k.reshape(B * T, -1, K), v.reshape(B * T, -1, K),
                               cu, cu, max_len, max_len, softmax_scale=scale, causal=True, window_size=win)
    return o.reshape(B, T, H, K)


def multi_document(seq_ids: torch.Tensor | None) -> torch.Tensor | None:
    """seq_ids, or None when every row holds one document (no mask is needed then,
    and the fused causal kernels apply)."""
    if seq_ids is None or bool((seq_ids == seq_ids[:, -1:]).all()):
        return None
    return seq_ids


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


def attention(q, k, v, *, seq_ids=None, window=None, scale=None, impl="auto", return_lse=False, cp=None):
    """Causal softmax attention; arguments and shapes in the module docstring.

    Example:
        >>> o = attention(q, k, v, seq_ids=doc_ids)          # q (B, T, H, K), k, v (B, T, G, K)
    """
    check_shapes("attention", q, k, v, seq_ids)
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; choose one of {IMPLS}")
    if cp is not None:
        if return_lse:
            raise ValueError("attention: return_lse is not available under context parallelism")
        from loom.kernels.context_parallel import cp_attention

        return cp_attention(q, k, v, cp, seq_ids=seq_ids, window=window, scale=scale)
    seq_ids = multi_document(seq_ids)
    if impl == "auto":
        impl = select_impl(q, return_lse)
        if impl == "sdpa" and seq_ids is not None and not q.is_cuda and is_packed(seq_ids):
            impl = "tiled"
    announce("attention", impl)
    if impl == "flash":
        if return_lse:
            raise ValueError("impl='flash' does not return lse here; use impl='sdpa'")
        if not _have_flash_attn():
            raise RuntimeError("impl='flash' requested but flash-attn is not installed (pip install loom-lm[gpu])")
        return _flash(q, k, v, seq_ids, window, scale)
    if impl == "flex":
        from loom.kernels.attention.flex import flex_attention_masked
        return flex_attention_masked(q, k, v, seq_ids=seq_ids, window=window, scale=scale, return_lse=return_lse)
    if impl == "tiled" and seq_ids is not None:
        if not is_packed(seq_ids):
            raise ValueError("impl='tiled' needs document ids that never decrease along a row; use impl='sdpa'")
        return tiled_attention(q, k, v, seq_ids=seq_ids, window=window, scale=scale, return_lse=return_lse)
    return attention_reference(q, k, v, seq_ids=seq_ids, window=window, scale=scale, return_lse=return_lse)
