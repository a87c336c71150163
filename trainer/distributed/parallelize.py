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
from loom.trainer.distributed import dist
from loom.trainer.distributed.dist import Env
from loom.trainer.distributed.engine import SingleEngine
from loom.trainer.distributed.tiling import apply_tile_blocks, apply_tile_mlp

ENGINES = ("single", "ddp", "fsdp", "deepspeed")
CHECKPOINTING = ("none", "full", "selective")


def parallelize(model, cfg, env: Env):
    """Apply activation checkpointing, compile and the engine to `model` (a HybridLM
    on the CPU, unwrapped) as `cfg` (a RunConfig) says; returns the engine."""
    apply_activation_checkpointing(model, cfg.train.activation_checkpointing)
    apply_tile_mlp(model, cfg.train.tile_mlp)
    apply_tile_blocks(model, cfg.train.tile_blocks)
    compile_blocks = cfg.train.compile if cfg.train.compile is not None else env.device.type == "cuda"
    if compile_blocks:
        apply_compile(model)
    dist.log(f"activation checkpointing: {cfg.train.activation_checkpointing}; "
             + (f"tile_mlp: {cfg.train.tile_mlp} tokens; " if cfg.train.tile_mlp else "")
             + (f"tile_blocks: {cfg.train.tile_blocks} tokens; " if cfg.train.tile_blocks else "") + "compile: "
             f"{'on' if compile_blocks else 'off'}" + ("" if cfg.train.compile is not None else
                                                        f" (auto on {env.device.type})"))
    return build_engine(cfg.parallel.engine, model, cfg.optim, cfg.train.steps, env=env, cfg=cfg)


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


def build_engine(name: str, model, optim_cfg, total_steps: int, env: Env | None = None, cfg=None):
    """The engine named by `parallel.engine` around `model`.

    env: this process's Env (default: one process); cfg: the RunConfig (the
    DeepSpeed and FSDP engines read batch sizes and parallel.*). `single` on
    several processes (e.g. `torchrun ... parallel.cp=4` with the default
    engine) runs as ddp: replicas must average their gradients to stay one
    model. ddp on one process is the single engine (identical maths); fsdp and
    deepspeed start a one-rank process group so that offload and mixed
    precision behave as with many ranks.
    """
    env = env or Env()
    if name not in ENGINES:
        raise ConfigError(f"parallel.engine: unknown engine {name!r}{nearest(name, ENGINES)}")
    if name == "single" and env.world > 1:
        dist.log(f"parallel.engine=single on {env.world} processes: using ddp")
        name = "ddp"
    if name in ("single", "ddp") and env.world == 1:
        return SingleEngine(model, optim_cfg, total_steps)
    if name == "ddp":
        from loom.trainer.distributed.ddp import DDPEngine

        return DDPEngine(model, optim_cfg, total_steps, env)
    if name == "fsdp":
        from loom.trainer.distributed.fsdp import FSDPEngine

        return FSDPEngine(model, optim_cfg, total_steps, env, cfg)
    from loom.trainer.distributed.deepspeed_engine import DeepSpeedEngine

    return DeepSpeedEngine(model, optim_cfg, total_steps, env, cfg)
