"""Sequence-length schedule: training stages of (first step, seq_len, batch size).

    data:
      seq_len: 4096                      # the length train.batch_size is given for
      seq_len_schedule:
        - {step: 0, seq_len: 4096}
        - {step: 1000, seq_len: 16384}   # batch_size: train.batch_size * 4096 / 16384
        - {step: 3000, seq_len: 65536, batch_size: 1}

A stage's batch size is its own `batch_size`, or else train.batch_size *
data.seq_len / seq_len (tokens per step constant), which must be a whole
number >= 1. No schedule = one stage (step 0, data.seq_len, train.batch_size),
which is exactly the unscheduled data path.

Data of a stage. Stage s has its own WindowDataset at its seq_len, and its
windows are counted from 0; each source continues where the previous stages
left it: a real-text source's stream starts at token offset
sum_{r<s} (windows of that source among the n_r windows of stage r) * T_r, a
synthetic source's examples at the same count of windows. n_r (windows stage r
consumed) is recorded in the data state when the stage ends, so the windows
of every stage are a pure function of (config, seed, split, stage history,
index) and a run resumed on either side of a stage change reads what an
uninterrupted run reads. The state is {"position", "stage", "stage_windows"}.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from loom.models.config import ConfigError
from loom.trainer.data.batcher import Batcher
from loom.trainer.data.build import build_dataset, eval_windows
from loom.trainer.data.config import StageConfig  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class Stage:
    index: int
    step: int
    seq_len: int
    batch_size: int


def resolve_stages(data_cfg, batch_size: int, cp_size: int = 1) -> list[Stage]:
    """Validated stages of a DataConfig (ConfigError naming data.seq_len_schedule[i].key)."""
    sched = data_cfg.seq_len_schedule
    if not sched:
        return [Stage(0, 0, data_cfg.seq_len, batch_size)]
    out = []
    for i, st in enumerate(sched):
        where = f"data.seq_len_schedule[{i}]"
        if i == 0 and st.step != 0:
            raise ConfigError(f"{where}.step: the first stage starts at step 0, got {st.step}")
        if i > 0 and st.step <= sched[i - 1].step:
            raise ConfigError(f"{where}.step: stages must start at increasing steps, got {st.step} after "
                              f"{sched[i - 1].step}")
        if st.seq_len < 1:
            raise ConfigError(f"{where}.seq_len: must be >= 1, got {st.seq_len}")
        if cp_size > 1 and st.seq_len % (2 * cp_size):
            raise ConfigError(f"{where}.seq_len ({st.seq_len}) must be divisible by 2 * parallel.cp ({2 * cp_size}) "
                              "for the load-balanced context-parallel split")
        bs = st.batch_size
        if bs is None:
            tokens = batch_size * data_cfg.seq_len
            if tokens % st.seq_len or tokens < st.seq_len:
                raise ConfigError(f"{where}.batch_size: train.batch_size * data.seq_len = {tokens} tokens is not a "
                                  f"whole number (>= 1) of {st.seq_len}-token rows; give batch_size")
            bs = tokens // st.seq_len
        if bs < 1:
            raise ConfigError(f"{where}.batch_size: must be >= 1, got {bs}")
        out.append(Stage(i, st.step, st.seq_len, bs))
    return out


def stage_at(stages: list[Stage], step: int) -> Stage:
    """The stage that runs training step step + 1 (after `step` steps are done)."""
    return [s for s in stages if s.step <= step][-1]


def check_stages_with_model(check, data_cfg, batch_size: int, cp_size: int = 1) -> None:
    """Run a model check (e.g. check_cp_support) at every stage's seq_len.

    check(seq_len) raises ConfigError naming data.seq_len; the message gains the stage.
    data_cfg, batch_size, cp_size: data.*, train.batch_size and parallel.cp, which
    resolve the stages.
    """
    for st in resolve_stages(data_cfg, batch_size, cp_size):
        try:
            check(st.seq_len)
        except ConfigError as e:
            if not data_cfg.seq_len_schedule:
                raise
            raise ConfigError(f"data.seq_len_schedule[{st.index}] (seq_len {st.seq_len}): {e}") from None


class StagedBatches:
    """The batches of a run across its stages, for one data-parallel rank.

    next(step) -> batch for the step after `step` done steps; switches stage when
    `step` reaches the next stage's first step. val_batches(step) -> the fixed
    validation set at that stage's seq_len. tokens_per_step(step, dp_size, grad_accum).

    Example:
        >>> data = StagedBatches(cfg.data, cfg.train.batch_size, tok, seed=0, dp_rank=0, dp_size=1)
        >>> batch = data.next(step)
    """

    def __init__(self, data_cfg, batch_size: int, tokenizer, seed: int, dp_rank: int = 0, dp_size: int = 1,
                 cp_size: int = 1):
        self.cfg, self.tokenizer, self.seed = data_cfg, tokenizer, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.stages = resolve_stages(data_cfg, batch_size, cp_size)
        self.stage_windows: list[int] = []      # windows consumed by each finished stage
        self._stage: Optional[int] = None
        self._batcher = None
        self._val: dict[int, list] = {}
        self._pending_position = 0
        if len(self.stages) > 1:             # every stage's data builds now, not at its first step
            for st in self.stages[1:]:
                build_dataset(dataclasses.replace(data_cfg, seq_len=st.seq_len), tokenizer, "train", seed)[0]

    def _build(self, s: int, position: int) -> None:
        st = self.stages[s]
        ds = build_dataset(dataclasses.replace(self.cfg, seq_len=st.seq_len), self.tokenizer, "train", self.seed,
                           history=self._history(s))
        self._batcher = Batcher(ds, st.batch_size, self.dp_rank, self.dp_size, start=position)
        self._stage = s

    def _history(self, s: int) -> list[tuple[int, int]]:
        """(windows, seq_len) of each stage before s."""
        return [(n, self.stages[r].seq_len) for r, n in enumerate(self.stage_windows[:s])]

    def stage(self, step: int) -> Stage:
        return stage_at(self.stages, step)

    def next(self, step: int) -> dict[str, torch.Tensor]:
        want = self.stage(step).index
        if self._stage is None:
            self._build(want, self._pending_position)
        while self._stage < want:                                  # a stage change
            self.stage_windows.append(self._batcher.position)
            self._build(self._stage + 1, 0)
        return self._batcher.next()

    def tokens_per_step(self, step: int, grad_accum: int = 1) -> int:
        st = self.stage(step)
        return st.batch_size * st.seq_len * grad_accum * self.dp_size

    def val_batches(self, step: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
        st = self.stage(max(step - 1, 0))                          # the stage that ran the last step
        if st.index not in self._val:
            self._val[st.index] = eval_windows(dataclasses.replace(self.cfg, seq_len=st.seq_len), self.tokenizer,
                                               self.seed, batch_size=batch_size)
        return self._val[st.index]

    @property
    def position(self) -> int:
        """Windows consumed so far (in the current stage)."""
        return self._pending_position if self._batcher is None else self._batcher.position

    def state_dict(self) -> dict:
        position = self.position
        if len(self.stages) == 1:
            return {"position": position}
        return {"position": position, "stage": self._stage or 0, "stage_windows": list(self.stage_windows)}

    def load_state_dict(self, state: dict) -> None:
        position = int(state["position"])
        if position < 0:
            raise ValueError(f"data position must be >= 0, got {position}")
        self.stage_windows = [int(n) for n in state.get("stage_windows", [])]
        stage = int(state.get("stage", 0))
        if stage >= len(self.stages):
            raise ValueError(f"the checkpoint is in data stage {stage}, the recipe has {len(self.stages)} stages")
        self._pending_position = position
        self._build(stage, position)
