"""Engines: the one interface the training loop uses for every parallelism mode.

The loop calls only:
    engine.module(...)            forward (wrapped model)
    engine.model                  the unwrapped HybridLM (loss, accounting)
    engine.backward(loss)         with engine.accumulating(last) around micro-batches
    engine.step() -> grad_norm    clip, optimiser and scheduler step, zero grads; a non-finite
                                  global grad norm skips the update (every rank sees the same norm)
    engine.lr
    engine.checkpoint_state() / engine.load_checkpoint_state(tensors, state)
and, for parity tests, engine.grads() (full gradients by parameter name).
Checkpoints hold full (unsharded) weights and the name-keyed optimizer state of
trainer/checkpoint/optim_state.py, so any engine on any number of ranks can resume them.
`single` is here and is the base of the others (trainer/distributed/); the
one `build_engine` (trainer/distributed/parallelize.py) picks one from `parallel.engine`.
"""
from __future__ import annotations

import contextlib
import math

import torch

from loom.models import HybridLM
from loom.trainer.config import OptimConfig
from loom.trainer.optim import build_optimizer, build_scheduler
from loom.trainer.checkpoint.optim_state import load_named_state, named_state


class SingleEngine:
    name = "single"

    def __init__(self, model: HybridLM, optim_cfg: OptimConfig, total_steps: int):
        self.model = model
        self.module = model
        self.optimizer = build_optimizer(model, optim_cfg)
        self.scheduler = build_scheduler(self.optimizer, optim_cfg, total_steps)
        self.grad_clip = optim_cfg.grad_clip

    def accumulating(self, last_micro_batch: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip > 0 else math.inf
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if not math.isfinite(norm):  # never apply a NaN/inf gradient (trainer/reliability/guard.py logs the skip)
            self.skip_step()
            return norm
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def skip_step(self) -> None:
        """Drop this step's gradients (non-finite loss); the schedule still advances."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def grads(self) -> dict[str, torch.Tensor]:
        """Current gradients as full CPU tensors by parameter name (call between backward and step)."""
        return {n: p.grad.detach().cpu().clone() for n, p in self.model.named_parameters() if p.grad is not None}

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        return tensors, {"optimizer": named_state(self.model, self.optimizer),
                         "scheduler": self.scheduler.state_dict()}

    def load_checkpoint_state(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        self.model.load_state_dict(tensors)
        load_named_state(self.model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
