"""The residual block of HybridLM: a mixer sublayer and an MLP sublayer.

Legend: B batch, T tokens, D model width.

Norm placement (`model.norm_placement`), for each sublayer f (mixer, then MLP):
    pre       x + f(norm(x))                  Llama, Qwen, Mistral (the default)
    post      x + norm(f(x))                  OLMo 2/3: the norm acts on the sublayer's output
    sandwich  x + post_norm(f(pre_norm(x)))   Gemma 2/3
`model.norm_placements` gives a layer kind its own placement (OLMo-hybrid: its attention
layers post-norm, its GDN layers pre-norm).
Parameter names: `mixer_norm` / `mlp_norm` are the norms before a sublayer,
`mixer_post_norm` / `mlp_post_norm` the norms after it.

A block may hold only one sublayer: the layer kind `mlp` in model.layers is an
MLP-only block (its mixer is `NoMixer`), and `model.block_mlp: false` makes every
mixer block mixer-only (its MLP is `NoMLP`), as in Nemotron-H, whose layer list
interleaves mamba, attention and MLP layers. The null sublayers keep the same
attribute names, so code that walks `block.mixer` / `block.mlp` (tiling, cp
checks, state rebuilding) needs no special case.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from loom.models.mixers import MIXERS, Mixer, MixerDims, SeqContext
from loom.models.norms import NormStyle, RMSNorm, build_mlp

MLP_ONLY = "mlp"  # the layer kind of an MLP-only block
PLACEMENTS = ("pre", "post", "sandwich")


class NoMixer(Mixer):
    """The mixer of an MLP-only block: no update, no state, no parameters. It is
    still called (with the block's input), so hooks on block.mixer see the input."""

    kind: ClassVar[str] = MLP_ONLY
    cp_impls = ("ring", "ulysses")  # nothing to shard: exact under any cp algorithm

    def forward(self, x: torch.Tensor, ctx: SeqContext, state=None):
        return None, None

    def reach(self) -> int | None:
        return 0


class NoMLP(nn.Module):
    """The MLP of a mixer-only block: never called by the block."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("NoMLP is the MLP of a mixer-only block; it is not called")


class Block(nn.Module):
    """One layer. forward(x (B, T, D), ctx, state) -> (x (B, T, D), the mixer's new state).

    Example:
        block = Block("attn", dims, opts, hidden=688, eps=1e-6, placement="sandwich")
        x, state = block(x, ctx)
    """

    def __init__(self, kind: str, dims: MixerDims, opts: Any, hidden: int, eps: float,
                 placement: str = "pre", mlp_kind: str = "swiglu", mlp_bias: bool = False,
                 has_mlp: bool = True, norm: NormStyle = NormStyle()):
        super().__init__()
        if placement not in PLACEMENTS:
            raise ValueError(f"norm placement must be one of {PLACEMENTS}; got {placement!r}")
        self.kind = kind
        D = dims.d_model
        has_mixer = kind != MLP_ONLY
        has_mlp = has_mlp or not has_mixer

        def norms(on: bool) -> tuple[RMSNorm | None, RMSNorm | None]:
            pre = RMSNorm(D, eps, norm) if on and placement in ("pre", "sandwich") else None
            post = RMSNorm(D, eps, norm) if on and placement in ("post", "sandwich") else None
            return pre, post

        self.mixer_norm, self.mixer_post_norm = norms(has_mixer)
        self.mixer = MIXERS[kind](dims, opts) if has_mixer else NoMixer(dims, None)
        self.mlp_norm, self.mlp_post_norm = norms(has_mlp)
        self.mlp = build_mlp(mlp_kind, D, hidden, mlp_bias) if has_mlp else NoMLP()
        self.has_mlp = has_mlp

    @staticmethod
    def _sublayer(f, x: torch.Tensor, pre: RMSNorm | None, post: RMSNorm | None) -> torch.Tensor:
        y = f(x if pre is None else pre(x))
        return x + (y if post is None else post(y))

    def forward(self, x: torch.Tensor, ctx: SeqContext, state=None):
        h = x if self.mixer_norm is None else self.mixer_norm(x)
        y, new_state = self.mixer(h, ctx, state)
        if y is not None:
            x = x + (y if self.mixer_post_norm is None else self.mixer_post_norm(y))
        if self.has_mlp:
            x = self._sublayer(self.mlp, x, self.mlp_norm, self.mlp_post_norm)
        return x, new_state
