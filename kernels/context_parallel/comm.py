"""Analytic communication volume of the context-parallel attention paths
(kernels/attention/ring.py, ulysses.py, halo.py), from their shapes alone.

Legend: B batch, T full length, L = T / cp, H query heads, G key/value heads,
K head dim, e bytes per element of q/k/v, a = max(e, 4) bytes of an fp32
accumulator (fp64 inputs accumulate in fp64), 8 bytes per int64 document id.

Bytes one rank SENDS (each scheme is symmetric, so it also receives as much;
for the halo, the busiest rank) in one forward and one backward of one layer:

ring (cp - 1 K/V hops forward; backward re-sends K/V and passes the dK/dV
accumulators cp hops, the last one bringing them home):
    forward  = (cp - 1) * (2 B L G K e  + 8 B L [docs])
    backward = (cp - 1) * (2 B L G K e  + 8 B L [docs]) + cp * 2 B L G K a
ulysses (each all-to-all keeps 1/cp of its input local; G' = G if G % cp == 0
else cp, the replicated K/V heads):
    forward  = (cp - 1) / cp * B L K e * (2 H + 2 G')  + (cp - 1) * 8 B L [docs, all-gather]
    backward = (cp - 1) / cp * B L K e * (2 H + 2 G')
halo (sliding window W, pieces from `halo_plan`; about W keys per chunk):
    forward  = sum over sent pieces of len * (2 B G K e + 8 B [docs])
    backward = sum over sent pieces of len * 2 B G K e

So ring / ulysses forward = G * cp / (H + G'): with MHA (H = G) ring moves cp / 2
times more than ulysses; with GQA H = 4 G at cp = 4 ring moves 0.8 times as much.
Per rank, ring's volume grows like (cp - 1) / cp * 2 B T G K e and never depends on
H; ulysses' like (cp - 1) / cp^2 * 2 B T (H + G') K e, shrinking with cp. Ring hides
its hops behind block compute; ulysses' all-to-alls are not overlapped here.
"""
from __future__ import annotations

from typing import NamedTuple

from loom.kernels.context_parallel.halo import halo_plan

__all__ = ["CommBytes", "comm_bytes"]


class CommBytes(NamedTuple):
    forward: int
    backward: int


def comm_bytes(path: str, *, batch: int, seq_len: int, n_heads: int, n_kv_heads: int, head_dim: int, cp: int,
               elem_bytes: int = 2, docs: bool = True, window: int | None = None,
               layout: str = "zigzag") -> CommBytes:
    """Bytes one rank sends per forward and per backward of one attention layer.

    path: "ring", "ulysses" or "halo" (halo needs `window`); docs: document ids
    are passed (seq_ids is not None). elem_bytes: 2 for bf16/fp16, 4 fp32, 8 fp64.
    Example: comm_bytes("ring", batch=1, seq_len=32768, n_heads=32, n_kv_heads=8,
    head_dim=128, cp=4).forward
    """
    B, T, H, G, K, e = batch, seq_len, n_heads, n_kv_heads, head_dim, elem_bytes
    L, a = T // cp, max(elem_bytes, 4)
    ids = 8 * B * L if docs else 0
    if cp == 1:
        return CommBytes(0, 0)
    if path == "ring":
        hop = 2 * B * L * G * K * e + ids
        return CommBytes((cp - 1) * hop, (cp - 1) * hop + cp * 2 * B * L * G * K * a)
    if path == "ulysses":
        Gr = G if G % cp == 0 else cp
        moved = (cp - 1) * B * L * K * e * (2 * H + 2 * Gr) // cp
        return CommBytes(moved + (cp - 1) * ids, moved)
    if path == "halo":
        if window is None:
            raise ValueError("comm_bytes('halo') needs window")
        plan = halo_plan(T, cp, layout, window)
        sent = [sum(p.src_hi - p.src_lo for p in plan if p.src == r and p.dst != r) for r in range(cp)]
        n = max(sent)
        return CommBytes(n * (2 * B * G * K * e + (8 * B if docs else 0)), n * 2 * B * G * K * e)
    raise ValueError(f"comm_bytes: unknown path {path!r}; choose ring, ulysses or halo")
