"""RAT's forms by name, on validated inputs: what the public dispatcher
(__init__.py) and the context-parallel form (cp.py) run.

Legend: B batch, T tokens, G q/k groups, H heads, K head dim.

    "chunked"  chunked.py in PyTorch (the CPU path)
    "triton"   chunked.py with step 1, the gated recurrence, as triton.py's kernel
    "flex"     chunked.py with step 3, attention over chunk states, through FlexAttention (flex.py)
    "gpu"      both (auto on CUDA)
    "reference" reference.py, the token loop (tests)
"""
from __future__ import annotations

import functools

import torch

from loom.kernels.rat.chunked import rat_chunked
from loom.kernels.rat.reference import rat_reference

__all__ = ["run_rat", "FORMS"]
FORMS = ("chunked", "gpu", "triton", "flex", "reference")


def run_rat(impl: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, f: torch.Tensor,
            position_ids: torch.Tensor, *, chunk: int, seq_ids=None, cos=None, sin=None, scale=None,
            initial_state=None, return_state: bool = False, return_stats: bool = False):
    """The form `impl` (one of FORMS) on q, k (B, T, G, K), v, f (B, T, H, K), position_ids (B, T).
    Returns (o (B, T, H, K), stats or None, state or None) as `loom.kernels.rat.rat` documents them."""
    args = dict(chunk=chunk, seq_ids=seq_ids, cos=cos, sin=sin, scale=scale, initial_state=initial_state)
    if impl == "reference":
        return rat_reference(q, k, v, f, position_ids, **args)
    scan = attend = None
    if impl in ("gpu", "triton"):
        from loom.kernels.rat.triton import TritonSegmentScan
        scan = TritonSegmentScan.apply
    if impl in ("gpu", "flex"):
        from loom.kernels.rat.flex import chunk_state_attention_flex
        attend = functools.partial(chunk_state_attention_flex, need_lse=return_stats)
    return rat_chunked(q, k, v, f, position_ids, return_state=return_state, return_stats=return_stats,
                       scan=scan, attend=attend, **args)
