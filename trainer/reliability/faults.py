"""Fault-injection hooks for the reliability tests (tests/reliability/); no-ops unless their
environment variable is set, so a subprocess under test can be made to fail at an exact point.

    LOOM_TEST_KILL="checkpoint.manifest:2"   SIGKILL this process the 2nd time it reaches that point
    LOOM_TEST_NAN_STEPS="5,6" (or "all")     fill one gradient with NaN after the backward of those steps

Kill points: checkpoint.payload (tensors and state written, no manifest), checkpoint.manifest (manifest
written, folder not renamed), checkpoint.latest (folder renamed, `latest` not updated),
checkpoint.prune (before old checkpoints are pruned), metrics.line (half a metrics line written).
"""
from __future__ import annotations

import os
import signal

import torch

KILL_ENV = "LOOM_TEST_KILL"
NAN_STEPS_ENV = "LOOM_TEST_NAN_STEPS"
_reached: dict[str, int] = {}


def kill_point(name: str) -> None:
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def poison_grads(model: torch.nn.Module, step: int) -> None:
    """Fill one gradient with NaN at the steps LOOM_TEST_NAN_STEPS lists."""
    spec = os.environ.get(NAN_STEPS_ENV)
    if not spec:
        return
    if spec != "all" and step not in {int(s) for s in spec.split(",") if s.strip()}:
        return
    for p in model.parameters():
        if p.grad is not None:
            p.grad.fill_(float("nan"))
            return
