"""Attention's forms by name, on validated single-device inputs: what the public
dispatcher (__init__.py) and the context-parallel forms (ulysses.py, halo.py,
cp.py) run.

Legend: B batch, T queries, S keys (S >= T), H query heads, G key/value heads, K head dim.

"auto" picks flash-attn on CUDA when it is installed and the dtype is fp16/bf16
and no lse is requested, else on CUDA "flex" (flex.py); off CUDA "tiled"
(tiled.py) when seq_ids holds several packed documents, else "sdpa" (reference.py,
PyTorch SDPA with the reference mask); "reference" runs reference.py as written.
"""
from __future__ import annotations

import functools
import importlib.util

import torch

from loom.kernels.attention.reference import attention_reference
from loom.kernels.attention.tiled import is_packed, tiled_attention
from loom.kernels.backends import have_flex, on_gpu
from loom.kernels.dispatch import announce

__all__ = ["run_attention", "select_impl", "multi_document", "have_flash_attn"]


@functools.lru_cache(maxsize=None)
def have_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def select_impl(q: torch.Tensor, return_lse: bool) -> str:
    """The backend "auto" means for q (before the CPU packed-document rule)."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and not return_lse and have_flash_attn():
        return "flash"
    if on_gpu(q) and have_flex():  # documents and windows in one fused kernel (attention/flex.py)
        return "flex"
    return "sdpa"


def multi_document(seq_ids: torch.Tensor | None) -> torch.Tensor | None:
    """seq_ids, or None when every row holds one document (no mask is needed then,
    and the fused causal kernels apply)."""
    if seq_ids is None or bool((seq_ids == seq_ids[:, -1:]).all()):
        return None
    return seq_ids


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


def run_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, seq_ids: torch.Tensor | None = None,
                  window: int | None = None, scale: float | None = None, impl: str = "auto",
                  return_lse: bool = False):
    """The backend `impl` on q (B, T, H, K), k, v (B, S, G, K), seq_ids (B, S) or None;
    shapes already checked. Returns o (B, T, H, K) [, lse (B, T, H) fp32]."""
    seq_ids = multi_document(seq_ids)
    if impl == "auto":
        impl = select_impl(q, return_lse)
        if impl == "sdpa" and seq_ids is not None and not q.is_cuda and is_packed(seq_ids):
            impl = "tiled"
    announce("attention", impl)
    if impl == "flash":
        if return_lse:
            raise ValueError("impl='flash' does not return lse here; use impl='sdpa'")
        if not have_flash_attn():
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
