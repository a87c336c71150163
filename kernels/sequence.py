"""Sequence plumbing shared by the mixers: the same call on one device and on a
context-parallel shard.

Legend: B batch, T tokens this process holds, C tokens of one local piece,
h halo tokens (<= width), S state.

A mixer that needs the tokens just before its own (a causal conv's taps, a
window's keys) or that must run as one recurrence over the whole sequence (a
layer whose every part depends on its state) calls these with the `cp` handle
it was given; with cp=None they reduce to the plain single-device form, so the
mixer has no context-parallel branch of its own.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from loom.kernels.context_parallel.chain import carry
from loom.kernels.context_parallel.halo import sequence_halo

__all__ = ["with_halo", "stateful_scan"]


def with_halo(x: torch.Tensor, width: int, cp=None) -> list[torch.Tensor]:
    """The pieces of this process's sequence that are contiguous in the full
    sequence, each with the `width` tokens before it prepended.

    x: (B, T, ...) float or integer. width: >= 0.
    cp: None -> [x] (one piece, nothing before it); a CPContext -> one tensor per
        local chunk, (B, h + C, ...) with C = T / len(pieces) and h = min(width,
        the chunk's global start); the halo comes from the ranks that own those
        tokens, and its gradient goes back to them.
    """
    if width < 0:
        raise ValueError(f"with_halo: width must be >= 0; got {width}")
    if cp is None:
        return [x]
    return sequence_halo(x, cp, width)


State = tuple[torch.Tensor, ...]


def stateful_scan(step: Callable[[list[torch.Tensor], State | None], tuple[torch.Tensor, State]],
                  inputs: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                  state: State | None = None, cp=None) -> tuple[torch.Tensor, State | None]:
    """Run a stateful layer over the whole sequence: `step(pieces of inputs, state)
    -> (output, state)`, where feeding a sequence in pieces with the state carried
    equals feeding it whole, and the state is a flat tuple of tensors.

    inputs: tensors (B, T, ...) cut along T together.
    params: the parameters `step` uses (their gradients are collected under cp).
    state: the state before these tokens (decoding), or None at the start.
    cp: None -> step(inputs, state), returning (output, final state);
        a CPContext -> the layer runs piece by piece in global order, its state
        carried rank to rank (kernels/context_parallel/chain.py `carry`); returns
        (this rank's output, None).
    """
    if cp is None:
        return step(list(inputs), state)
    if state is not None:
        raise ValueError("a context-parallel scan starts at the sequence start: it takes no incoming state")
    return carry(step, list(inputs), list(params), cp), None
