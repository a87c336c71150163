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
              otherwise the same mask_mod evaluated densely (torch's create_mask) under a
              plain softmax with autograd (`_dense_eager`: exact, O(T * S) memory; the
              oracle for gradients and lse in the tests, not a fast path).

Every mask_mod clamps the indices it looks up in its layout tensors: the compiled kernels also
evaluate it on the padding past T and S (reading out of bounds otherwise: wrong rows were seen
on CPU), while the comparisons use the raw indices, so padding stays invisible.

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
# The compiled kernels read head dims below 16 out of bounds on CPU (wrong rows, seen at K = 8
# with torch 2.13) and tl.dot needs 16 on GPU: smaller heads are zero-padded to it.
MIN_HEAD_DIM = 16
TILE = 128  # FlexAttention's default block size
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
def _flex_fn():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


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
    """torch's create_block_mask; on CPU over T and S rounded up to the 128-token tile, since the
    compiled CPU kernel gave wrong rows for lengths off the tile (torch 2.13): `flex_attend` pads
    the tensors to the mask's lengths. The mask_mods keep padding invisible (raw comparisons)."""
    from torch.nn.attention.flex_attention import create_block_mask as _create

    if torch.device(device).type == "cpu":
        T, S = -(-T // TILE) * TILE, -(-S // TILE) * TILE
    return _create(mask_mod, B, H, T, S, device=device)


def _dense_eager(q_BHTK, k_BGSK, v_BGSK, block_mask, scale: float):
    """The same mask_mod evaluated densely (torch's create_mask) and a plain softmax, with
    autograd: what runs on CPU when gradients or the lse are needed (FlexAttention has no CPU
    backward). Returns o (B, H, T, K), lse (B, H, T) fp32."""
    from torch.nn.attention.flex_attention import create_mask

    B, H, T, K = q_BHTK.shape
    G, S = k_BGSK.shape[1], k_BGSK.shape[2]
    mask = create_mask(block_mask.mask_mod, B, H, T, S, device=q_BHTK.device)  # (B, H, T, S)
    cd = torch.promote_types(q_BHTK.dtype, torch.float32)
    k = k_BGSK.to(cd).repeat_interleave(H // G, dim=1)
    v = v_BGSK.to(cd).repeat_interleave(H // G, dim=1)
    s = (q_BHTK.to(cd) @ k.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    o = torch.exp(s - lse[..., None]) @ v
    return o.to(q_BHTK.dtype), lse.float()


def flex_attend(q_BHTK, k_BGSK, v_BGSK, block_mask, scale: float, return_lse: bool = False):
    """FlexAttention on head-major tensors; returns o (B, H, T, K) [, lse (B, H, T) fp32].
    CUDA and CPU inference: the compiled kernel; CPU with gradients or lse: `_dense_eager`."""
    if not _use_compiled(q_BHTK, (q_BHTK, k_BGSK, v_BGSK), return_lse):
        o, lse = _dense_eager(q_BHTK, k_BGSK, v_BGSK, block_mask, scale)
        return (o, lse) if return_lse else o
    G, H, T, K = k_BGSK.shape[1], q_BHTK.shape[1], q_BHTK.shape[2], q_BHTK.shape[3]
    Tm, Sm = block_mask.seq_lengths  # >= T, S: tile-rounded on CPU (create_block_mask)
    S = k_BGSK.shape[2]
    # Zero head columns change no score (padded output columns are dropped); padded rows are
    # invisible by the mask and dropped.
    dk = max(MIN_HEAD_DIM - K, 0)
    pad = torch.nn.functional.pad
    q_BHTK = pad(q_BHTK, (0, dk, 0, Tm - T)) if dk or Tm > T else q_BHTK
    if dk or Sm > S:
        k_BGSK, v_BGSK = pad(k_BGSK, (0, dk, 0, Sm - S)), pad(v_BGSK, (0, dk, 0, Sm - S))
    out = _flex_fn()(q_BHTK, k_BGSK, v_BGSK, block_mask=block_mask, scale=scale,
                     enable_gqa=G != H, return_lse=return_lse)
    o, lse = out if return_lse else (out, None)
    o = o[:, :, :T, :K]
    return (o, lse[:, :, :T].float()) if return_lse else o


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
            if seq_ids is not None:  # lookups clamped: the kernel also visits padded indices
                keep = keep & (seq_ids[b, qp.clamp(max=S - 1)] == seq_ids[b, ki.clamp(max=S - 1)])
            return keep

        return create_block_mask(mask_mod, B if seq_ids is not None else 1, 1, T, S, q.device)

    layout = () if seq_ids is None else (seq_ids,)
    bm = cached_block_mask(("attention", B, T, S, window, seq_ids is None), layout, build)
    out = flex_attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), bm, scale, return_lse)
    if return_lse:
        o, lse = out
        return o.transpose(1, 2), lse.transpose(1, 2)
    return out.transpose(1, 2)
