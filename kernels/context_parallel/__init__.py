"""Context parallelism's building blocks: the sequence of every example is
sharded across the ranks of a cp process group. This package knows no op; each
op owns its sharded algorithm next to its other forms and builds it from these
blocks (kernels/attention/cp.py with ring.py, ulysses.py, halo.py;
kernels/rat/cp.py, kernels/linear/cp.py, kernels/memory/cp.py, kernels/s2/cp.py),
reached through the op's own `cp=` argument.

Legend: B batch, T full sequence length, L = T / cp tokens held by one rank,
H query heads, G key/value heads (H % G == 0), K head dim, C chunk length.

Layouts (how the T positions of a row are dealt to cp ranks):
    contiguous: rank r holds positions [r*L, (r+1)*L). Needs T % cp == 0.
    zigzag:     the row is cut into 2*cp chunks of C = T / (2*cp); rank r holds
                chunk r followed by chunk 2*cp-1-r. Under a causal mask every
                rank then owns the same amount of work. Needs T % (2*cp) == 0.
A rank's shard is always its chunks concatenated in increasing position order.

The blocks:
    layout.py      CPContext (the handle that reaches a mixer as `ctx.cp`), shard_sequence,
                   gather_sequence, shard_positions, check_seq_len, chunk_ranges, chunk_owner,
                   global_pieces: which positions a rank holds, and moving between views
    p2p.py         exchange / wait: tagged non-blocking sends and receives between ranks
    gather.py      all_gather: differentiable (its backward reduce-scatters), depend_on
    all_to_all.py  seq_to_head / head_to_seq: the Ulysses trade of sequence for heads
    halo.py        halo_extend, sequence_halo: each local chunk with the tokens before it
    chain.py       StateChain, carry: a recurrence's state handed rank to rank in sequence order
    comm.py        CommBytes, comm_bytes: analytic bytes per rank of the attention paths

Example (inside an initialised process group):
    cp = CPContext.from_group(group, impl="ring", layout="zigzag")
    q_loc = shard_sequence(q, cp)                       # (B, T, H, K) -> (B, L, H, K)
    o_loc = attention(q_loc, k_loc, v_loc, seq_ids=shard_sequence(seq_ids, cp), cp=cp)
"""
from __future__ import annotations

from loom.kernels.context_parallel.chain import Piece, StateChain, carry, state_hops
from loom.kernels.context_parallel.comm import CommBytes, comm_bytes
from loom.kernels.context_parallel.gather import all_gather, all_gather_nograd, depend_on
from loom.kernels.context_parallel.halo import halo_extend, sequence_halo
from loom.kernels.context_parallel.layout import (CPContext, check_seq_len, chunk_owner, chunk_ranges,
                                                  gather_sequence, global_pieces, shard_positions, shard_sequence)

__all__ = ["CPContext", "shard_sequence", "gather_sequence", "shard_positions", "chunk_ranges", "chunk_owner",
           "global_pieces", "check_seq_len", "halo_extend", "sequence_halo", "comm_bytes", "CommBytes",
           "all_gather", "all_gather_nograd", "depend_on", "StateChain", "Piece", "carry", "state_hops"]
