"""The `distill:` recipe section: a teacher and a schedule of stages.

    distill:
      teacher: runs/llama-tiny-hf      # a `loom convert hf` folder, a run folder or a checkpoint folder
      stages:
        - {kind: align, steps: 100}                                  # per replaced layer: MSE to the teacher's attention
        - {kind: kl, steps: 400, temperature: 2.0, kl_weight: 0.9}   # end to end: KL(teacher || student) + LM loss

Stages run one after another from step 0 (like data.seq_len_schedule, but given by
length): stage i covers the `steps` after the previous ones; the last stage goes
on to train.steps. An empty list is one `kl` stage with the defaults.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from loom.models.config import ConfigError, ranged

__all__ = ["DistillConfig", "DistillStage", "stage_at", "validate_distill"]


@dataclass
class DistillStage:
    kind: Literal["align", "kl"] = "kl"
    steps: int = ranged(1, ge=1)  # optimiser steps of this stage (the last stage: until train.steps)
    temperature: float = ranged(1.0, gt=0)  # kl: both distributions are softmax(z / temperature)
    kl_weight: float = ranged(1.0, ge=0, le=1)  # kl: loss = kl_weight * T^2 * KL + (1 - kl_weight) * LM loss


@dataclass
class DistillConfig:
    teacher: str | None = None  # None: no distillation
    stages: list[DistillStage] = field(default_factory=list)
    freeze: list[str] = field(default_factory=list)  # kl stage: parameter-name prefixes kept frozen (e.g. embed.)


def stage_at(cfg: DistillConfig, step: int) -> tuple[int, DistillStage]:
    """(index, stage) of the stage that trains optimiser step `step` + 1 (step: steps done)."""
    stages = cfg.stages or [DistillStage()]
    start = 0
    for i, st in enumerate(stages):
        if step < start + st.steps or i == len(stages) - 1:
            return i, st
        start += st.steps
    raise AssertionError("unreachable")


def validate_distill(cfg: DistillConfig) -> None:
    """Checks that need no model (ConfigError naming distill.stages[i].key)."""
    if cfg.teacher is None:
        if cfg.stages:
            raise ConfigError("distill.stages is set but distill.teacher is not; name the teacher folder")
        return
    # each stage's steps, temperature and kl_weight ranges are declared on DistillStage's fields
