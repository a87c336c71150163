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


class _CausalConv(torch.autograd.Function):
    """y = sum_j w[:, j] * xx[t + W-1 - j] (+ bias) over xx = cat(cache, x), then the taps that
    reach into an earlier document (pos_t < j, only near document starts) subtracted again.

    Every pass accumulates in place into one output (addcmul_ with the tap's weight broadcast
    over channels), so forward and backward allocate no (B, T, C) temporary per tap: at long T
    each fresh large tensor costs a page-faulting allocation, which made the autograd form of
    the tap loop grow ~1.3x faster than T. Accumulation in fp32 for half/bf16 inputs."""

    @staticmethod
    def forward(ctx, x, cache, weight, bias, position_ids):
        B, T, C = x.shape
        W = weight.shape[1]
        acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        xx = torch.cat([cache.to(x.dtype), x], dim=1)                           # (B, W-1+T, C)
        w = weight.to(acc)
        y = torch.empty(B, T, C, dtype=acc, device=x.device)
        torch.mul(x, w[:, 0], out=y)
        for j in range(1, W):
            y.addcmul_(xx[:, W - 1 - j:W - 1 - j + T], w[:, j])
        b, t, j, src = _cross_taps(position_ids, W)
        if b.numel():
            y.index_put_((b, t), -(xx[b, src].to(acc) * w[:, j].T), accumulate=True)
        if bias is not None:
            y.add_(bias.to(acc))
        ctx.save_for_backward(xx, weight, position_ids)
        ctx.has_bias, ctx.cache_len = bias is not None, cache.shape[1]
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        xx, weight, position_ids = ctx.saved_tensors
        B, T, C = dy.shape
        W = weight.shape[1]
        acc = torch.float32 if dy.dtype in (torch.float16, torch.bfloat16) else dy.dtype
        w, g = weight.to(acc), dy.to(acc)
        dxx = torch.zeros(B, W - 1 + T, C, dtype=acc, device=dy.device)
        dw = torch.empty(C, W, dtype=acc, device=dy.device)
        buf = torch.empty(B, T, C, dtype=acc, device=dy.device)
        for j in range(W):
            tap = xx[:, W - 1 - j:W - 1 - j + T]
            dxx[:, W - 1 - j:W - 1 - j + T].addcmul_(g, w[:, j])
            torch.mul(g, tap, out=buf)
            dw[:, j] = buf.sum((0, 1))
        b, t, j, src = _cross_taps(position_ids, W)
        if b.numel():
            gb = g[b, t]                                                         # (n, C)
            dxx.index_put_((b, src), -(gb * w[:, j].T), accumulate=True)
            dw.index_put_((torch.arange(C, device=dy.device)[:, None].expand(C, len(j)), j.expand(C, -1)),
                          -(gb * xx[b, src].to(acc)).T, accumulate=True)
        dbias = g.sum((0, 1)) if ctx.has_bias else None
        h = ctx.cache_len
        return (dxx[:, h:].to(dy.dtype), dxx[:, :h].to(dy.dtype), dw.to(weight.dtype),
                None if dbias is None else dbias.to(weight.dtype), None)


def _cross_taps(position_ids: torch.Tensor, W: int):
    """The (row b, token t, tap j, source index t + W-1 - j into cat(cache, x)) of every tap that
    would reach into an earlier document (pos_t < j): a few per document start."""
    b, t = torch.nonzero(position_ids < W - 1, as_tuple=True)
    if not b.numel():
        return b, t, b, b
    j = torch.arange(1, W, device=position_ids.device)
    cross = position_ids[b, t][:, None] < j                                      # (n, W-1)
    n, k = torch.nonzero(cross, as_tuple=True)
    jj = j[k]
    return b[n], t[n], jj, t[n] + (W - 1) - jj


class ShortConv(nn.Module):
    """Causal depthwise conv over time that never reaches into an earlier document.

    forward(x (B, T, C), position_ids (B, T), cache (B, W-1, C) or None, lengths)
    -> (y (B, T, C), new cache). `lengths` (B,) marks how many leading tokens of
    each row are real, so the new cache holds the last real ones.
    init: "uniform" (nn.Conv1d's default for a depthwise filter) or "identity"
    (w_0 = 1, the rest 0: the layer starts as if it had no conv). bias: a per-channel
    bias (Mamba-2's conv1d has one; uniform(+-1/sqrt(W)) like nn.Conv1d's)."""

    def __init__(self, channels: int, taps: int, init: str = "uniform", bias: bool = False):
        super().__init__()
        if init not in ("uniform", "identity"):
            raise ValueError(f"ShortConv init must be 'uniform' or 'identity', got {init!r}")
        self.taps = taps
        self.init = init
        self.weight = nn.Parameter(torch.empty(channels, taps))  # weight[:, j] multiplies x_{t-j}
        self.bias = nn.Parameter(torch.empty(channels)) if bias else None

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.taps)
        if self.init == "identity":
            with torch.no_grad():
                self.weight.zero_()
                self.weight[:, 0] = 1.0
        else:
            nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x, position_ids, cache=None, lengths=None):
        B, T, C = x.shape
        W = self.taps
        if cache is None:
            cache = x.new_zeros(B, W - 1, C)
        y = _CausalConv.apply(x, cache, self.weight, self.bias, position_ids)
        if lengths is None:
            new_cache = torch.cat([cache.to(x.dtype), x], dim=1)[:, T:] if T < W - 1 else x[:, T - (W - 1):]
        else:  # the W-1 inputs before each row's first padding slot
            xx = torch.cat([cache.to(x.dtype), x], dim=1)
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
