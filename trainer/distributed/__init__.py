"""Multi-process training: process groups, the dp x cp mesh, and the engines.

Entry points (the rest of the trainer imports only these two):
    init_process_groups(parallel_cfg) -> Env     called by loom.trainer.dist.setup when WORLD_SIZE > 1
    build_engine(name, model, optim_cfg, total_steps, env, cfg)
                                                 called by loom.trainer.engine.build_engine

The order in which a built HybridLM becomes a distributed one:
    1. process groups and the (dp x cp) mesh (mesh.py); Env.cp is the CPContext
       of this rank's cp group, or None;
    2. the model is moved to Env.device;
    3. the engine wraps it (ddp.py: DistributedDataParallel; fsdp.py: FSDP2
       fully_shard per block, then the root; deepspeed_engine.py: ZeRO 0-3);
    4. the optimiser (loom.trainer.optim AdamW) and Loom's own LambdaLR schedule are
       built on the wrapped parameters, so every engine does the same maths.

Gradients are averaged over ALL ranks (dp x cp): parameters are replicated over
the cp ranks too, and Env.reduce_loss scales each cp rank's partial loss so
that this average equals the single-process gradient (see mesh.py).

Files: mesh.py (launchers, groups, Env), ddp.py, fsdp.py, deepspeed_engine.py,
precision.py (parallel.dtype), resume.py (checkpoints across world sizes: RNG,
data position). Optimizer state in checkpoints: trainer/optim_state.py.
"""
from __future__ import annotations

from loom.trainer.distributed.mesh import init_process_groups

__all__ = ["init_process_groups", "build_engine", "ENGINES"]

ENGINES = ("ddp", "fsdp", "deepspeed")


def build_engine(name: str, model, optim_cfg, total_steps: int, env=None, cfg=None):
    """The engine named by `parallel.engine` (ddp | fsdp | deepspeed) around `model`.

    env: the loom.trainer.dist.Env of this process; cfg: the RunConfig (the
    DeepSpeed engine reads train.batch_size / grad_accum and parallel.*).
    With one process, ddp is the single engine (identical maths); fsdp and
    deepspeed start a one-rank process group so that offload and mixed
    precision behave as with many ranks.
    """
    from loom.trainer.dist import Env

    env = env or Env()
    if name == "ddp":
        if env.world == 1:
            from loom.trainer.engine import SingleEngine

            return SingleEngine(model, optim_cfg, total_steps)
        from loom.trainer.distributed.ddp import DDPEngine

        return DDPEngine(model, optim_cfg, total_steps, env)
    if name == "fsdp":
        from loom.trainer.distributed.fsdp import FSDPEngine

        return FSDPEngine(model, optim_cfg, total_steps, env, cfg)
    if name == "deepspeed":
        from loom.trainer.distributed.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(model, optim_cfg, total_steps, env, cfg)
    from loom.models.config import ConfigError, nearest

    raise ConfigError(f"parallel.engine: unknown engine {name!r}{nearest(name, ('single',) + ENGINES)}")
