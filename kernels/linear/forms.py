"""Linear attention's forms by name, on validated inputs: what the public
dispatcher (__init__.py) and the context-parallel form (cp.py) run.

Legend: B batch, T tokens, H heads, K key dim, V value dim.

    "chunked"   chunked.py: block-tiled matmuls, a loop over T / block blocks for the state
    "fla"       fla.py: fla-core's chunk_simple_gla (the `gpu` extra)
    "reference" reference.py: the token loop (tests)
"""
from __future__ import annotations

import torch

from loom.kernels.linear.chunked import linear_attention_chunked
from loom.kernels.linear.reference import linear_attention_reference

__all__ = ["run_linear", "FORMS"]
FORMS = ("chunked", "fla", "reference")


def run_linear(impl: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor, *,
               block: int = 64, reset: torch.Tensor | None = None, initial_state: torch.Tensor | None = None,
               return_state: bool = False, scale: float = 1.0):
    """The form `impl` (one of FORMS) on q, k (B, T, H, K), v (B, T, H, V), decay (H,), reset (B, T).
    Returns (o (B, T, H, V), final state (B, H, K, V) or None)."""
    if impl == "fla":
        from loom.kernels.linear.fla import linear_attention_fla
        return linear_attention_fla(q, k, v, decay, reset=reset, initial_state=initial_state,
                                    return_state=return_state, scale=scale)
    if impl == "chunked":
        return linear_attention_chunked(q, k, v, decay, block=block, reset=reset, initial_state=initial_state,
                                        return_state=return_state, scale=scale)
    return linear_attention_reference(q, k, v, decay, reset=reset, initial_state=initial_state, scale=scale)
