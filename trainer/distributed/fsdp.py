"""`fsdp`: torch FSDP2 (`fully_shard`), parameters sharded over all dp x cp ranks.

Wrapping order: each block is its own FSDP unit (all-gathered just before it
runs, freed after, reduce-scattered in backward), then the root, which holds
the embedding (tied LM head) and the final norm. The root's parameters stay
unsharded from forward until its backward, so HybridLM.loss, which the loop
calls after the forward, can use the tied head weight directly.
Mixed precision (bf16 compute, fp32 gradient reduction and fp32 master
weights) applies on CUDA only; on CPU everything is fp32.

The optimiser is loom.trainer.optim's AdamW over the sharded (DTensor) parameters,
so each rank keeps 1/world of the AdamW state. Gradient norm and clipping are
computed over the full (sharded) gradient; the update equals the single
engine's. Checkpoints: full weights and the name-keyed optimizer state,
gathered to rank 0 with torch.distributed.checkpoint.state_dict (full_state_dict,
cpu_offload), loaded back on any number of ranks.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from loom.models.config import ConfigError
from loom.trainer.distributed import dist
from loom.trainer.distributed.mesh import ensure_process_group
from loom.trainer.distributed.precision import use_bf16
from loom.trainer.distributed.engine import SingleEngine
from loom.trainer.optim import build_optimizer, build_scheduler
from loom.trainer.checkpoint.optim_state import is_named

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


class FSDPEngine(SingleEngine):
    name = "fsdp"

    def __init__(self, model, optim_cfg, total_steps: int, env, cfg):
        ensure_process_group(env)
        parallel = cfg.parallel
        model.to(env.device)
        world = torch.distributed.get_world_size()
        mesh = init_device_mesh(env.device.type, (world,), mesh_dim_names=("shard",))
        mp = MixedPrecisionPolicy()
        if use_bf16(parallel, env.device):
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        offload = OffloadPolicy()
        if parallel.offload_params or parallel.offload_optimizer:
            if env.device.type != "cuda":
                dist.log("fsdp: parameters and optimizer are already on the CPU; offload options have no effect")
            else:
                offload = CPUOffloadPolicy()  # FSDP2 offloads parameters, gradients and the AdamW step together
        for block in model.blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp, offload_policy=offload)
        fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload)
        dist.log(f"fsdp: {len(model.blocks)} blocks and the root sharded over {world} rank(s), "
                 f"{'bf16 compute' if mp.param_dtype is not None else 'fp32'}")
        self.model = self.module = model
        self.optimizer = build_optimizer(model, optim_cfg)
        self.scheduler = build_scheduler(self.optimizer, optim_cfg, total_steps)
        self.grad_clip = optim_cfg.grad_clip

    def accumulating(self, last_micro_batch: bool):
        # Gradients of non-final micro-batches accumulate unsharded; the last one reduce-scatters the sum.
        self.model.set_requires_gradient_sync(last_micro_batch)
        return contextlib.nullcontext()

    def step(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip > 0 else math.inf
        norm = float(_full(torch.nn.utils.clip_grad_norm_(params, max_norm)))
        if not math.isfinite(norm):  # the global norm: every rank skips together
            self.skip_step()
            return norm
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def grads(self) -> dict[str, torch.Tensor]:
        """Full gradients by name (a collective: every rank must call it)."""
        return {n: _full(p.grad).detach().cpu().clone() for n, p in self.model.named_parameters()
                if p.grad is not None}

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """A collective; rank 0 gets the full tensors and optimizer state, the other ranks empty dicts."""
        tensors = get_model_state_dict(self.model, options=_FULL)
        optimizer = get_optimizer_state_dict(self.model, self.optimizer, options=_FULL)
        return tensors, {"optimizer": optimizer, "scheduler": self.scheduler.state_dict()}

    def load_checkpoint_state(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        """Every rank passes the full state; each keeps its own shards."""
        if not is_named(state["optimizer"]):
            raise ConfigError("this checkpoint's optimizer state is index-keyed (an older single-engine run); "
                              "resume it once with parallel.engine=single, then switch engines")
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, tensors, options=options)
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=options)
        self.scheduler.load_state_dict(state["scheduler"])
