"""Which backend each sequence-mixing op runs, announced once.

Every public op in kernels/ resolves `impl="auto"` to a concrete backend by a
rule it documents (device, dtype, installed package), then calls
`announce(op, backend)`. The first call per (op, backend) pair is recorded and
logged on the "loom.kernels" logger; the trainer prints those records at
start-up (`loom.trainer.logs`). `chosen()` returns what was announced, so
tests can check which path ran.
"""
from __future__ import annotations

import logging

__all__ = ["announce", "chosen", "reset"]

log = logging.getLogger("loom.kernels")
_chosen: dict[str, list[str]] = {}


def announce(op: str, backend: str) -> None:
    """Record that `op` ran on `backend`; logs the first time the pair is seen."""
    seen = _chosen.setdefault(op, [])
    if backend not in seen:
        seen.append(backend)
        log.info("%s: %s", op, backend)


def chosen() -> dict[str, list[str]]:
    """{op: [backends in the order first used]} of this process."""
    return {op: list(backends) for op, backends in _chosen.items()}


def reset() -> None:
    """Forget what was announced (tests)."""
    _chosen.clear()
