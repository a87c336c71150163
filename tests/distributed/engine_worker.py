"""Worker for tests/distributed/test_engines.py: a few optimiser steps of a tiny
HybridLM on fixed packed batches through one engine, the way trainer/train.py
drives engines (shard_batch, accumulating, reduce_loss, backward, step).

    python engine_worker.py OUT single                          # the reference (1 process)
    torchrun --nproc_per_node 2 engine_worker.py OUT ddp
    torchrun --nproc_per_node 2 engine_worker.py OUT deepspeed parallel.zero=3
    torchrun --nproc_per_node 2 engine_worker.py OUT single parallel.cp=2
    torchrun --nproc_per_node 2 engine_worker.py OUT ddp --nan-step=1       # step 2 skipped

Every run consumes the same global batch per step (GLOBAL_ROWS windows, split
over the dp ranks and, under cp, over the sequence), so losses, gradients and
parameters must equal the single-process run. Before the last step the engine's
checkpoint is saved, a detour step on other data is taken, and the checkpoint
is loaded back, so every engine's save and load are part of the parity. Rank 0
writes OUT (torch.save): losses and grad norms per step, the full gradients of
step 1, the final full weights and the engine's checkpoint state.
"""
from __future__ import annotations

import copy
import math
import sys

import torch

from loom.models import HybridLM
from loom.trainer.config import RunConfig, apply_overrides, config_from_dict, validate
from loom.trainer.data import seq_ids_from_position_ids
from loom.trainer.distributed.mesh import setup_env
from loom.trainer.distributed.parallel_check import check_cp_support
from loom.trainer.distributed.parallelize import parallelize

GLOBAL_ROWS, T, VOCAB, STEPS, ACCUM = 4, 32, 64, 3, 2
DOC_LENGTHS = [[5, 17, 1, 9], [32], [12, 20], [3, 3, 26]]  # documents cross the zigzag chunk borders


def tiny_config(overrides: list[str]) -> RunConfig:
    """grad_clip 0.3 is below every step's gradient norm (about 0.5), so clipping is part of the parity."""
    base = {"model": {"d_model": 32, "n_heads": 4, "n_kv_heads": 2, "layers": ["attn", "x2"], "vocab_size": VOCAB},
            "data": {"seq_len": T}, "optim": {"lr": 1e-2, "warmup_steps": 1, "grad_clip": 0.3, "eps": 1e-4},
            "train": {"steps": STEPS, "batch_size": GLOBAL_ROWS, "grad_accum": ACCUM}}
    cfg = config_from_dict(apply_overrides(base, overrides))
    validate(cfg)
    return cfg


def global_batch(step: int, micro: int) -> dict[str, torch.Tensor]:
    """The GLOBAL_ROWS x T batch of one micro-step (identical on every rank)."""
    g = torch.Generator().manual_seed(1000 * step + micro)
    ids = torch.randint(0, VOCAB, (GLOBAL_ROWS, T + 1), generator=g)
    pos = torch.cat([torch.cat([torch.arange(n) for n in row]).view(1, T) for row in DOC_LENGTHS])
    labels = ids[:, 1:].clone()
    labels[:, :-1][pos[:, 1:] == 0] = -100  # as the packer does: rows hold different numbers of targets
    batch = {"input_ids": ids[:, :-1], "labels": labels, "position_ids": pos}
    batch["seq_ids"] = seq_ids_from_position_ids(pos)
    return batch


def main(out: str, engine_name: str, overrides: list[str]) -> None:
    """overrides: recipe keys, plus `--nan-step=S` to make step S's loss NaN (the
    loop then calls engine.skip_step(), as trainer/train.py does)."""
    torch.set_num_threads(1)
    nan_step = next((int(a.split("=")[1]) for a in overrides if a.startswith("--nan-step=")), None)
    overrides = [a for a in overrides if not a.startswith("--nan-step=")]
    cfg = tiny_config([f"parallel.engine={engine_name}", *overrides])
    env = setup_env(cfg.parallel)
    rows = GLOBAL_ROWS // env.dp_size
    torch.manual_seed(0)
    model = HybridLM(cfg.model)
    check_cp_support(model, cfg)
    engine = parallelize(model, cfg, env)
    def train_step(seed: int, poison: bool = False) -> float:
        losses = []
        for micro in range(ACCUM):
            full = global_batch(seed, micro)
            batch = env.shard_batch({k: v[env.dp_rank * rows:(env.dp_rank + 1) * rows] for k, v in full.items()})
            with engine.accumulating(micro == ACCUM - 1):
                out_ = engine.module(batch["input_ids"], position_ids=batch["position_ids"],
                                     seq_ids=batch["seq_ids"], cp=env.cp)
                loss = env.reduce_loss(model, out_.hidden, batch["labels"], chunk=16)
                if poison:
                    loss = loss * float("nan")
                engine.backward(loss / ACCUM)
            losses.append(loss.detach())
        return env.mean(torch.stack(losses).mean())

    result = {"losses": [], "grad_norms": [], "lrs": []}
    for step in range(STEPS):
        if step == STEPS - 1:
            # checkpoint round trip through a detour: save, take a step on other data, load.
            # Exercises checkpoint_state and load_checkpoint_state of every engine: a piece of
            # state the load misses keeps the detour's value and the last step differs.
            saved = copy.deepcopy(engine.checkpoint_state())  # a copy, as a file would be: CPU weights alias
            tensors, state = env.broadcast_object(saved)  # every rank gets rank 0's, as each reads the file
            train_step(seed=999)
            engine.step()
            engine.load_checkpoint_state(tensors, state)
        result["losses"].append(train_step(step, poison=step == nan_step))
        if step == 0:
            result["grads"] = engine.grads()
        result["lrs"].append(engine.lr)
        if math.isfinite(result["losses"][-1]):
            result["grad_norms"].append(engine.step())
        else:
            engine.skip_step()
            result["grad_norms"].append(float("nan"))
    tensors, state = engine.checkpoint_state()
    if env.is_main:
        result.update(params=tensors, state=state, world=env.world)
        torch.save(result, out)
    env.teardown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
