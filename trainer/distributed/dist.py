"""This process's place in a run: ranks, the (dp x cp) mesh, rank-0 logging.

A leaf module (it imports only torch): every other trainer module may import
it, it imports none of them. `Env` describes one process and is passed
explicitly to whatever needs it; there is no module-level state. It is built
by `loom.trainer.distributed.mesh.setup_env` (process groups, mesh) or as `Env()`
for a single process, where every collective below is the identity, so the
training loop has one code path.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist


def _rank() -> int:
    return tdist.get_rank() if tdist.is_available() and tdist.is_initialized() else 0


def log(msg: str) -> None:
    """Print on global rank 0 only."""
    if _rank() == 0:
        print(msg, flush=True)


def warn(msg: str) -> None:
    """Print to stderr on global rank 0 only."""
    if _rank() == 0:
        print(msg, file=sys.stderr, flush=True)


@dataclass
class Env:
    """One process of a run. Ranks are global (rank, world), in the data-parallel
    group (dp_rank, dp_size) and in the context-parallel group (cp_rank, cp_size);
    `cp` is this rank's kernels.context_parallel.CPContext when cp_size > 1, the
    handle every sequence-mixing op takes as its `cp` argument."""

    rank: int = 0
    world: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    cp_rank: int = 0
    cp_size: int = 1
    cp: Any = None
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard_batch(self, batch: dict) -> dict:
        """This rank's part of a batch, on this rank's device: under cp, the zigzag
        shard of every (B, T) field (labels are already next-token targets)."""
        if self.device.type != "cpu":
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        if self.cp is None:
            return batch
        return {k: (self.cp.shard(v, dim=1) if k != "source" else v) for k, v in batch.items()}

    def count_labels(self, labels: list[torch.Tensor]) -> torch.Tensor:
        """Labelled tokens (labels != -100) of a whole step: these micro-batches' labels on every
        rank (one all-reduce of a scalar; cp ranks hold slices, so they add up to whole windows)."""
        count = sum((lab != -100).sum() for lab in labels).to(torch.float32).to(self.device)
        if self.world > 1:
            count = count.clone()
            tdist.all_reduce(count)
        return count

    def reduce_loss(self, model, hidden: torch.Tensor, labels: torch.Tensor, chunk: int,
                    count: torch.Tensor | None = None) -> torch.Tensor:
        """Mean token loss of the global micro-batch (all ranks' rows, whole windows).

        Each rank holds some rows (dp) and a slice of their tokens (cp): the sum is
        local, the token count global (one all-reduce of a scalar), times the world
        size, so that the gradients AVERAGED over the dp x cp ranks (what every
        engine's all-reduce does) equal the single-process gradients even when
        ranks hold different numbers of labelled tokens, and the logged mean over
        ranks is the single-process loss (trainer/distributed/mesh.py has the algebra).
        count: the labelled tokens of the whole step (count_labels over its grad_accum
        micro-batches); the result is then this micro-batch's loss sum / count (times
        the world size), so that the step's summed micro-batch losses are the mean over
        every labelled token of the global batch, whatever grad_accum and dp are.
        """
        if count is not None:   # this micro-batch's share of the whole step's mean (count_labels)
            return model.loss(hidden, labels, chunk=chunk, reduction="sum") / count.clamp_min(1) * self.world
        if self.world == 1:
            return model.loss(hidden, labels, chunk=chunk)
        total = model.loss(hidden, labels, chunk=chunk, reduction="sum")
        count = (labels != -100).sum().float()
        tdist.all_reduce(count)
        return total / count.clamp_min(1) * self.world

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is True on at least one (e.g. a SIGTERM
        that reached some ranks a step earlier than others)."""
        if self.world == 1:
            return flag
        v = torch.tensor([float(flag)], device=self.device)
        tdist.all_reduce(v, op=tdist.ReduceOp.MAX)
        return bool(v.item())

    def mean(self, value: torch.Tensor) -> float:
        """Average of a scalar over all ranks (for logging)."""
        if self.world == 1:
            return float(value)
        v = value.detach().float().clone().to(self.device)
        tdist.all_reduce(v)
        return float(v) / self.world

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_object(self, obj: Any) -> Any:
        """Every rank's object as a list on all ranks (e.g. RNG states, which are per rank)."""
        if self.world == 1:
            return obj
        out = [None] * self.world
        tdist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            tdist.barrier()

    def teardown(self) -> None:
        """Leave the process groups (a no-op for one process)."""
        if tdist.is_available() and tdist.is_initialized():
            tdist.barrier()
            tdist.destroy_process_group()
