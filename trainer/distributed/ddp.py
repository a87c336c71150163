"""`ddp`: torch DistributedDataParallel over all dp x cp ranks.

Every rank holds the whole model and the whole AdamW state; gradients are
averaged over the world group (the cp ranks included, see mesh.py) in buckets
during backward. Non-final micro-batches of a step run under `no_sync`, so one
all-reduce per optimiser step. Clipping, the optimiser and the schedule are the
single engine's: after the all-reduce every rank holds the same gradient, so the
local norm is the global one and the update is the single-process update.
Checkpoints are the single engine's too (rank 0's full weights and name-keyed
optimizer state; every rank holds them).
"""
from __future__ import annotations

import contextlib

from torch.nn.parallel import DistributedDataParallel

from loom.trainer.distributed.engine import SingleEngine


class DDPEngine(SingleEngine):
    name = "ddp"

    def __init__(self, model, optim_cfg, total_steps: int, env):
        model.to(env.device)
        super().__init__(model, optim_cfg, total_steps)
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        # static_graph=False, find_unused_parameters=False: every parameter gets a gradient every step.
        self.module = DistributedDataParallel(model, device_ids=device_ids)

    def accumulating(self, last_micro_batch: bool):
        return contextlib.nullcontext() if last_micro_batch else self.module.no_sync()
