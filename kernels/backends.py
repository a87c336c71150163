"""Which GPU backends this process can run: the readable rule behind every op's `impl="auto"`.

On a CUDA tensor, the ops pick (kernels/<op>/__init__.py):
    attention, swa    flash-attn when installed and the pattern fits it, else FlexAttention
    s2                FlexAttention with the per-head BlockMask (s2/flex.py)
    rat               Triton scan (rat/triton.py) + FlexAttention over chunk states (rat/flex.py)
    memory            the chunked block with the chunk update in Triton (memory/triton.py)
    linear            fla-core's chunk_simple_gla (linear/fla.py), when the `gpu` extra is installed
    ssd               fla-core's chunk_simple_gla with a per-token decay g = dt A (ssd/fla.py), likewise
On CPU every op keeps its PyTorch path. Each backend can be forced with `impl=` (tests); a
forced backend that cannot run raises, naming what is missing (no silent fallback).
"""
from __future__ import annotations

import functools
import importlib.util

import torch

__all__ = ["have_triton", "have_fla", "have_flex", "on_gpu", "require"]


@functools.lru_cache(maxsize=None)
def have_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=None)
def have_fla() -> bool:
    return importlib.util.find_spec("fla") is not None


@functools.lru_cache(maxsize=None)
def have_flex() -> bool:
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def on_gpu(x: torch.Tensor) -> bool:
    """The GPU rule shared by every op: the tensor lives on CUDA."""
    return x.is_cuda


def require(available: bool, op: str, impl: str, what: str) -> None:
    """RuntimeError when a forced backend cannot run here."""
    if not available:
        raise RuntimeError(f"{op}: impl={impl!r} requested but {what}")
