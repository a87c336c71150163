"""Step guard: never apply, and never checkpoint, a diverged update.

A step is skipped (no optimiser update; the lr schedule still advances) when
- its loss is not finite (every rank sees the same all-reduced loss), or
- its global gradient norm is not finite (the engines compute the norm over
  the whole, all-reduced or sharded, gradient, so every rank agrees; they skip
  the update themselves, see SingleEngine.step), or
- `train.spike_skip = k` is set and the loss exceeds k times the running mean
  of the last `train.spike_window` accepted losses (the loss-spike practice of
  OLMo and PaLM; off by default).

`train.max_bad_steps` consecutive non-finite steps stop the run with a message
naming the last good checkpoint and how to resume from it with a lower lr.
After `train.spike_rewind = n` spikes since the last checkpoint the loop
rewinds to that checkpoint and keeps the data position where it is, so the
windows that caused the spikes are skipped (PaLM's rewind-and-skip).
Every skip and rewind is a metrics.jsonl line with an `event` field.
Tests inject NaN gradients with trainer/reliability/faults.py (LOOM_TEST_NAN_STEPS).
"""
from __future__ import annotations

import math
from collections import deque


class StepGuard:
    """Decides, per step, whether the update is applied; keeps the running loss mean.

    Args:
        max_bad_steps: consecutive non-finite steps before `should_stop` is true.
        spike_skip: k, a loss above k x running mean is a spike; None or <= 0: off.
        spike_window: how many accepted losses the running mean averages.
        spike_rewind: spikes since the last checkpoint that trigger a rewind; 0: never.
    """

    MIN_HISTORY = 5  # accepted losses needed before a spike can be called (at most the window)

    def __init__(self, max_bad_steps: int, spike_skip: float | None = None, spike_window: int = 50,
                 spike_rewind: int = 0):
        self.max_bad_steps = max_bad_steps
        self.spike_skip = spike_skip if spike_skip and spike_skip > 0 else None
        self.spike_rewind = spike_rewind
        self.history: deque[float] = deque(maxlen=spike_window)
        self.bad_in_a_row = 0
        self.spikes: list[int] = []  # steps of the spikes since the last checkpoint or rewind

    def check_loss(self, loss: float) -> str | None:
        """Why this step must be skipped before its update ("nonfinite_loss", "spike"), or None."""
        if not math.isfinite(loss):
            return "nonfinite_loss"
        if self.spike_skip is not None and len(self.history) >= min(self.MIN_HISTORY, self.history.maxlen):
            if loss > self.spike_skip * (sum(self.history) / len(self.history)):
                return "spike"
        return None

    def record(self, step: int, loss: float, grad_norm: float, skipped: str | None) -> dict | None:
        """Account for a finished step; returns the metrics event line of a skip, or None."""
        if skipped is None and not math.isfinite(grad_norm):
            skipped = "nonfinite_grad_norm"
        if skipped is None:
            self.bad_in_a_row = 0
            self.history.append(loss)
            return None
        if skipped == "spike":
            self.spikes.append(step)
            mean = sum(self.history) / len(self.history)
            return {"step": step, "event": "skip", "reason": skipped, "loss": loss, "running_mean": mean}
        self.bad_in_a_row += 1
        return {"step": step, "event": "skip", "reason": skipped, "loss": loss, "grad_norm": grad_norm,
                "in_a_row": self.bad_in_a_row}

    @property
    def should_stop(self) -> bool:
        return self.bad_in_a_row >= self.max_bad_steps

    @property
    def should_rewind(self) -> bool:
        return self.spike_rewind > 0 and len(self.spikes) >= self.spike_rewind

    def checkpointed(self) -> None:
        """A checkpoint was written: spikes before it can no longer be rewound."""
        self.spikes = []

    def state_dict(self) -> dict:
        return {"history": list(self.history), "bad_in_a_row": self.bad_in_a_row, "spikes": list(self.spikes)}

    def load_state_dict(self, state: dict | None) -> None:
        if not state:  # a checkpoint older than the guard
            return
        self.history.clear()
        self.history.extend(state["history"])
        self.spikes = list(state["spikes"])
        # bad_in_a_row starts at 0: a resume is a new attempt (often with a lower lr)


def resume_advice(last_good: str | None, lr: float) -> str:
    """The end of a stop message: where the good weights are and how to continue from them."""
    lower = f"{lr / 10:.3g}"
    if last_good is None:
        return f"no checkpoint was written; start again with a lower lr (optim.lr={lower})"
    return (f"the last good checkpoint is {last_good}; run the same command with optim.lr={lower} "
            "to resume from it with a lower lr")
