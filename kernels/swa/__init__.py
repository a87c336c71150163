"""Sliding-window causal attention (documents, GQA, decoding with a cache).

sliding_window_attention(q, k, v, *, window, seq_ids=None, scale=None, impl="auto", return_lse=False, cp=None)
    q: (B, T, H, K); k, v: (B, S, G, K) with S >= T and H % G == 0; the
        queries are the last T of the S keys (prefill, decoding with a cache).
    window: int >= 0; key j is visible to query i when 0 <= i - j <= window
        (the query itself plus `window` past tokens, as RAT's paper counts it).
    seq_ids: (B, S) int64 document ids; attention never crosses documents.
    cp: None, or a CPContext: q, k, v, seq_ids are this rank's shard (S == T)
        and the op runs the halo exchange (kernels/attention/halo.py).
    Returns o (B, T, H, K) [, lse (B, T, H), fp32 (fp64 for fp64 inputs)].

impl:
    "banded"  banded.py: queries in blocks, each reading only its window of
              key blocks; O(T * window) time, O(T) memory; forward and
              backward in PyTorch (the CPU path, and any device).
    "flash"   flash-attn's window on CUDA (through loom.kernels.attention).
    "flex"    FlexAttention with the window and document mask (attention/flex.py): the CUDA
              path when flash-attn is absent or cannot mask the documents.
    "reference" (alias "sdpa") reference.py: the dense masked SDPA, O(T * S) (tests).
    "auto"    "flash" when q is CUDA fp16/bf16, flash-attn is installed, no
              lse is requested, and documents do not need a cache-aware mask
              (seq_ids is None or T == S); otherwise "banded".

Example:
    o = sliding_window_attention(q, k, v, window=512, seq_ids=seq_ids)
"""
from __future__ import annotations

import torch

from loom.kernels.attention import attention, check_shapes, multi_document, select_impl
from loom.kernels.backends import have_flex, on_gpu
from loom.kernels.dispatch import announce
from loom.kernels.swa.banded import banded_swa
from loom.kernels.swa.reference import swa_reference

__all__ = ["sliding_window_attention", "select_swa_impl", "swa_reference", "banded_swa"]
IMPLS = ("auto", "banded", "flash", "flex", "reference", "sdpa")


def select_swa_impl(q: torch.Tensor, S: int, seq_ids, return_lse: bool) -> str:
    if select_impl(q, return_lse) == "flash" and (seq_ids is None or q.shape[1] == S):
        return "flash"
    if on_gpu(q) and have_flex():  # no flash-attn, or documents under a cache (T != S)
        return "flex"
    return "banded"


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int,
                             seq_ids: torch.Tensor | None = None, scale: float | None = None, impl: str = "auto",
                             return_lse: bool = False, cp=None):
    """Causal attention over the query itself and the `window` tokens before it.

    Args:
        q: (B, T, H, K) queries, the last T of the S positions (prefill, decoding).
        k, v: (B, S, G, K) keys and values, S >= T, H % G == 0.
        window: int >= 0; key j is visible to query i when 0 <= i - j <= window.
        seq_ids: (B, S) int64 document ids, or None; attention never crosses documents.
        scale: softmax scale, default K ** -0.5.
        impl: "auto", "banded", "flash", "flex" or "reference" (alias "sdpa"), module docstring.
        return_lse: also return the log-sum-exp of each query's scores.
        cp: None, or a CPContext: q, k, v, seq_ids are this rank's (B, L, ...) shard (S == T).

    Returns:
        o (B, T, H, K) [, lse (B, T, H), fp32 (fp64 for fp64 inputs)].
    """
    check_shapes("sliding_window_attention", q, k, v, seq_ids)
    T, S = q.shape[1], k.shape[1]
    if not isinstance(window, int) or window < 0:
        raise ValueError(f"window must be an int >= 0; got {window!r}")
    if impl not in IMPLS:
        raise ValueError(f"unknown sliding-window impl {impl!r}; choose one of {IMPLS}")
    if cp is not None:
        if return_lse:
            raise ValueError("sliding_window_attention: return_lse is not available under context parallelism")
        return attention(q, k, v, seq_ids=seq_ids, window=window, scale=scale, cp=cp)
    seq_ids = multi_document(seq_ids)
    if impl == "auto":
        impl = select_swa_impl(q, S, seq_ids, return_lse)
    announce("sliding-window attention", impl)
    if impl == "banded":
        o, lse = banded_swa(q, k, v, window=window, seq_ids=seq_ids, scale=scale)
        return (o, lse) if return_lse else o
    if impl == "flex":
        return attention(q, k, v, seq_ids=seq_ids, window=window, scale=scale, impl="flex", return_lse=return_lse)
    if impl == "flash":
        if seq_ids is not None and T != S:
            raise ValueError("impl='flash' cannot mask documents when T != S; use impl='banded'")
        return attention(q, k, v, seq_ids=seq_ids, window=window, scale=scale, impl="flash",
                         return_lse=return_lse)
    return swa_reference(q, k, v, window=window, seq_ids=seq_ids, scale=scale, return_lse=return_lse)
