"""Per-document chunk layout: rows cut into chunks on a grid that restarts at
every document start, each chunk placed left-aligned in a block of C slots.

Legend: B batch, T tokens, N blocks per row, C slots per block (C <= size).

Token t of row b belongs to chunk `block[b, t]`, at slot `slot[b, t]`. A chunk
is the next `size` tokens of a document; a reset starts a new chunk; a row
that continues a chunk from an earlier call (offset o > 0) first fills the
remaining size - o tokens. Masked-out tokens take no place at all (they are
skipped, not counted) and come back as zeros. Rows with fewer chunks than N
have empty tail blocks (length 0).

The memory op and the MAC mixer (whose segments follow the same grid) use it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DocChunks:
    index: torch.Tensor        # (B, T) int64 slot of each token in the flat (B, N * C) layout; N * C if masked
    length: torch.Tensor       # (B, N) real tokens per block
    block_reset: torch.Tensor  # (B, N) bool, the block starts with a document reset
    end_offset: torch.Tensor   # (B,) tokens of the row's last chunk consumed after this call
    n_blocks: int              # N
    width: int                 # C
    trivial: bool              # every token kept and index[b, t] == t: the layout is a reshape

    def to_blocks(self, x: torch.Tensor, pad: float = 0.0) -> torch.Tensor:
        """(B, T, ...) -> (B, N, C, ...), empty slots filled with `pad`."""
        B, T = x.shape[:2]
        NC = self.n_blocks * self.width
        if self.trivial:
            flat = torch.nn.functional.pad(x.movedim(1, -1), (0, NC - T), value=pad).movedim(-1, 1)
        else:
            # src[b, s]: the token in slot s, or T (an appended pad row); masked tokens go to slot NC.
            src = torch.full((B, NC + 1), T, dtype=torch.long, device=x.device)
            src.scatter_(1, self.index, torch.arange(T, device=x.device).expand(B, T))
            src = src[:, :NC].reshape(B, NC, *([1] * (x.dim() - 2))).expand(B, NC, *x.shape[2:])
            flat = torch.cat([x, x.new_full((B, 1, *x.shape[2:]), pad)], dim=1).gather(1, src)
        return flat.reshape(B, self.n_blocks, self.width, *x.shape[2:])

    def from_blocks(self, y: torch.Tensor, T: int) -> torch.Tensor:
        """(B, N, C, ...) -> (B, T, ...), zeros for masked tokens."""
        B = y.shape[0]
        flat = y.reshape(B, self.n_blocks * self.width, *y.shape[3:])
        if self.trivial:
            return flat[:, :T]
        flat = torch.cat([flat, flat.new_zeros(B, 1, *flat.shape[2:])], dim=1)
        idx = self.index.reshape(B, T, *([1] * (flat.dim() - 2))).expand(B, T, *flat.shape[2:])
        return flat.gather(1, idx)


def doc_chunks(reset: torch.Tensor | None, offset: torch.Tensor, T: int, size: int,
               mask: torch.Tensor | None = None) -> DocChunks:
    """Lay out B rows of T tokens. reset, mask: (B, T) bool or None; offset: (B,) int64 in [0, size)."""
    B = offset.shape[0]
    dev = offset.device
    t = torch.arange(T, device=dev).expand(B, T)
    keep = torch.ones(B, T, dtype=torch.bool, device=dev) if mask is None else mask
    reset = torch.zeros(B, T, dtype=torch.bool, device=dev) if reset is None else reset & keep
    kt = keep.long().cumsum(dim=1) - 1                     # index among kept tokens
    last_reset = torch.where(reset, kt, -1).cummax(dim=1).values
    grid = torch.where(last_reset >= 0, kt - last_reset, offset[:, None] + kt)  # position on the chunk grid
    start = keep & ((grid % size == 0) | (kt == 0))
    block = start.long().cumsum(dim=1) - 1
    slot = kt - torch.where(start, kt, -1).cummax(dim=1).values
    n_blocks = max(int(block[:, -1].max()) + 1, 1)
    length = torch.zeros(B, n_blocks, dtype=torch.long, device=dev)
    length.scatter_add_(1, block.clamp_min(0), keep.long())
    width = max(int(length.max()), 1)
    block_reset = torch.zeros(B, n_blocks, dtype=torch.bool, device=dev)
    rows, cols = torch.nonzero(start, as_tuple=True)
    block_reset[rows, block[rows, cols]] = reset[rows, cols]
    index = torch.where(keep, block * width + slot, n_blocks * width)
    last_kept = torch.where(keep, t, -1).max(dim=1).values  # (B,), -1 if the row keeps nothing
    end_grid = grid.gather(1, last_kept.clamp_min(0)[:, None])[:, 0]
    end_offset = torch.where(last_kept >= 0, (end_grid + 1) % size, offset)
    trivial = mask is None and bool((index == t).all())
    return DocChunks(index, length, block_reset, end_offset, n_blocks, width, trivial)
