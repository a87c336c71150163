"""Batcher: deterministic, exactly resumable batches for one data-parallel rank.

Shapes: B = batch_size (rows per rank), T = seq_len, R = dp_size.

The only state is `position`, the number of *global* windows consumed (all
ranks together). Step by step, rank r reads windows

    position + r*B + b        for b in 0..B-1

and then every rank advances position by R*B. Ranks of one step therefore read
disjoint windows, consecutive steps never overlap, and a checkpoint needs just
this one integer; because it counts windows rather than steps it stays valid
if the run resumes with another dp_size or batch_size. Context-parallel ranks
of one dp group use the same dp_rank and so get the same batch, which the
trainer then splits along T.

Example:
    >>> batcher = Batcher(dataset, batch_size=8, dp_rank=rank, dp_size=world)
    >>> batch = batcher.next()              # dict of (8, T) tensors
    >>> state = batcher.state_dict()        # {"position": 8 * world}
"""
from __future__ import annotations

import torch

from loom.trainer.data.packing import seq_ids_from_position_ids


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack dataset items into a batch and add seq_ids.

    Returns input_ids, labels, position_ids, seq_ids (B, T) int64,
    answer_mask (B, T) bool and source (B,) int64.
    """
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    batch["seq_ids"] = seq_ids_from_position_ids(batch["position_ids"])
    return batch


class Batcher:
    """Iterates batches of `dataset` for rank dp_rank of dp_size, from window `start`."""

    def __init__(self, dataset, batch_size: int, dp_rank: int = 0, dp_size: int = 1, start: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, dp_size={dp_size}), got {dp_rank}")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.position = start

    @property
    def global_batch_size(self) -> int:
        """Windows consumed per step by all ranks together."""
        return self.batch_size * self.dp_size

    def window_indices(self) -> list[int]:
        """Global window indices of this rank's next batch."""
        first = self.position + self.dp_rank * self.batch_size
        return list(range(first, first + self.batch_size))

    def next(self) -> dict[str, torch.Tensor]:
        batch = collate([self.dataset[i] for i in self.window_indices()])
        self.position += self.global_batch_size
        return batch

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return self.next()

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        position = int(state["position"])
        if position < 0:
            raise ValueError(f"data position must be >= 0, got {position}")
        self.position = position
