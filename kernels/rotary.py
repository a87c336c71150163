"""Rotary position embedding, the rotate-half convention (as Llama / Qwen in
transformers): the one rotation that models/rope.py and the RAT forms apply.

Legend: B batch, T tokens, H heads, K head dim (even).

    rotate(x, cos, sin) = x * cos + rotate_half(x) * sin,  rotate_half([x1, x2]) = [-x2, x1]

with cos, sin the tables at each token's position (models/rope.py `Rotary`;
RAT evaluates them at the chunk index).
"""
from __future__ import annotations

import torch

__all__ = ["rotate_half", "rotate", "rotate_heads"]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(..., K) -> (..., K): the halves [x1, x2] of the last dim become [-x2, x1]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., K) rotated by cos, sin broadcastable to it (computed in their promoted dtype).

    Example: rotate(x_HK, cos_K, sin_K) for one token's heads."""
    return x * cos + rotate_half(x) * sin


def rotate_heads(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, K) rotated by cos, sin (B, T, K) shared by the heads, in x's dtype."""
    return rotate(x, cos[:, :, None, :].to(x.dtype), sin[:, :, None, :].to(x.dtype))
