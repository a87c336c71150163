"""Multi-process training: process groups, the dp x cp mesh, and the engines.

Entry point for the rest of the trainer:
    setup_env(parallel_cfg) -> Env     process groups and this rank's place (mesh.py);
                                       Env() for a single process
The engines here (ddp.py: DistributedDataParallel; fsdp.py: FSDP2 fully_shard
per block, then the root; deepspeed_engine.py: ZeRO 0-3) are chosen by the one
`build_engine` in trainer/parallelize.py, which also applies activation
checkpointing and compile first. Each engine builds Loom's AdamW
(trainer.optim) and LambdaLR schedule on the wrapped parameters, so every
engine does the same maths.

Gradients are averaged over ALL ranks (dp x cp): parameters are replicated over
the cp ranks too, and Env.reduce_loss scales each cp rank's partial loss so
that this average equals the single-process gradient (see mesh.py).

Files: mesh.py (launchers, groups, Env), ddp.py, fsdp.py, deepspeed_engine.py,
precision.py (parallel.dtype), resume.py (checkpoints across world sizes: RNG,
data position). Optimizer state in checkpoints: trainer/optim_state.py.
"""
from __future__ import annotations

from loom.trainer.distributed.mesh import init_process_groups, setup_env

__all__ = ["init_process_groups", "setup_env"]
