"""S2-Attention's forms by name, on validated inputs: what the public dispatcher
(__init__.py) and the context-parallel form (cp.py) run.

Legend: B batch, T queries, S keys, H query heads, G key/value heads, P pattern heads, K head dim.

    "blocksparse"  blocksparse.py: only the visible blocks, in PyTorch (the CPU path)
    "flex"         flex.py: FlexAttention with the per-head BlockMask (CUDA)
    "reference"    reference.py: the dense mask (tests)
"""
from __future__ import annotations

import torch

from loom.kernels.s2.blocksparse import s2_blocksparse
from loom.kernels.s2.reference import s2_attention_reference

__all__ = ["run_s2", "FORMS"]
FORMS = ("blocksparse", "flex", "reference")


def run_s2(impl: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block: int, local_blocks: int,
           vert_stride: int, head_offsets: torch.Tensor, seq_ids=None, position_ids=None, scale=None,
           return_lse: bool = False):
    """The form `impl` (one of FORMS) on q (B, T, H, K), k, v (B, S, G, K), head_offsets (P,),
    seq_ids (B, S) or None (None: one document per row), position_ids (B, S) or None.
    Returns o (B, T, H, K) [, lse (B, T, H)]."""
    kw = dict(block=block, local_blocks=local_blocks, vert_stride=vert_stride, head_offsets=head_offsets,
              seq_ids=seq_ids, position_ids=position_ids, scale=scale)
    if impl == "blocksparse":
        o, lse = s2_blocksparse(q, k, v, **kw)
        return (o, lse) if return_lse else o
    if impl == "flex":
        from loom.kernels.s2.flex import s2_flex
        return s2_flex(q, k, v, return_lse=return_lse, **kw)
    return s2_attention_reference(q, k, v, return_lse=return_lse, **kw)
