"""Point-to-point exchange inside a cp group: the halo exchange, the state chain and
the ops' own rings (kernels/attention/ring.py) post their messages through it."""
from __future__ import annotations

import torch
import torch.distributed as dist

from loom.kernels.context_parallel.layout import CPContext

__all__ = ["exchange", "wait"]


def exchange(cp: CPContext, sends: list[tuple[torch.Tensor, int, int]],
             recvs: list[tuple[torch.Tensor, int, int]]) -> list:
    """Post non-blocking sends and receives; returns the works to wait on.

    sends / recvs: (tensor, peer rank inside cp.group, tag). Messages between
    the same pair of ranks are matched by tag and, within a tag, by posting
    order, so every caller posts in an order both sides can derive. The caller
    computes while the transfers run (NCCL overlaps them with kernels; gloo runs
    them on its own threads) and waits before touching the buffers.
    """
    ops = [dist.P2POp(dist.isend, t.contiguous(), cp.global_rank(peer), cp.group, tag) for t, peer, tag in sends]
    ops += [dist.P2POp(dist.irecv, t, cp.global_rank(peer), cp.group, tag) for t, peer, tag in recvs]
    return dist.batch_isend_irecv(ops) if ops else []


def wait(works: list) -> None:
    """Block until every work of `exchange` has completed."""
    for w in works:
        w.wait()
