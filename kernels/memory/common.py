"""Pieces shared by the memory reference and the chunked op: the memory MLP,
its activation and the carried state.

Legend: B batch, T tokens, H heads, K head dim, N chunks (blocks), C tokens
per chunk block, D_in / D_out the sides of one memory matrix.

The memory of one (batch row, head) is an MLP of depth L with row-vector
convention and no biases:
    h_0 = x,  z_l = h_{l-1} @ W_l,  h_l = act(z_l) (l < L),  M_W(x) = z_L
W_1 is (K, E*K), the middle ones (E*K, E*K), W_L (E*K, K); depth 1 is the
linear memory M_W(x) = x @ W with W (K, K). That is the paper's plain MLP.
Optionally (norm_weight gamma (H, K) given) the output is RMS-normalised:
    M_W(x) = z_L / sqrt(mean_K(z_L^2) + NORM_EPS) * gamma
which makes the memory's loss invariant to the scale of W_L, so its
curvature cannot grow without bound as the fast weights grow (the TTT /
titans-pytorch stabiliser; gamma is an outer-loop parameter). No residual.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.utils._pytree

Weights = tuple[torch.Tensor, ...]
NORM_EPS = 1e-6


_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def act_derivatives(name: str, z: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    """The first n of (act(z), act'(z), act''(z)), sharing their intermediates.
        gelu: z cdf, cdf + z pdf, pdf (2 - z^2)
        silu: z s, s (1 + z (1 - s)), s (1 - s) (2 + z (1 - 2 s))   with s = sigmoid(z)"""
    if name == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(z * _SQRT_HALF))
        if n == 1:
            return (z * cdf,)
        pdf = torch.exp(-0.5 * z * z) * _INV_SQRT_2PI
        out = (z * cdf, cdf + z * pdf, pdf * (2.0 - z * z))
    else:
        s = torch.sigmoid(z)
        if n == 1:
            return (z * s,)
        ds = s * (1.0 - s)
        out = (z * s, s + z * ds, ds * (2.0 + z * (1.0 - 2.0 * s)))
    return out[:n]


# name -> (act, z -> (act(z), d act / dz)), written as plain tensor ops so that the outer
# (training) autograd can differentiate through the hand-written inner backprop. The
# definitions the reference uses.
ACTIVATIONS = {name: (lambda z, n=name: act_derivatives(n, z, 1)[0], lambda z, n=name: act_derivatives(n, z, 2))
               for name in ("gelu", "silu")}


class _ActAndSlope(torch.autograd.Function):
    """z -> (act(z), act'(z)) as one autograd node, backward through act' and act''."""

    @staticmethod
    def forward(ctx, name, z):
        a, d1, d2 = act_derivatives(name, z, 3)
        ctx.save_for_backward(d1, d2)
        return a, d1

    @staticmethod
    def backward(ctx, g_act, g_slope):
        d1, d2 = ctx.saved_tensors
        return None, torch.addcmul(g_act * d1, g_slope, d2)


# The same functions for the chunked op: native kernels for the reads, and each (act, slope) pair as
# one autograd node with its analytic derivative (the plain-op form above builds ~10 nodes).
FAST_ACTIVATIONS = {
    "gelu": (torch.nn.functional.gelu, lambda z: _ActAndSlope.apply("gelu", z)),
    "silu": (torch.nn.functional.silu, lambda z: _ActAndSlope.apply("silu", z)),
}


def out_norm(z: torch.Tensor, norm_weight: torch.Tensor | None) -> torch.Tensor:
    """The optional output normalisation; z (..., H, T, K), norm_weight (H, K) or None."""
    if norm_weight is None:
        return z
    return z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + NORM_EPS) * norm_weight[:, None, :]


def mlp_forward(weights: Weights, x: torch.Tensor, act, norm_weight: torch.Tensor | None = None) -> torch.Tensor:
    """M_W(x): x (..., H, T, K), weights[l] (..., H, D_in, D_out) -> (..., H, T, K)."""
    h = x
    for l, w in enumerate(weights):
        h = h @ w
        if l < len(weights) - 1:
            h = act(h)
    return out_norm(h, norm_weight)


@dataclass
class MemoryState:
    """The memory of every (batch row, head) between two calls.

    weights:  W, the current weights, one (B, H, D_in, D_out) tensor per layer.
    momentum: S, the momentum ("past surprise"), same shapes.
    base:     the weights at the start of the current chunk, at which the
              gradients of the chunk's remaining tokens are taken; equal to
              `weights` when offset == 0.
    offset:   (B,) int64, tokens of the current chunk already consumed (0 ..
              chunk_size - 1). Carrying it makes a split at any token exact.
    """

    weights: Weights
    momentum: Weights
    base: Weights
    offset: torch.Tensor

    @staticmethod
    def initial(init_weights: Weights, batch: int) -> "MemoryState":
        """The state at a document start: W = W0 for every row, zero momentum."""
        w = tuple(w0.unsqueeze(0).expand(batch, *w0.shape) for w0 in init_weights)
        return MemoryState(w, tuple(torch.zeros_like(x) for x in w), w,
                           torch.zeros(batch, dtype=torch.long, device=init_weights[0].device))

    def detach(self) -> "MemoryState":
        d = lambda ws: tuple(w.detach() for w in ws)  # noqa: E731
        return MemoryState(d(self.weights), d(self.momentum), d(self.base), self.offset)

    def select(self, rows: torch.Tensor) -> "MemoryState":
        """The state of a subset of batch rows (e.g. beam or request reordering)."""
        s = lambda ws: tuple(w[rows] for w in ws)  # noqa: E731
        return MemoryState(s(self.weights), s(self.momentum), s(self.base), self.offset[rows])


# A pytree node, so that code walking a mixer's state (the trainer's tiles that carry it,
# train.tile_blocks) sees its tensors.
torch.utils._pytree.register_dataclass(MemoryState)
