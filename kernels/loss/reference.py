"""Cross-entropy of a linear head in plain PyTorch: the specification.

Legend: N tokens, D hidden size, V vocabulary.

    logits = h @ w.T                      (N, V), in fp32
    loss_i = logsumexp(logits_i) - logits_i[y_i]   for y_i != ignore_index
    "sum": sum_i loss_i;  "mean": sum_i loss_i / #{i : y_i != ignore_index}

All N x V logits exist at once (forward and backward): this is the baseline
the fused path is tested and timed against, not a path for long sequences.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_cross_entropy_reference(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, *,
                                   ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """h (N, D), w (V, D), y (N,) int64 -> scalar fp32 loss."""
    acc = torch.promote_types(h.dtype, torch.float32)
    total = F.cross_entropy(F.linear(h, w).to(acc), y, ignore_index=ignore_index, reduction="sum")
    if reduction == "sum":
        return total
    return total / (y != ignore_index).sum().clamp_min(1)
