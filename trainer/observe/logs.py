"""Start-up lines from below the trainer: which backend each kernel runs.

The kernels/ ops announce their backend on the "loom.kernels" logger the first
time they run one (loom.kernels.dispatch). `show_kernel_backends()` routes
those records to rank 0's stdout as `kernel: <op>: <backend>` lines, so a run's
log says what actually ran (e.g. `kernel: attention: sdpa`,
`kernel: neural memory: compiled`).
"""
from __future__ import annotations

import logging

from loom.kernels import dispatch
from loom.trainer.distributed import dist


class _RankZeroLines(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        dist.log(f"kernel: {record.getMessage()}")


def show_kernel_backends() -> None:
    """Print each kernel backend choice of this run once, on rank 0 (a new run in
    the same process prints its own again)."""
    dispatch.reset()
    logger = logging.getLogger("loom.kernels")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if not any(isinstance(h, _RankZeroLines) for h in logger.handlers):
        logger.addHandler(_RankZeroLines())
