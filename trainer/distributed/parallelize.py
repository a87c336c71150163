"""From a built single-device HybridLM to the engine the loop trains, in one place.

The model code never knows how it is run: everything below is applied to the
finished model from outside, in this order (torchtitan's `parallelize` is the
pattern):

    1. activation checkpointing, per block (`train.activation_checkpointing`):
         none       keep every activation;
         full       keep only each block's input, recompute the block in backward;
         selective  keep the mixer's activations and output, recompute the MLP
                    (the MLP's hidden activations, 3 x mlp_hidden per token, are
                    most of a block's memory at small d_model; the mixer is the
                    expensive part to recompute);
    1b. MLP tiling along the sequence (`train.tile_mlp: N` tokens, 0 = off) and
    1c. block tiling along the sequence (`train.tile_blocks: N` tokens, 0 = off):
         see distributed/tiling.py;
    2. torch.compile per block (`train.compile`: true | false | null = auto,
       which is on for CUDA and off on CPU, where compile does not pay for the
       mixers' chunked loops);
    3. the engine (`parallel.engine`): single, ddp (DistributedDataParallel),
       fsdp (FSDP2 fully_shard per block, then the root) or deepspeed (ZeRO
       0-3); each builds Loom's AdamW and schedule on the wrapped parameters.

Both 1 and 2 replace a block's (or its MLP's) `forward` on the instance, so
parameter names, state dicts and checkpoints are the same with and without
them. Context parallelism is not applied here: the cp handle travels with each
forward call (`model(..., cp=env.cp)`) to the kernels/ ops, which decide.
"""
from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

from loom.models.config import ConfigError, nearest
from loom.trainer.config import OptimConfig, ParallelConfig, TrainConfig
from loom.trainer.distributed import dist
from loom.trainer.distributed.dist import Env
from loom.trainer.distributed.engine import SingleEngine
from loom.trainer.distributed.tiling import apply_tile_blocks, apply_tile_mlp

ENGINES = ("single", "ddp", "fsdp", "deepspeed")
CHECKPOINTING = ("none", "full", "selective")


def parallelize(model, train: TrainConfig, parallel: ParallelConfig, optim: OptimConfig, env: Env):
    """Apply activation checkpointing, tiling, compile and the engine to `model` (a
    HybridLM on the CPU, unwrapped); returns the engine.

    train: train.* (activation_checkpointing, tile_mlp, tile_blocks, compile;
    steps, batch_size and grad_accum for the engine); parallel: parallel.*
    (the engine and its options); optim: optim.* (AdamW and its schedule).
    """
    apply_activation_checkpointing(model, train.activation_checkpointing)
    apply_tile_mlp(model, train.tile_mlp)
    apply_tile_blocks(model, train.tile_blocks)
    compile_blocks = train.compile if train.compile is not None else env.device.type == "cuda"
    if compile_blocks:
        apply_compile(model)
    dist.log(f"activation checkpointing: {train.activation_checkpointing}; "
             + (f"tile_mlp: {train.tile_mlp} tokens; " if train.tile_mlp else "")
             + (f"tile_blocks: {train.tile_blocks} tokens; " if train.tile_blocks else "") + "compile: "
             f"{'on' if compile_blocks else 'off'}" + ("" if train.compile is not None else
                                                        f" (auto on {env.device.type})"))
    return build_engine(model, parallel, optim, train.steps, env, batch_size=train.batch_size,
                        grad_accum=train.grad_accum)


def _recomputed(forward):
    """`forward`, recomputed in backward when it runs with gradients (training); plain
    otherwise (evaluation, decoding)."""

    @functools.wraps(forward)
    def run(*args, **kwargs):
        if torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    return run


def apply_activation_checkpointing(model, mode: str) -> None:
    """mode: none | full (whole blocks) | selective (the MLP of each block)."""
    if mode not in CHECKPOINTING:
        raise ConfigError(f"train.activation_checkpointing: unknown mode {mode!r}{nearest(mode, CHECKPOINTING)}")
    for block in model.blocks:
        if mode == "full":
            block.forward = _recomputed(block.forward)
        elif mode == "selective":
            block.mlp.forward = _recomputed(block.mlp.forward)


def apply_compile(model) -> None:
    """torch.compile each block in place (names and state dict unchanged)."""
    for block in model.blocks:
        block.compile()


def build_engine(model, parallel: ParallelConfig, optim: OptimConfig, total_steps: int, env: Env | None = None,
                 batch_size: int = 1, grad_accum: int = 1):
    """The engine named by `parallel.engine` around `model`.

    parallel: parallel.* (engine; the FSDP and DeepSpeed engines read their
    options); optim: optim.*; total_steps: train.steps (the lr schedule's
    length); env: this process's Env (default: one process); batch_size,
    grad_accum: train.batch_size and train.grad_accum (DeepSpeed's config).
    `single` on several processes (e.g. `torchrun ... parallel.cp=4` with the
    default engine) runs as ddp: replicas must average their gradients to stay
    one model. ddp on one process is the single engine (identical maths); fsdp
    and deepspeed start a one-rank process group so that offload and mixed
    precision behave as with many ranks.
    """
    env = env or Env()
    name = parallel.engine
    if name not in ENGINES:
        raise ConfigError(f"parallel.engine: unknown engine {name!r}{nearest(name, ENGINES)}")
    if name == "single" and env.world > 1:
        dist.log(f"parallel.engine=single on {env.world} processes: using ddp")
        name = "ddp"
    if name in ("single", "ddp") and env.world == 1:
        return SingleEngine(model, optim, total_steps)
    if name == "ddp":
        from loom.trainer.distributed.ddp import DDPEngine

        return DDPEngine(model, optim, total_steps, env)
    if name == "fsdp":
        from loom.trainer.distributed.fsdp import FSDPEngine

        return FSDPEngine(model, optim, total_steps, env, parallel)
    from loom.trainer.distributed.deepspeed_engine import DeepSpeedEngine

    return DeepSpeedEngine(model, optim, total_steps, env, parallel, batch_size, grad_accum)
