"""`attn`: causal softmax attention (MHA/GQA) with RoPE and document masking.

Legend: B batch, T tokens, S cached + new tokens, D model width, H query
heads, G key/value heads, K head dim.

Layout matches Llama/Qwen2 in transformers (q_proj, k_proj, v_proj, o_proj;
rotate-half RoPE), so their checkpoints convert without permutation.
Decoding state: {"k": (B, S, G, K) post-RoPE keys, "v": (B, S, G, K),
"doc": (B, S) document index of each cached key}, plus "conv": (B, W-1, (H+2G)K)
with `conv_size` W > 1.

conv_size (default 0, off): a short causal depthwise conv over time on the q, k
and v projections, before the norms and RoPE, document-aware (conv.py). Each
key then carries its few previous tokens, so one layer can match "the token
after the earlier occurrence of this context" (induction) without first
learning a previous-token head in an earlier layer: Olsson et al.'s "smeared
keys", the short convs of H3/Based and Canon layers. It starts as the identity
(the layer is plain attention at initialisation). The attention family's
subclasses (swa, s2) inherit it.

Options for imported checkpoint families (each default is the Llama layout):
  out_bias       bias on o_proj (Llama/Qwen3/OLMo `attention_bias` biases q, k, v and o).
  qk_norm        RMSNorm on q and k before RoPE; `qk_norm_width` "head" normalises
                 each head over K (Qwen3, Gemma 3), "full" the whole projection over
                 H*K and G*K (OLMo 2/3); eps `qk_norm_eps`; the model's NormStyle.
  scale          attention logit scale; None: K^-1/2 (Gemma: query_pre_attn_scalar^-1/2).
  rope_fraction  rotate only the first int(K * rope_fraction) dims of each head.
  rope_config    this kind's own RoPE (a RopeConfig mapping); None: model.rope. Gemma 3
                 and OLMo 3 give their local (swa) and global (attn) layers different bases.
  gate_packing   where a Gated-Attention gate's weights live: "separate" (gate_proj,
                 D -> H or H*K), or packed into q_proj as checkpoints store them:
                 "head" q_proj rows per head [q_h (K), g_h (1 or K)] (Qwen3-Next,
                 Qwen3.5), "group" per KV group [q of its R = H/G heads (R*K),
                 their gates (R or R*K)] (the Gated Attention authors' code). The
                 three compute the same function; only the parameter layout differs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from loom.kernels.attention import attention
from loom.models.config import ranged
from loom.models.mixers.base import Mixer, MixerDims, SeqContext, register
from loom.models.mixers.conv import ShortConv, short_conv
from loom.models.mixers.heads import HeadOptions, HeadOutput, sink_mass
from loom.models.norms import RMSNorm
from loom.models.rope import RopeConfig, Rotary, apply_rotary


@dataclass
class AttnConfig(HeadOptions):
    qkv_bias: bool = False
    out_bias: bool = False
    qk_norm: bool = False
    qk_norm_width: Literal["head", "full"] = "head"
    qk_norm_eps: float = ranged(1e-6, gt=0)
    rope: bool = True
    rope_fraction: float = ranged(1.0, gt=0, le=1)
    rope_config: RopeConfig | None = None  # None: model.rope
    scale: float | None = ranged(None, gt=0)  # None: head_dim^-1/2
    gate_packing: Literal["separate", "head", "group"] = "separate"
    conv_size: int = ranged(0, ge=0)  # causal depthwise conv taps on q, k, v (0 or 1: none)


def continue_docs(state_doc: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Document index of new tokens that continue a cached row: the last cached
    document, plus one at every document start (position 0). (B, S0), (B, T) -> (B, T)."""
    last = state_doc[:, -1:] if state_doc.shape[1] else state_doc.new_zeros(position_ids.shape[0], 1)  # swa window 0
    return last + (position_ids == 0).long().cumsum(1)


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
        if cfg.conv_size < 0:
            raise ValueError(f"conv_size must be >= 0, got {cfg.conv_size}")
        if cfg.gate_packing != "separate" and cfg.gate == "none":
            raise ValueError(f"gate_packing {cfg.gate_packing!r} needs a gate (gate: headwise or elementwise)")
        self.scale = cfg.scale if cfg.scale is not None else K ** -0.5
        self.gate_width = 0 if cfg.gate_packing == "separate" else (1 if cfg.gate == "headwise" else K)
        self.q_proj = nn.Linear(D, H * (K + self.gate_width), bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(D, G * K, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(D, G * K, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(H * K, D, bias=cfg.out_bias)
        q_width, k_width = (H * K, G * K) if cfg.qk_norm_width == "full" else (K, K)
        self.q_norm = RMSNorm(q_width, cfg.qk_norm_eps, dims.norm) if cfg.qk_norm else None
        self.k_norm = RMSNorm(k_width, cfg.qk_norm_eps, dims.norm) if cfg.qk_norm else None
        self.rotary = Rotary(K, cfg.rope_config or dims.rope, cfg.rope_fraction) if cfg.rope else None
        self.conv = ShortConv((H + 2 * G) * K, cfg.conv_size, init="identity") if cfg.conv_size > 1 else None
        self.heads = HeadOutput(D, H, K, cfg, dims.layer_idx, packed_gate=self.gate_width > 0)

    def reset_parameters(self) -> None:
        if self.conv is not None:
            self.conv.reset_parameters()

    def project(self, x: torch.Tensor, ctx: SeqContext, state=None):
        """x (B, T, D) -> q (B, T, H, K), k and v (B, T, G, K) with RoPE applied, the
        gate logits packed in q_proj (B, T, H, 1 or K; None unless gate_packing packs
        them) and the conv's new decoding cache (None without a conv)."""
        B, T, _ = x.shape
        H, G, K = self.dims.n_heads, self.dims.n_kv_heads, self.dims.head_dim
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        gate = None
        if self.gate_width:
            q, gate = self.unpack_gate(q)
        conv_cache = None
        if self.conv is not None:
            qkv, conv_cache = short_conv(self.conv, torch.cat([q, k, v], dim=-1), ctx.position_ids,
                                         None if state is None else state["conv"], cp=ctx.cp)
            q, k, v = qkv.split([H * K, G * K, G * K], dim=-1)
        if self.q_norm is not None and self.cfg.qk_norm_width == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.reshape(B, T, -1, K), k.reshape(B, T, -1, K), v.reshape(B, T, -1, K)
        if self.q_norm is not None and self.cfg.qk_norm_width == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary is not None:
            cos, sin = self.rotary(ctx.position_ids)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return q, k, v, gate, conv_cache

    def unpack_gate(self, qg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q_proj's packed output (B, T, H (K + W)) -> q (B, T, H K), gate logits (B, T, H, W)."""
        B, T, _ = qg.shape
        H, G, K, W = self.dims.n_heads, self.dims.n_kv_heads, self.dims.head_dim, self.gate_width
        if self.cfg.gate_packing == "head":
            q, g = qg.view(B, T, H, K + W).split([K, W], dim=-1)  # (B, T, H, K), (B, T, H, W)
        else:  # per KV group of R = H / G heads: [q (R K), g (R W)]
            R = H // G
            q, g = qg.view(B, T, G, R * (K + W)).split([R * K, R * W], dim=-1)
        return q.reshape(B, T, H * K), g.reshape(B, T, H, W)

    def with_conv(self, new_state: dict, conv_cache) -> dict:
        """The decoding state plus the conv's cache when the layer has a conv."""
        if self.conv is not None:
            new_state["conv"] = conv_cache
        return new_state

    def forward(self, x: torch.Tensor, ctx: SeqContext, state=None):
        B, T, _ = x.shape
        q, k, v, gate, conv_cache = self.project(x, ctx, state)
        doc = ctx.seq_ids
        if state is not None:  # continue the cached rows; a position 0 starts a new document
            doc = torch.cat([state["doc"], continue_docs(state["doc"], ctx.position_ids)], dim=1)
            k = torch.cat([state["k"], k], dim=1)
            v = torch.cat([state["v"], v], dim=1)
        o = attention(q, k, v, seq_ids=doc, scale=self.scale, cp=ctx.cp)
        if ctx.stats is not None and state is None:
            _, lse = attention(q, k, v, seq_ids=doc, scale=self.scale, return_lse=True, cp=ctx.cp)
            ctx.stats[f"sink_mass/layer{self.dims.layer_idx}"] = sink_mass(
                q, k, lse, ctx.position_ids, self.scale)
        y = self.o_proj(self.heads(x, o, ctx, gate).reshape(B, T, -1))
        new_state = None
        if ctx.want_state:
            if doc is None:
                doc = torch.zeros(B, k.shape[1], dtype=torch.long, device=x.device)
            new_state = self.with_conv({"k": k, "v": v, "doc": doc}, conv_cache)
        return y, new_state

    def mixing_flops_per_token(self, seq_len: int) -> float:
        # QK^T and AV: 2 matmuls x 2 FLOPs x K per visible key per head.
        visible = (seq_len + 1) / 2 if self.window is None else min(self.window + 1, (seq_len + 1) / 2)
        return 4 * self.dims.n_heads * self.dims.head_dim * visible

    def state_bytes(self, seq_len: int, bytes_per_elem: int = 2) -> int:
        kept = seq_len if self.window is None else min(seq_len, self.window)
        return 2 * kept * self.dims.n_kv_heads * self.dims.head_dim * bytes_per_elem
