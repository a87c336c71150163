"""Context parallelism for a whole stateful layer: run it chunk by chunk in global
order, carrying its state from rank to rank.

Legend: B batch, T full sequence length, L = T / cp tokens per rank, C chunk
length (T / (2 cp) zigzag, T / cp contiguous).

For layers whose every part depends on a recurrent state (Titans MAC: the
memory's weights decide what each segment's attention sees), no piece of a
chunk can start before its predecessor's state arrives, so the layer itself is
the pipeline stage: `step(chunk inputs, state) -> (output, state)` is any
function that, fed a sequence in pieces with the state carried, equals the
whole. The hops are those of memory.py (zigzag visits every rank twice). The
state is a flat tuple of tensors whose shapes and dtypes travel in a small
header, so `step` may return any tensors; floating ones carry gradients back.

Backward (`_RecurrentChain`): each chunk's graph is kept from the forward; the
local chunks are backpropagated from the last to the first, each receiving the
gradient of its outgoing state from the rank that state went to and sending
the gradient of its incoming state to the rank it came from.

Cost: the layer is serialised; its wall time is about its single-process time
(each rank busy 2 of 2cp steps under zigzag). Messages: the whole state per
hop, twice per rank forward and backward.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist

from loom.kernels.context_parallel.layout import CPContext, check_seq_len
from loom.kernels.context_parallel.memory import state_hops
from loom.kernels.context_parallel.p2p import exchange, wait

__all__ = ["cp_recurrent"]

State = tuple[torch.Tensor, ...]
Step = Callable[[list[torch.Tensor], State | None], tuple[torch.Tensor, State]]


TAG_STRIDE = 1 << 12  # tags per hop: one message per state tensor


def _recv_state(cp: CPContext, src: int, tag: int, device) -> State:
    header = [None]
    dist.recv_object_list(header, src=cp.global_rank(src), group=cp.group)
    bufs = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in header[0]]
    wait(exchange(cp, [], [(b, src, tag + 1 + j) for j, b in enumerate(bufs)]))
    return tuple(bufs)


def _send_state(cp: CPContext, state: State, dst: int, tag: int) -> list:
    dist.send_object_list([[(tuple(t.shape), t.dtype) for t in state]], dst=cp.global_rank(dst), group=cp.group)
    return exchange(cp, [(t.detach(), dst, tag + 1 + j) for j, t in enumerate(state)], [])


def _floats(state: State) -> list[torch.Tensor]:
    return [t for t in state if t.is_floating_point()]


class _RecurrentChain(torch.autograd.Function):
    """(*seq shards (B, L, ...), *params) -> y (B, L, ...) by running `step` over the state pipeline."""

    @staticmethod
    def forward(ctx, cp: CPContext, step: Step, n_seq: int, *tensors):
        seq = [t.detach().requires_grad_(t.requires_grad) if t.is_floating_point() else t for t in tensors[:n_seq]]
        params = [p for p in tensors[n_seq:] if p.requires_grad]
        L = seq[0].shape[1]
        T = L * cp.world_size
        C = T // cp.n_chunks
        chunks, sends, handoff = [], [], None
        with torch.enable_grad():
            for i, (c, prev, nxt) in enumerate(state_hops(T, cp)):
                if prev is None:
                    state_in = None
                else:
                    raw = handoff if prev == cp.rank else _recv_state(cp, prev, c * TAG_STRIDE, seq[0].device)
                    state_in = tuple(t.detach().requires_grad_() if t.is_floating_point() else t for t in raw)
                y, state_out = step([t[:, i * C:(i + 1) * C] for t in seq], state_in)
                if nxt == cp.rank:
                    handoff = state_out
                elif nxt is not None:
                    sends += _send_state(cp, state_out, nxt, (c + 1) * TAG_STRIDE)
                chunks.append((c, prev, nxt, state_in, y, state_out if nxt is not None else None))
        wait(sends)
        ctx.cp, ctx.C, ctx.seq, ctx.params, ctx.chunks = cp, C, seq, params, chunks
        ctx.tag0 = (cp.n_chunks + 1) * TAG_STRIDE
        return torch.cat([y.detach() for *_, y, _ in chunks], dim=1)

    @staticmethod
    def backward(ctx, dy):
        cp, C = ctx.cp, ctx.C
        wanted = [t for t in ctx.seq if t.requires_grad] + ctx.params
        acc = [None] * len(wanted)
        sends, handoff = [], None
        for i in reversed(range(len(ctx.chunks))):
            c, prev, nxt, state_in, y, state_out = ctx.chunks[i]
            outs, douts = [y], [dy[:, i * C:(i + 1) * C]]
            if state_out is not None:
                f_out = _floats(state_out)
                if nxt == cp.rank:
                    d_out = handoff
                else:
                    d_out = [torch.empty_like(t) for t in f_out]
                    wait(exchange(cp, [], [(d, nxt, ctx.tag0 + (c + 1) * TAG_STRIDE + j) for j, d in enumerate(d_out)]))
                keep = [j for j, t in enumerate(f_out) if t.requires_grad]
                outs += [f_out[j] for j in keep]
                douts += [d_out[j] for j in keep]
            f_in = [] if state_in is None else _floats(state_in)
            g = torch.autograd.grad(outs, wanted + f_in, douts, allow_unused=True)
            for j in range(len(wanted)):
                if g[j] is not None:
                    acc[j] = g[j] if acc[j] is None else acc[j] + g[j]
            if state_in is not None:
                d_in = [torch.zeros_like(t) if d is None else d for t, d in zip(f_in, g[len(wanted):])]
                if prev == cp.rank:
                    handoff = d_in
                else:
                    sends += exchange(cp, [(d, prev, ctx.tag0 + c * TAG_STRIDE + j) for j, d in enumerate(d_in)], [])
        wait(sends)
        grads = iter(acc)
        seq_grads = [next(grads) if t.requires_grad else None for t in ctx.seq]
        param_grads = list(grads)
        ctx.chunks = ctx.seq = ctx.params = None
        return (None, None, None, *seq_grads, *param_grads)


def cp_recurrent(step: Step, seq_inputs: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                 cp: CPContext) -> torch.Tensor:
    """Run a stateful layer over a sequence sharded across `cp`, its state carried rank to rank.

    step(chunk_inputs, state) -> (y_chunk, new_state): chunk_inputs are the (B, C, ...)
        slices of `seq_inputs`; state is None at the sequence start, else the flat
        tuple of tensors the previous chunk returned. Running it over pieces of a
        sequence with the state carried must equal running it whole.
    seq_inputs: (B, L, ...) shards in the shard order of `cp.layout` (the first one
        fixes L); floating ones get gradients, others (position ids) are passed along.
    params: the tensors `step` reads that need gradients (a module's parameters);
        their gradients are this rank's share (sum over ranks, as for any shard).
    Returns y: (B, L, ...) the concatenated chunk outputs. Called by every rank of cp.group.

    Example:
        >>> y_loc = cp_recurrent(lambda xs, st: layer(xs[0], xs[1], st), [x_loc, pos_loc],
        ...                      list(layer.parameters()), cp)
    """
    check_seq_len(seq_inputs[0].shape[1] * cp.world_size, cp)
    if any(t.shape[1] != seq_inputs[0].shape[1] for t in seq_inputs):
        raise ValueError(f"cp_recurrent: seq_inputs must share dim 1 (L); got {[tuple(t.shape) for t in seq_inputs]}")
    return _RecurrentChain.apply(cp, step, len(seq_inputs), *seq_inputs, *params)
