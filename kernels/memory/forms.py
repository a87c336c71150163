"""The Titans memory's forms by name, on validated inputs: what the public
dispatcher (__init__.py) and the context-parallel form (cp.py) run.

Legend: B batch, T tokens, H heads, K head dim.

    "chunked"   chunked.py: the eager chunk-parallel form (the CPU path)
    "compiled"  the same code with each block through torch.compile (inductor)
    "triton"    chunked.py with triton.py's kernels for the chunk update (auto on CUDA): the
                gradient at the chunk start (depth 1 and 2; deeper memories keep its PyTorch
                form) and the fused chunk-end update
    "reference" reference.py's `neural_memory_reference`, the token-by-token definition (tests)
All compute in float32 at least: the decay products and the fast weights accumulate over
the whole sequence.
"""
from __future__ import annotations

import torch

from loom.kernels.memory.chunked import neural_memory_chunked
from loom.kernels.memory.common import MemoryState, Weights
from loom.kernels.memory.reference import neural_memory_reference

__all__ = ["run_memory", "FORMS"]
FORMS = ("chunked", "compiled", "triton", "reference")


def run_memory(impl: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, theta: torch.Tensor,
               eta: torch.Tensor, alpha: torch.Tensor, init_weights: Weights, *, chunk_size: int,
               state: MemoryState | None = None, reset: torch.Tensor | None = None,
               mask: torch.Tensor | None = None, activation: str = "gelu", retrieval: str = "chunk",
               norm_weight: torch.Tensor | None = None, momentum_step: str = "token"):
    """The form `impl` (one of FORMS) on q, k, v (B, T, H, K), theta, eta, alpha (B, T, H),
    init_weights [(H, D_in, D_out)], reset, mask (B, T) bool or None, norm_weight (H, K) or None.
    Returns (y (B, T, H, K) in q's dtype, final MemoryState in the compute dtype)."""
    dt = torch.promote_types(q.dtype, torch.float32)
    cast = lambda xs: tuple(x.to(dt) for x in xs)  # noqa: E731
    if state is not None:
        state = MemoryState(cast(state.weights), cast(state.momentum), cast(state.base), state.offset)
    opts = dict(chunk_size=chunk_size, state=state, reset=reset, mask=mask, activation=activation,
                retrieval=retrieval, norm_weight=None if norm_weight is None else norm_weight.to(dt),
                momentum_step=momentum_step)
    if impl == "reference":
        y, final = neural_memory_reference(*cast((q, k, v, theta, eta, alpha)), cast(init_weights), **opts)
    else:
        hooks = {}
        if impl == "triton":
            from loom.kernels.memory.triton import chunk_end_update, chunk_start_grad

            deep = len(init_weights) > 2  # the Triton chunk-start gradient covers depth 1 and 2
            hooks = dict(start_grad=None if deep else chunk_start_grad, end_update=chunk_end_update)
        y, final = neural_memory_chunked(*cast((q, k, v, theta, eta, alpha)), cast(init_weights),
                                         compiled=impl == "compiled", **hooks, **opts)
    return y.to(q.dtype), final
