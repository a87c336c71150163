"""Short causal depthwise convolution over time, shared by the mixers that mix
a few neighbouring tokens into their projections (the Titans memory's q/k/v,
MAC's read queries, the attention family's optional `conv_size`).

Legend: B batch, T tokens, C channels, W taps.

    y_t = sum_{j < W, j <= pos_t} w_j * x_{t-j}

It never reaches into an earlier document (taps stop at position 0), so
packed rows compute what each document computes alone. Decoding state: the W-1
inputs before the next token, (B, W-1, C). Under context parallelism
`short_conv` fetches those W-1 inputs from the preceding chunk's owner
(kernels.sequence.with_halo); for cp=None it is the single-device form.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from loom.kernels.sequence import with_halo


class ShortConv(nn.Module):
    """Causal depthwise conv over time that never reaches into an earlier document.

    forward(x (B, T, C), position_ids (B, T), cache (B, W-1, C) or None, lengths)
    -> (y (B, T, C), new cache). `lengths` (B,) marks how many leading tokens of
    each row are real, so the new cache holds the last real ones.
    init: "uniform" (nn.Conv1d's default for a depthwise filter) or "identity"
    (w_0 = 1, the rest 0: the layer starts as if it had no conv)."""

    def __init__(self, channels: int, taps: int, init: str = "uniform"):
        super().__init__()
        if init not in ("uniform", "identity"):
            raise ValueError(f"ShortConv init must be 'uniform' or 'identity', got {init!r}")
        self.taps = taps
        self.init = init
        self.weight = nn.Parameter(torch.empty(channels, taps))  # weight[:, j] multiplies x_{t-j}

    def reset_parameters(self) -> None:
        if self.init == "identity":
            with torch.no_grad():
                self.weight.zero_()
                self.weight[:, 0] = 1.0
        else:
            bound = 1.0 / math.sqrt(self.taps)
            nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x, position_ids, cache=None, lengths=None):
        B, T, C = x.shape
        W = self.taps
        if cache is None:
            cache = x.new_zeros(B, W - 1, C)
        xx = torch.cat([cache.to(x.dtype), x], dim=1)  # (B, W-1+T, C)
        y = x * self.weight[:, 0]
        for j in range(1, W):
            same_doc = (position_ids >= j)[..., None]
            y = y + torch.where(same_doc, xx[:, W - 1 - j:W - 1 - j + T], 0.0) * self.weight[:, j]
        if lengths is None:
            new_cache = xx[:, T:]
        else:  # the W-1 inputs before each row's first padding slot
            idx = (lengths[:, None] + torch.arange(W - 1, device=x.device))[..., None].expand(B, W - 1, C)
            new_cache = xx.gather(1, idx)
        return y, new_cache


def short_conv(conv: ShortConv, x: torch.Tensor, position_ids: torch.Tensor, cache=None, lengths=None, cp=None):
    """`conv` over x (B, T, C), piece by piece: one piece on one device (its cache the
    decoding state's), each local chunk of a cp shard with the W-1 inputs before it,
    fetched from their owner, as its cache (none at the sequence start, as on one
    process). Returns (y, the last piece's new cache)."""
    W = conv.taps
    pieces = with_halo(x, W - 1, cp)   # [(B, h + C, C)], h <= W-1
    n = x.shape[1] // len(pieces)
    outs = []
    new_cache = None
    for i, ext in enumerate(pieces):
        h = ext.shape[1] - n
        if h:
            cache = F.pad(ext[:, :h], (0, 0, W - 1 - h, 0))  # (B, W-1, C)
        y, new_cache = conv(ext[:, h:], position_ids[:, i * n:(i + 1) * n], cache, lengths)
        outs.append(y)
    return torch.cat(outs, dim=1), new_cache
