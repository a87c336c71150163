"""Resuming a checkpoint on a different number of ranks.

What carries over unchanged, from any engine on N ranks to any engine on M:
- weights: model.safetensors is always the full, unsharded state dict (rank 0
  gathers FSDP shards and ZeRO partitions before writing), so `loom eval` and
  any world size read it;
- optimizer: the full AdamW state keyed by parameter name (trainer/checkpoint/optim_state.py);
  each engine re-shards it on load;
- schedule: LambdaLR's step counter.

The data position (Batcher) is the number of global windows consumed. Each
optimiser step consumes `global batch = dp * train.batch_size * train.grad_accum`
windows, in order. Rule: keep the global batch when dp changes (e.g. 2 ranks x
batch_size 4 -> 1 rank x batch_size 8, or raise grad_accum) and every step
reads exactly the windows the uninterrupted run would have read. A different
global batch still continues from the saved position without skipping or
repeating a window, but groups them differently: `check_layout` warns.

RNG states are saved per rank. On the same world size each rank gets its own
back (an exact resume); on another world size there is no sensible mapping,
so every rank is reseeded from (seed, step, rank) and a line says so. Loom's
data order does not depend on these RNGs (windows are a function of their
index); they matter only for stochastic layers.
"""
from __future__ import annotations

import random

import numpy as np
import torch

from loom.trainer.distributed import dist
from loom.trainer.checkpoint.manager import set_rng_state


def run_layout(env, cfg) -> dict:
    """How this run is laid out; saved with every checkpoint."""
    return {"world": env.world, "dp": env.dp_size, "cp": env.cp_size, "engine": cfg.parallel.engine,
            "global_batch": env.dp_size * cfg.train.batch_size * cfg.train.grad_accum}


def check_layout(saved: dict | None, env, cfg) -> None:
    """Log a resume across layouts; warn when the global batch changes."""
    now = run_layout(env, cfg)
    if saved is None:
        return
    if (saved["world"], saved["dp"], saved["cp"], saved["engine"]) != (now["world"], now["dp"], now["cp"],
                                                                         now["engine"]):
        dist.log(f"resuming a checkpoint of {saved['world']} rank(s) (dp {saved['dp']} x cp {saved['cp']}, "
                 f"{saved['engine']}) on {now['world']} (dp {now['dp']} x cp {now['cp']}, {now['engine']})")
    if saved["global_batch"] != now["global_batch"]:
        dist.warn(f"warning: the global batch changes from {saved['global_batch']} to {now['global_batch']} "
                  "windows per step (dp x train.batch_size x train.grad_accum); data continues from the saved "
                  "position without repeats, but steps no longer see the windows of the original run")


def reseed(seed: int, step: int, rank: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) from (seed, step, rank)."""
    value = int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)  # also seeds every CUDA device


def restore_rng(saved, env, seed: int, step: int) -> None:
    """This rank's saved RNG state, or a reseed when the world size changed.

    saved: one state (a 1-process run) or the list of every rank's state.
    """
    states = saved if isinstance(saved, list) else [saved]
    if len(states) == env.world:
        set_rng_state(states[env.rank])
        return
    dist.log(f"RNG states were saved by {len(states)} rank(s) and cannot map onto {env.world}: "
             f"reseeding every rank from (seed={seed}, step={step}, rank)")
    reseed(seed, step, env.rank)
