"""Which dtype the model computes in (`parallel.dtype`): bf16 autocast with fp32 master weights.

    auto  bf16 on CUDA, fp32 on CPU
    bf16  bf16 everywhere it can run: CUDA with any engine; CPU with the single/ddp engines
          (an option: torch.autocast on CPU; the fsdp and deepspeed CPU paths are fp32 only)
    fp32  fp32

The parameters and the optimizer state stay fp32 (the master weights); under autocast the
matmuls of the forward run in bf16, the loss, norms and softmax statistics in fp32, and every
sequence-mixing op upcasts to fp32 inside (accumulation and recurrent states; tests/kernels/
test_bf16.py). FSDP casts its sharded parameters to bf16 itself (MixedPrecisionPolicy);
DeepSpeed runs its bf16 mode; the single/ddp engines use `forward_autocast` in the loop.
"""
from __future__ import annotations

import contextlib

import torch

from loom.models.config import ConfigError


def use_bf16(parallel, device: torch.device) -> bool:
    """True when this run computes in bf16 (see the module docstring).

    `bf16` on CPU with fsdp or deepspeed is a ConfigError: gloo reductions and the CPU paths
    of those engines are tested in fp32 only.
    """
    engine = getattr(parallel, "engine", "single")
    if parallel.dtype == "bf16" and device.type != "cuda" and engine in ("fsdp", "deepspeed"):
        raise ConfigError(f"parallel.dtype=bf16 needs CUDA with parallel.engine={engine}; CPU runs of this "
                          "engine train in fp32 (use parallel.dtype=auto, or the single engine for CPU bf16)")
    return parallel.dtype == "bf16" or (parallel.dtype == "auto" and device.type == "cuda")


def forward_autocast(parallel, device: torch.device):
    """The context for the forward pass and the loss: bf16 autocast when `use_bf16`, else nothing."""
    if use_bf16(parallel, device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
