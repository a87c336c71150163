"""The rank-to-rank state chain: a recurrence over a sharded sequence, run piece
by piece in the sequence's order with its state handed from rank to rank.

Legend: B batch, T full sequence length, L = T / cp rows held by this rank, C
chunk length (T / (2 cp) zigzag, T / cp contiguous).

A recurrence needs the state after global chunk c before chunk c + 1 can
start, so the chunks run one after another in global order. Zigzag (rank r
holds chunks r and 2cp-1-r) makes that a pipeline that visits every rank twice:
    rank 0 chunk 0 -> rank 1 chunk 1 -> ... -> rank cp-1 chunk cp-1
      -> rank cp-1 chunk cp -> rank cp-2 chunk cp+1 -> ... -> rank 0 chunk 2cp-1
(contiguous: once, rank 0 -> ... -> rank cp-1). A hop between the two chunks
of one rank (rank cp-1 under zigzag) stays local.

Two levels, one implementation:
    StateChain(L, cp)      this rank's pieces in sequence order (local rows, the
                           ranks of the pieces before and after) and the messages
                           between them: send / recv of any pytree state (a
                           header with the tree, shapes and dtypes goes first),
                           send_tensors / recv_tensors when both ends know the
                           shapes (gradients going back). Without cp: one piece.
    carry(step, seq, params, cp)
                           an autograd Function on top of it: runs
                           step(chunk inputs, state) -> (y, state) chunk by chunk
                           with the state carried, keeps each chunk's graph, and
                           backward walks the local chunks from the last to the
                           first: receive d(state out) from the rank the state went
                           to, backpropagate the chunk, send d(state in) to the rank
                           it came from. Exact when feeding the sequence in pieces
                           with the state carried equals feeding it whole.

Users: kernels/memory/cp.py (the Titans memory), kernels/sequence.stateful_scan
(a whole stateful layer, Titans MAC), and the trainer's block tiles of unbounded
reach (pieces, send, recv).

Cost: the recurrence is serialised; its wall time is about its single-process
time (each rank busy 2 of 2cp steps under zigzag). Messages: the whole state per
hop to another rank, at most twice per rank forward and backward, plus a header.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_flatten, tree_unflatten

from loom.kernels.context_parallel.layout import CPContext, check_seq_len, chunk_owner, chunk_ranges
from loom.kernels.context_parallel.p2p import exchange, wait

__all__ = ["Piece", "StateChain", "carry", "state_hops", "TAG_STRIDE"]

TAG_STRIDE = 1 << 12  # tags per hop: one message per state tensor


class Piece(NamedTuple):
    """One piece of this rank's rows: local rows [lo, hi) are global chunk `chunk`;
    `prev` / `next` are the ranks holding the chunks before and after it (None at
    the ends of the sequence; this rank's own rank when the hop is local)."""

    chunk: int
    lo: int
    hi: int
    prev: int | None
    next: int | None


class StateChain:
    """The pieces of this rank's L rows in the sequence's order, and the messages
    that carry a state between ranks holding consecutive pieces.

    cp None: one piece (0, 0, L, None, None), and no messages are ever sent.
    Example (forward of a recurrence, state any pytree of tensors and plain values):
        chain = StateChain(x.shape[1], cp)
        for p in chain.pieces:
            state = chain.recv(p.prev, p.chunk, x.device) if chain.remote(p.prev) else state
            y[:, p.lo:p.hi], state = f(x[:, p.lo:p.hi], state)
            if chain.remote(p.next):
                wait(chain.send(state, p.next, p.chunk + 1))
    """

    def __init__(self, L: int, cp: CPContext | None = None):
        self.cp = cp
        if cp is None:
            self.rank, self.n_chunks, self.pieces = 0, 1, [Piece(0, 0, L, None, None)]
            return
        T = L * cp.world_size
        check_seq_len(T, cp)
        C, n = T // cp.n_chunks, cp.n_chunks
        self.rank, self.n_chunks, self.pieces = cp.rank, n, []
        for j, (a, _) in enumerate(chunk_ranges(T, cp.world_size, cp.rank, cp.layout)):
            c = a // C
            prev = chunk_owner(c - 1, cp.world_size, cp.layout)[0] if c > 0 else None
            nxt = chunk_owner(c + 1, cp.world_size, cp.layout)[0] if c + 1 < n else None
            self.pieces.append(Piece(c, j * C, (j + 1) * C, prev, nxt))

    def remote(self, peer: int | None) -> bool:
        """True when `peer` is another rank (a message is needed), False for None or this rank."""
        return peer is not None and peer != self.rank

    def send_tensors(self, tensors: Sequence[torch.Tensor], peer: int, tag: int) -> list:
        """Post sends of `tensors` (detached) to `peer` under tags tag, tag + 1, ...;
        returns the works to wait on. The receiver must know their shapes."""
        return exchange(self.cp, [(t.detach(), peer, tag + j) for j, t in enumerate(tensors)], [])

    def recv_tensors(self, like: Sequence[torch.Tensor], peer: int, tag: int) -> list[torch.Tensor]:
        """Receive tensors shaped like `like` from `peer` (the pair of send_tensors), blocking."""
        bufs = [torch.empty_like(t) for t in like]
        wait(exchange(self.cp, [], [(b, peer, tag + j) for j, b in enumerate(bufs)]))
        return bufs

    def send(self, state: Any, peer: int, tag: int) -> list:
        """Send any pytree `state` to `peer`: a header (tree structure, non-tensor leaves,
        tensor shapes and dtypes) first, then its tensors under tags tag + 1, ...
        Returns the works of the tensor sends (wait on them before reusing the tensors)."""
        leaves, spec = tree_flatten(state)
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        header = (spec, [(tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else ("value", t)
                         for t in leaves])
        dist.send_object_list([header], dst=self.cp.global_rank(peer), group=self.cp.group)
        return self.send_tensors(tensors, peer, tag + 1)

    def recv(self, peer: int, tag: int, device) -> Any:
        """Receive the pytree state `send` posted from `peer` (blocking), tensors on `device`."""
        box = [None]
        dist.recv_object_list(box, src=self.cp.global_rank(peer), group=self.cp.group)
        spec, entries = box[0]
        like = [torch.empty(e[0], dtype=e[1], device=device) for e in entries if e[0] != "value"]
        tensors = iter(self.recv_tensors(like, peer, tag + 1))
        return tree_unflatten([next(tensors) if e[0] != "value" else e[1] for e in entries], spec)


def state_hops(T: int, cp: CPContext) -> list[tuple[int, int | None, int | None]]:
    """Per local chunk in shard order: (global chunk c, rank of chunk c-1, rank of chunk c+1),
    None at the ends of the sequence."""
    return [(p.chunk, p.prev, p.next) for p in StateChain(T // cp.world_size, cp).pieces]


State = Any
Step = Callable[[list[torch.Tensor], State | None], tuple[torch.Tensor, State]]


def _diff(leaves: list) -> list[torch.Tensor]:
    """The floating tensors among a state's leaves: the ones that carry gradients."""
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _as_input(state: State) -> State:
    """A detached copy of `state` whose floating tensors require grad (a chunk differentiates
    with respect to its start state)."""
    leaves, spec = tree_flatten(state)
    return tree_unflatten([t.detach().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point()
                           else t for t in leaves], spec)


class _Carry(torch.autograd.Function):
    """(*seq shards (B, L, ...), *params) -> y (B, L, ...) by running `step` over the chain."""

    @staticmethod
    def forward(ctx, cp: CPContext, step: Step, n_seq: int, *tensors):
        seq = [t.detach().requires_grad_(t.requires_grad) if t.is_floating_point() else t for t in tensors[:n_seq]]
        params = list(tensors[n_seq:])
        chain = StateChain(seq[0].shape[1], cp)
        chunks, sends, handoff = [], [], None
        with torch.enable_grad():
            for p in chain.pieces:
                if p.prev is None:
                    state_in = None
                else:
                    raw = chain.recv(p.prev, p.chunk * TAG_STRIDE, seq[0].device) if chain.remote(p.prev) else handoff
                    state_in = _as_input(raw)
                y, state_out = step([t[:, p.lo:p.hi] for t in seq], state_in)
                if p.next == chain.rank:
                    handoff = state_out
                elif p.next is not None:
                    sends += chain.send(state_out, p.next, (p.chunk + 1) * TAG_STRIDE)
                chunks.append((p, state_in, y, state_out if p.next is not None else None))
        wait(sends)
        ctx.chain, ctx.seq, ctx.params, ctx.chunks = chain, seq, params, chunks
        ctx.tag0 = (chain.n_chunks + 1) * TAG_STRIDE  # backward tags follow the forward ones
        return torch.cat([y.detach() for _, _, y, _ in chunks], dim=1)

    @staticmethod
    def backward(ctx, dy):
        chain = ctx.chain
        wanted = [t for t in ctx.seq if t.requires_grad] + [t for t in ctx.params if t.requires_grad]
        acc = [None] * len(wanted)
        sends, handoff = [], None
        for p, state_in, y, state_out in reversed(ctx.chunks):
            outs, douts = [y], [dy[:, p.lo:p.hi]]
            if state_out is not None:
                f_out = _diff(tree_flatten(state_out)[0])
                if chain.remote(p.next):
                    d_out = chain.recv_tensors(f_out, p.next, ctx.tag0 + (p.chunk + 1) * TAG_STRIDE)
                else:
                    d_out = handoff
                keep = [j for j, t in enumerate(f_out) if t.requires_grad]
                outs += [f_out[j] for j in keep]
                douts += [d_out[j] for j in keep]
            f_in = [] if state_in is None else _diff(tree_flatten(state_in)[0])
            g = torch.autograd.grad(outs, wanted + f_in, douts, allow_unused=True)
            for j in range(len(wanted)):
                if g[j] is not None:
                    acc[j] = g[j] if acc[j] is None else acc[j] + g[j]
            if state_in is not None:
                d_in = [torch.zeros_like(t) if d is None else d for t, d in zip(f_in, g[len(wanted):])]
                if chain.remote(p.prev):
                    sends += chain.send_tensors(d_in, p.prev, ctx.tag0 + p.chunk * TAG_STRIDE)
                else:
                    handoff = d_in
        wait(sends)
        grads = iter(acc)
        out = [next(grads) if t.requires_grad else None for t in ctx.seq]
        out += [next(grads) if t.requires_grad else None for t in ctx.params]
        ctx.chunks = ctx.seq = ctx.params = None
        return (None, None, None, *out)


def carry(step: Step, seq_inputs: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
          cp: CPContext) -> torch.Tensor:
    """Run a recurrence over a sequence sharded across `cp`, its state carried rank to rank.

    step(chunk_inputs, state) -> (y_chunk, new_state): chunk_inputs are the (B, C, ...)
        slices of `seq_inputs`; state is None at the sequence start, else what the
        previous chunk returned (any pytree of tensors and plain values). Running it
        over pieces of a sequence with the state carried must equal running it whole.
    seq_inputs: (B, L, ...) shards in the shard order of `cp.layout` (the first one
        fixes L); floating ones get gradients, others (position ids, masks) are passed along.
    params: the tensors `step` reads that may need gradients (a module's parameters);
        their gradients are this rank's share (sum over ranks, as for any shard).
    Returns y: (B, L, ...) the concatenated chunk outputs. Called by every rank of cp.group.

    Example:
        >>> y_loc = carry(lambda xs, st: layer(xs[0], xs[1], st), [x_loc, pos_loc],
        ...               list(layer.parameters()), cp)
    """
    check_seq_len(seq_inputs[0].shape[1] * cp.world_size, cp)
    if any(t.shape[1] != seq_inputs[0].shape[1] for t in seq_inputs):
        raise ValueError(f"carry: seq_inputs must share dim 1 (L); got {[tuple(t.shape) for t in seq_inputs]}")
    return _Carry.apply(cp, step, len(seq_inputs), *seq_inputs, *params)
