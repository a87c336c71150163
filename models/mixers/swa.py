"""`swa`: sliding-window causal attention (MHA/GQA, RoPE, documents).

Legend: B batch, T tokens in this call, S cached + new tokens, D model width,
H query heads, G key/value heads, K head dim, W the window.

The `attn` mixer with a window: key j is visible to query i when
0 <= i - j <= W (the token itself plus W past tokens, RAT's convention) and
both are in the same document. transformers counts the query in its
`sliding_window` (key j visible when i - j < sliding_window): its sliding_window N
is window N - 1 here. The op is loom.kernels.swa: banded on CPU (linear in
T), flash-attn's window on CUDA, halo exchange under context parallelism.

Decoding state: {"k": (B, <= W, G, K) post-RoPE keys, "v": same, "doc":
(B, <= W) int64 document index}; a ring buffer of the last W tokens (a later
query never sees further back), so the cache is W / T of attention's. "doc"
lets a call that continues a row start new documents (position_ids == 0)
without seeing the cached ones.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from loom.kernels.swa import sliding_window_attention
from loom.models.config import ranged
from loom.models.mixers.attn import AttnConfig, Attention, continue_docs
from loom.models.mixers.base import MixerDims, SeqContext, register
from loom.models.mixers.heads import sink_mass


@dataclass
class SWAConfig(AttnConfig):
    window: int = ranged(256, ge=0)  # tokens behind the query that stay visible (transformers' sliding_window - 1)

    def __post_init__(self):
        if self.window < 0:
            raise ValueError(f"window must be >= 0; got {self.window}")


@register("swa")
class SlidingWindowAttention(Attention):
    Config = SWAConfig
    # Under either cp_impl the op runs the halo exchange.
    cp_impls = ("ring", "ulysses")

    def __init__(self, dims: MixerDims, cfg: SWAConfig):
        super().__init__(dims, cfg)
        self.window = cfg.window

    def reach(self) -> int | None:
        # MoH's load-balancing loss is a mean over the whole row: not tileable
        # (with a conv, a key also reads the conv_size - 1 inputs before it)
        return None if self.row_losses() else self.window + (self.conv.taps - 1 if self.conv is not None else 0)

    def forward(self, x: torch.Tensor, ctx: SeqContext, state=None):
        B, T, _ = x.shape
        W = self.window
        q, k, v, gate, conv_cache = self.project(x, ctx, state)
        doc = ctx.seq_ids
        if state is not None:
            doc = torch.cat([state["doc"], continue_docs(state["doc"], ctx.position_ids)], dim=1)[:, -(W + T):]
            k = torch.cat([state["k"], k], dim=1)[:, -(W + T):]
            v = torch.cat([state["v"], v], dim=1)[:, -(W + T):]
        want_lse = ctx.stats is not None and state is None
        o = sliding_window_attention(q, k, v, window=W, seq_ids=doc, scale=self.scale, return_lse=want_lse,
                                     cp=ctx.cp)
        if want_lse:
            o, lse = o
            visible = (ctx.position_ids <= W)[:, :, None].expand(-1, -1, q.shape[2])  # first token in window
            ctx.stats[f"sink_mass/layer{self.dims.layer_idx}"] = sink_mass(
                q, k, lse, ctx.position_ids, self.scale, visible=visible)
        o = self.heads(x, o, ctx, gate)
        y = self.o_proj(o.reshape(B, T, -1))
        new_state = None
        if ctx.want_state:
            keep = min(k.shape[1], W)
            if doc is None:
                doc = torch.zeros(B, k.shape[1], dtype=torch.long, device=x.device)
            first = k.shape[1] - keep  # window 0 keeps nothing (a slice from -0 would keep all)
            new_state = self.with_conv({"k": k[:, first:], "v": v[:, first:], "doc": doc[:, first:]}, conv_cache)
        return y, new_state
