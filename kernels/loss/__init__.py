"""Cross-entropy of the LM head, never holding all logits at once.

linear_cross_entropy(h, w, y, *, ignore_index=-100, reduction="mean", chunk=1024, impl="auto")
    h: (N, D) final hidden states (flatten (B, T, D) first); w: (V, D) head weight;
    y: (N,) int64 targets, `ignore_index` where no loss is taken.
    reduction: "mean" (over labelled tokens; 0 if none) or "sum".
    chunk: tokens whose logits exist at a time (fused path).
    Returns a scalar loss (fp32; fp64 for fp64 inputs).

impl:
    "fused"     fused.py: per chunk, loss and gradients of h and w in one pass
                (three head matmuls in all, as full cross-entropy; c x V logits).
    "liger"     Liger-Kernel's fused linear cross-entropy (Triton, CUDA; the
                `gpu` extra installs it).
    "reference" reference.py: F.cross_entropy on all N x V logits (tests, timing).
    "auto"      "liger" when h is on CUDA and liger-kernel is installed, else "fused".

The loss is token-local: under context parallelism each rank takes the "sum"
of its own tokens and the trainer all-reduces the count (loom.trainer.dist), so
this op has no cp argument.

Example:
    >>> loss = linear_cross_entropy(hidden.flatten(0, 1), model.head_weight, labels.flatten())
"""
from __future__ import annotations

import functools
import importlib.util

import torch

from loom.kernels.dispatch import announce
from loom.kernels.loss.fused import CHUNK, fused_linear_cross_entropy
from loom.kernels.loss.reference import linear_cross_entropy_reference

__all__ = ["linear_cross_entropy", "fused_linear_cross_entropy", "linear_cross_entropy_reference", "select_loss_impl"]
IMPLS = ("auto", "fused", "liger", "reference")


@functools.lru_cache(maxsize=None)
def _have_liger() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def select_loss_impl(h: torch.Tensor) -> str:
    return "liger" if h.is_cuda and _have_liger() else "fused"


def _liger(h, w, y, ignore_index, reduction):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(ignore_index=ignore_index, reduction=reduction)(w, h, y).float()


def linear_cross_entropy(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, *, ignore_index: int = -100,
                         reduction: str = "mean", chunk: int = CHUNK, impl: str = "auto") -> torch.Tensor:
    """Cross-entropy of logits h @ w.T against y, without holding all N x V logits.

    Args:
        h: (N, D) final hidden states (flatten (B, T, D) first).
        w: (V, D) head weight.
        y: (N,) int64 targets, `ignore_index` where no loss is taken.
        ignore_index: the target value that takes no loss.
        reduction: "mean" (over labelled tokens; 0 if none) or "sum".
        chunk: tokens whose logits exist at a time (fused path).
        impl: "auto", "fused", "liger" or "reference" (module docstring).

    Returns:
        a scalar loss (fp32; fp64 for fp64 inputs).
    """
    if h.dim() != 2 or w.dim() != 2 or y.shape != h.shape[:1] or h.shape[1] != w.shape[1]:
        raise ValueError(f"linear_cross_entropy expects h (N, D), w (V, D), y (N,); got {tuple(h.shape)}, "
                         f"{tuple(w.shape)}, {tuple(y.shape)}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum'; got {reduction!r}")
    if impl not in IMPLS:
        raise ValueError(f"unknown cross-entropy impl {impl!r}; choose one of {IMPLS}")
    if impl == "auto":
        impl = select_loss_impl(h)
    announce("cross-entropy", impl)
    if impl == "liger":
        if not (h.is_cuda and _have_liger()):
            raise RuntimeError("impl='liger' needs CUDA tensors and liger-kernel (pip install loom-lm[gpu])")
        return _liger(h, w, y, ignore_index, reduction)
    if impl == "reference":
        return linear_cross_entropy_reference(h, w, y, ignore_index=ignore_index, reduction=reduction)
    return fused_linear_cross_entropy(h, w, y, ignore_index=ignore_index, reduction=reduction, chunk=chunk)
