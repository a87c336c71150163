"""`attn`: causal softmax attention (MHA/GQA) with RoPE and document masking.

Legend: B batch, T tokens, S cached + new tokens, D model width, H query
heads, G key/value heads, K head dim.

Layout matches Llama/Qwen2 in transformers (q_proj, k_proj, v_proj, o_proj;
rotate-half RoPE), so their checkpoints convert without permutation.
Decoding state: {"k": (B, S, G, K) post-RoPE keys, "v": (B, S, G, K),
"doc": (B, S) document index of each cached key}.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from loom.kernels.attention import attention
from loom.models.mixers.base import Mixer, MixerDims, SeqContext, register
from loom.models.mixers.heads import HeadOptions, HeadOutput, sink_mass
from loom.models.norms import RMSNorm
from loom.models.rope import Rotary, apply_rotary


@dataclass
class AttnConfig(HeadOptions):
    qkv_bias: bool = False
    qk_norm: bool = False
    rope: bool = True


def continue_docs(state_doc: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Document index of new tokens that continue a cached row: the last cached
    document, plus one at every document start (position 0). (B, S0), (B, T) -> (B, T)."""
    return state_doc[:, -1:] + (position_ids == 0).long().cumsum(1)


@register("attn")
class Attention(Mixer):
    Config = AttnConfig
    cp_impls = ("ring", "ulysses")  # what the attention op runs under cp (ring or Ulysses)
    window: int | None = None

    def __init__(self, dims: MixerDims, cfg: AttnConfig):
        super().__init__(dims, cfg)
        D, H, G, K = dims.d_model, dims.n_heads, dims.n_kv_heads, dims.head_dim
        if H % G:
            raise ValueError(f"n_heads ({H}) must be a multiple of n_kv_heads ({G})")
        self.q_proj = nn.Linear(D, H * K, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(D, G * K, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(D, G * K, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(H * K, D, bias=False)
        self.q_norm = RMSNorm(K, 1e-6) if cfg.qk_norm else None
        self.k_norm = RMSNorm(K, 1e-6) if cfg.qk_norm else None
        self.rotary = Rotary(K, dims.rope) if cfg.rope else None
        self.heads = HeadOutput(D, H, K, cfg, dims.layer_idx)

    def project(self, x: torch.Tensor, ctx: SeqContext):
        """x (B, T, D) -> q (B, T, H, K), k and v (B, T, G, K), RoPE applied."""
        B, T, _ = x.shape
        K = self.dims.head_dim
        q = self.q_proj(x).view(B, T, -1, K)
        k = self.k_proj(x).view(B, T, -1, K)
        v = self.v_proj(x).view(B, T, -1, K)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary is not None:
            cos, sin = self.rotary(ctx.position_ids)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return q, k, v

    def forward(self, x: torch.Tensor, ctx: SeqContext, state=None):
        B, T, _ = x.shape
        q, k, v = self.project(x, ctx)
        doc = ctx.seq_ids
        if state is not None:  # continue the cached rows; a position 0 starts a new document
            doc = torch.cat([state["doc"], continue_docs(state["doc"], ctx.position_ids)], dim=1)
            k = torch.cat([state["k"], k], dim=1)
            v = torch.cat([state["v"], v], dim=1)
        o = attention(q, k, v, seq_ids=doc, cp=ctx.sharding)
        if ctx.stats is not None and state is None:
            _, lse = attention(q, k, v, seq_ids=doc, return_lse=True, cp=ctx.sharding)
            ctx.stats[f"sink_mass/layer{self.dims.layer_idx}"] = sink_mass(
                q, k, lse, ctx.position_ids, 1 / math.sqrt(self.dims.head_dim))
        y = self.o_proj(self.heads(x, o, ctx).reshape(B, T, -1))
        new_state = None
        if ctx.want_state:
            if doc is None:
                doc = torch.zeros(B, k.shape[1], dtype=torch.long, device=x.device)
            new_state = {"k": k, "v": v, "doc": doc}
        return y, new_state

    def mixing_flops_per_token(self, seq_len: int) -> float:
        # QK^T and AV: 2 matmuls x 2 FLOPs x K per visible key per head.
        visible = (seq_len + 1) / 2 if self.window is None else min(self.window + 1, (seq_len + 1) / 2)
        return 4 * self.dims.n_heads * self.dims.head_dim * visible

    def state_bytes(self, seq_len: int, bytes_per_elem: int = 2) -> int:
        kept = seq_len if self.window is None else min(seq_len, self.window)
        return 2 * kept * self.dims.n_kv_heads * self.dims.head_dim * bytes_per_elem
