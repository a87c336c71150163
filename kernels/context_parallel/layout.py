"""Sequence layouts for context parallelism: the CPContext handle and the
split / gather helpers (see kernels/context_parallel/__init__.py for the layouts).

Legend: T full sequence length, L = T / cp tokens per rank, C chunk length.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["CPContext", "check_seq_len", "chunk_ranges", "chunk_owner", "global_pieces", "shard_positions",
           "shard_sequence", "gather_sequence", "true_order", "rank_order", "one_document_or_ids"]

IMPLS = ("ring", "ulysses")
LAYOUTS = ("zigzag", "contiguous")


@dataclass(frozen=True)
class CPContext:
    """Context-parallel handle: one per cp group, passed explicitly to ops.

    group: the cp process group (None = the default WORLD group).
    rank, world_size: this process's rank inside `group` and the group size (= cp).
    impl: "ring" or "ulysses", the algorithm for full (non-windowed) attention.
    layout: "zigzag" or "contiguous", how the sequence is dealt to ranks (module docstring).
    """

    group: Any
    rank: int
    world_size: int
    impl: str = "ring"
    layout: str = "zigzag"

    def __post_init__(self):
        if self.impl not in IMPLS:
            raise ValueError(f"CPContext.impl must be one of {IMPLS}; got {self.impl!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"CPContext.layout must be one of {LAYOUTS}; got {self.layout!r}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"CPContext.rank {self.rank} outside [0, world_size={self.world_size})")

    @classmethod
    def from_group(cls, group=None, impl: str = "ring", layout: str = "zigzag") -> "CPContext":
        """Build the handle from an initialised process group (None = WORLD)."""
        return cls(group, dist.get_rank(group), dist.get_world_size(group), impl, layout)

    def global_rank(self, group_rank: int) -> int:
        """Rank in the default group of `group_rank` in the cp group (P2P peers are global)."""
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's shard of a full tensor along `dim` (shard_sequence)."""
        return shard_sequence(x, self, dim)

    @property
    def n_chunks(self) -> int:
        """How many chunks the full sequence is cut into."""
        return 2 * self.world_size if self.layout == "zigzag" else self.world_size


def check_seq_len(T: int, cp: CPContext) -> None:
    """Raise a ValueError unless a sequence of T tokens can be sharded by `cp`."""
    if T % cp.n_chunks:
        rule = f"2*cp = {cp.n_chunks}" if cp.layout == "zigzag" else f"cp = {cp.world_size}"
        raise ValueError(f"sequence length T={T} is not divisible by {rule} ({cp.layout} layout, "
                         f"cp={cp.world_size}); pick data.seq_len as a multiple of {cp.n_chunks}")


def chunk_ranges(T: int, world_size: int, rank: int, layout: str) -> list[tuple[int, int]]:
    """Global [start, end) position ranges held by `rank`, in shard order."""
    if layout == "contiguous":
        L = T // world_size
        return [(rank * L, (rank + 1) * L)]
    C = T // (2 * world_size)
    return [(rank * C, (rank + 1) * C), ((2 * world_size - 1 - rank) * C, (2 * world_size - rank) * C)]


def chunk_owner(c: int, world_size: int, layout: str) -> tuple[int, int]:
    """(rank, local chunk index) holding global chunk c."""
    if layout == "contiguous" or c < world_size:
        return c, 0
    return 2 * world_size - 1 - c, 1


def global_pieces(T: int, cp: CPContext, rank: int | None = None) -> list[int]:
    """Global (position-order) indices of the chunks `rank` (default: this rank) holds, in shard order."""
    C = T // cp.n_chunks
    return [a // C for a, _ in chunk_ranges(T, cp.world_size, cp.rank if rank is None else rank, cp.layout)]


def _positions(T: int, cp: CPContext, rank: int, device=None) -> torch.Tensor:
    return torch.cat([torch.arange(a, b, device=device) for a, b in chunk_ranges(T, cp.world_size, rank, cp.layout)])


def shard_positions(T: int, cp: CPContext, device=None) -> torch.Tensor:
    """(L,) int64 global positions of the tokens this rank holds, in shard order."""
    check_seq_len(T, cp)
    return _positions(T, cp, cp.rank, device)


def shard_sequence(x: torch.Tensor, cp: CPContext, dim: int = 1) -> torch.Tensor:
    """This rank's shard of a full tensor: (.., T, ..) -> (.., T / cp, ..) along `dim`.

    Used for q/k/v in tests and for input_ids, labels, position_ids and seq_ids
    in the trainer (shift labels to next-token targets BEFORE sharding: under
    zigzag a chunk's next token usually lives on another rank). Differentiable.
    """
    T = x.shape[dim]
    check_seq_len(T, cp)
    if cp.layout == "contiguous":
        L = T // cp.world_size
        return x.narrow(dim, cp.rank * L, L)
    return x.index_select(dim, shard_positions(T, cp, x.device))


def rank_order(T: int, cp: CPContext, device=None) -> torch.Tensor | None:
    """(T,) global position of each row of the rank-order concatenation of all
    shards (what an all-gather yields); None for the contiguous layout, where
    that concatenation is already in position order."""
    if cp.layout == "contiguous":
        return None
    return torch.cat([_positions(T, cp, r, device) for r in range(cp.world_size)])


def true_order(T: int, cp: CPContext, device=None) -> torch.Tensor | None:
    """Inverse permutation of `rank_order`: index_select with it puts a rank-order
    concatenation into position order (None for the contiguous layout)."""
    order = rank_order(T, cp, device)
    return None if order is None else torch.argsort(order)


def gather_sequence(x: torch.Tensor, cp: CPContext, dim: int = 1) -> torch.Tensor:
    """All ranks' shards reassembled into the full tensor in true position order.

    x: this rank's shard (.., L, ..) along `dim`; returns (.., L * cp, ..).
    A collective (every rank of cp.group must call it); not differentiable.
    """
    if cp.world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(cp.world_size)]
    dist.all_gather(parts, x.contiguous(), group=cp.group)
    full = torch.cat(parts, dim=dim)
    order = true_order(full.shape[dim], cp, x.device)
    return full if order is None else full.index_select(dim, order)


def one_document_or_ids(seq_ids: torch.Tensor) -> torch.Tensor | None:
    """None when every row of seq_ids (B, S) is a single document, else seq_ids.

    Passing None to `loom.kernels.attention.attention` skips the (B, 1, T, S) document
    mask, so the unmasked causal SDPA (flash) path is used.
    """
    return None if bool((seq_ids == seq_ids[:, :1]).all()) else seq_ids
