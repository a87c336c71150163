"""Process groups and the per-run distributed environment.

`setup(parallel_cfg)` reads torchrun/deepspeed/SLURM variables, initialises
torch.distributed when more than one process runs (NCCL on CUDA, gloo on
CPU), and returns an `Env` describing this rank's place in the
(data-parallel x context-parallel) mesh. With one process every collective
below is the identity, so the loop has a single code path.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist

from loom.models.config import ConfigError


def _rank() -> int:
    return tdist.get_rank() if tdist.is_available() and tdist.is_initialized() else 0


def log(msg: str) -> None:
    if _rank() == 0:
        print(msg, flush=True)


def warn(msg: str) -> None:
    if _rank() == 0:
        print(msg, file=sys.stderr, flush=True)


@dataclass
class Env:
    rank: int = 0
    world: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    cp_rank: int = 0
    cp_size: int = 1
    cp: Any = None  # loom.kernels.context_parallel.CPContext when cp_size > 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def check_model(self, model, cfg) -> None:
        """Fail early when a layer cannot run under the chosen context parallelism."""
        if self.cp_size > 1:
            from loom.trainer.parallel_check import check_cp_support

            check_cp_support(model, cfg)

    def shard_batch(self, batch: dict) -> dict:
        """This rank's part of a batch, on this rank's device: under cp, the zigzag
        shard of every (B, T) field (labels are already next-token targets)."""
        if self.device.type != "cpu":
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        if self.cp is None:
            return batch
        from loom.kernels.context_parallel import shard_sequence

        return {k: (shard_sequence(v, self.cp, dim=1) if k != "source" else v) for k, v in batch.items()}

    def reduce_loss(self, model, hidden: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
        """Mean token loss of the global micro-batch (all ranks' rows, whole windows).

        Each rank holds some rows (dp) and a slice of their tokens (cp): the sum is
        local, the token count global (one all-reduce of a scalar), times the world
        size, so that the gradients AVERAGED over the dp x cp ranks (what every
        engine's all-reduce does) equal the single-process gradients even when
        ranks hold different numbers of labelled tokens, and the logged mean over
        ranks is the single-process loss (trainer/distributed/mesh.py has the algebra).
        """
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


_ENV = Env()


def setup(parallel) -> Env:
    global _ENV
    from loom.trainer.distributed.mesh import launched_world_size

    world = launched_world_size()  # torchrun / deepspeed / accelerate, or SLURM's srun
    if world == 1:
        if parallel.cp > 1:
            raise ConfigError(f"parallel.cp={parallel.cp} needs {parallel.cp} processes per data-parallel group; "
                              "launch with torchrun --nproc_per_node N")
        _ENV = Env()
        return _ENV
    from loom.trainer.distributed import init_process_groups

    _ENV = init_process_groups(parallel)
    return _ENV


def teardown() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()


def broadcast_object(obj: Any) -> Any:
    if _ENV.world == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def gather_object(obj: Any) -> Any:
    """Every rank's object as a list on all ranks (RNG states are per rank)."""
    if _ENV.world == 1:
        return obj
    out = [None] * _ENV.world
    tdist.all_gather_object(out, obj)
    return out


def save_checkpoint(ckpt, step: int, tensors: dict, state: dict, meta: dict) -> None:
    if _ENV.is_main:
        ckpt.save(step, tensors, state, meta)
    if _ENV.world > 1:
        tdist.barrier()


def load_checkpoint(ckpt, path):
    """Rank 0 reads and verifies; the others receive the objects."""
    if _ENV.world == 1:
        return ckpt.load(path)
    from loom.trainer.checkpoint import CheckpointManager

    reader = ckpt or CheckpointManager(Path(path).parent.parent)
    return reader.load(path)

