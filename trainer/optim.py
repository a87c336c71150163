"""AdamW with decoupled weight decay on matrices only, and lr schedules.

Schedules (multipliers of optim.lr, step counted from 0):
  cosine    linear warmup, then cosine from 1 to min_lr_ratio at train.steps
  wsd       warmup, stable at 1, then linear decay to min_lr_ratio over the
            last decay_frac of the steps (warmup-stable-decay)
  constant  warmup, then 1
"""
from __future__ import annotations

import math

import torch

from loom.trainer.config import OptimConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    fused = all(p.is_cuda for p in model.parameters())
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                             eps=cfg.eps, fused=fused or None)


def lr_multiplier(step: int, total: int, cfg: OptimConfig) -> float:
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        span = max(1, total - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_steps = max(1, int(round(cfg.decay_frac * total)))
    start = total - decay_steps
    if step < start:
        return 1.0
    return 1.0 - (1.0 - floor) * min(1.0, (step - start) / decay_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, total_steps, cfg))
