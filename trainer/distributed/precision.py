"""Which dtype the distributed engines compute in (`parallel.dtype`)."""
from __future__ import annotations

import torch

from loom.models.config import ConfigError


def use_bf16(parallel, device: torch.device) -> bool:
    """bf16 compute with fp32 master weights: `auto` on CUDA or `bf16`; fp32 otherwise.

    `bf16` on a CPU-only run is a ConfigError: gloo reductions and the CPU paths
    of the engines are tested in fp32 only.
    """
    if parallel.dtype == "bf16" and device.type != "cuda":
        raise ConfigError("parallel.dtype=bf16 needs CUDA; CPU runs train in fp32 (use parallel.dtype=auto)")
    return parallel.dtype == "bf16" or (parallel.dtype == "auto" and device.type == "cuda")
