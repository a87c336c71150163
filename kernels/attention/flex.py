"""FlexAttention backend of the attention family: one fused kernel per mask, only the needed blocks.

Legend: B batch, T queries, S keys (queries are the last T), H query heads, G key/value heads,
K head dim.

PyTorch's FlexAttention compiles a `mask_mod(b, h, q_idx, kv_idx) -> bool` together with a
BlockMask (which 128 x 128 tiles hold any visible pair) into one Triton kernel, forward and
backward, with the log-sum-exp. Here it runs:
    - document-masked causal attention and sliding windows when flash-attn is absent
      (`flex_attention_masked`, this file);
    - S2-Attention's per-head pattern (kernels/s2/flex.py);
    - RAT's attention over chunk states plus the running state (kernels/rat/flex.py).

Where it runs (the rule `_use_compiled`):
    CUDA      compiled forward and backward (the GPU path; selected by impl="auto").
    CPU       compiled forward for inference without lse (PyTorch compiles only that on CPU);
              otherwise the eager FlexAttention, which evaluates the same mask_mod densely
              (exact, O(T * S) memory: the test oracle for gradients, not a fast path).

Block masks are built once per batch layout: `cached_block_mask` keys them on the mask kind,
its static numbers and the layout tensors (compared by value), so the layers of one step,
which share one layout, build it once.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import torch

__all__ = ["flex_available", "flex_attend", "cached_block_mask", "flex_attention_masked", "clear_block_masks"]

_CACHE_SIZE = 8
_block_masks: list[tuple[tuple, tuple[torch.Tensor, ...], object]] = []


@functools.lru_cache(maxsize=None)
def flex_available() -> bool:
    """True when this PyTorch has FlexAttention (2.5+)."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _flex_fn(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


def _use_compiled(q: torch.Tensor, tensors, return_lse: bool) -> bool:
    if q.is_cuda:
        return True
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return not needs_grad and not return_lse


def clear_block_masks() -> None:
    """Forget the cached block masks (tests)."""
    _block_masks.clear()


def cached_block_mask(kind: tuple, layout: tuple[torch.Tensor, ...], build: Callable[[], object]):
    """The BlockMask of `kind` (hashable: mask name and its static numbers and shapes) for the
    layout tensors `layout`, built by `build()` on the first call with equal values."""
    for key, tensors, mask in _block_masks:
        if key == kind and all(a.shape == b.shape and a.device == b.device and torch.equal(a, b)
                               for a, b in zip(tensors, layout)):
            return mask
    mask = build()
    _block_masks.insert(0, (kind, tuple(t.clone() for t in layout), mask))
    del _block_masks[_CACHE_SIZE:]
    return mask


def create_block_mask(mask_mod, B, H, T, S, device):
    from torch.nn.attention.flex_attention import create_block_mask as _create

    return _create(mask_mod, B, H, T, S, device=device)


def flex_attend(q_BHTK, k_BGSK, v_BGSK, block_mask, scale: float, return_lse: bool = False):
    """FlexAttention on head-major tensors; returns o (B, H, T, K) [, lse (B, H, T) fp32].
    Compiled or eager by `_use_compiled`."""
    compiled = _use_compiled(q_BHTK, (q_BHTK, k_BGSK, v_BGSK), return_lse)
    G, H = k_BGSK.shape[1], q_BHTK.shape[1]
    out = _flex_fn(compiled)(q_BHTK, k_BGSK, v_BGSK, block_mask=block_mask, scale=scale,
                             enable_gqa=G != H, return_lse=return_lse)
    if return_lse:
        o, lse = out
        return o, lse.float()
    return out


def flex_attention_masked(q, k, v, *, seq_ids=None, window=None, scale=None, return_lse=False):
    """Causal attention with documents and an optional window, as loom.kernels.attention's
    reference: q (B, T, H, K), k, v (B, S, G, K), seq_ids (B, S) or None.
    Returns o (B, T, H, K) [, lse (B, T, H) fp32]."""
    B, T, H, K = q.shape
    S = k.shape[1]
    scale = scale if scale is not None else 1.0 / math.sqrt(K)
    off = S - T  # query i sits at key position off + i

    def build():
        def mask_mod(b, h, qi, ki):
            qp = qi + off
            keep = ki <= qp
            if window is not None:
                keep = keep & (qp - ki <= window)
            if seq_ids is not None:
                keep = keep & (seq_ids[b, qp] == seq_ids[b, ki])
            return keep

        return create_block_mask(mask_mod, B if seq_ids is not None else 1, 1, T, S, q.device)

    layout = () if seq_ids is None else (seq_ids,)
    bm = cached_block_mask(("attention", B, T, S, window, seq_ids is None), layout, build)
    out = flex_attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), bm, scale, return_lse)
    if return_lse:
        o, lse = out
        return o.transpose(1, 2), lse.transpose(1, 2)
    return out.transpose(1, 2)
