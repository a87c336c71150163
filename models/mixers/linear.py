"""`linear`: lightning-style causal linear attention with per-head decay (TNL block).

Legend: B batch, T tokens, D model width, H heads, K head dim.

The TransNormerLLM / TNL attention (OpenNLPLab/lightning-attention examples/module/tnl_attn.py):
    q, k, v = SiLU(x W_q), SiLU(x W_k), SiLU(x W_v)           (B, T, H, K) each
    o       = linear attention with decay lambda_h = exp(-s_h)  (loom.kernels.linear)
    o       = norm(o)                                           (the operator has no denominator)
    o       = o * sigmoid(x W_a W_b)                            (low-rank output gate, rank K)
    y       = o_proj(o)
Slopes s_h are ALiBi's, scaled per layer by (1 - l / (n_layers - 1) + 1e-5) as
TNL, so deeper layers forget more slowly.

`norm` picks the normalisation of o:
    "head_rms"  (default) an RMSNorm over each head's K channels, weight (K,) shared by heads;
    "layernorm" TNL's: a LayerNorm over the full H K width, weight and bias (H K,).
With norm: layernorm, qk_scale: false (and H K = D) the layer computes TNL's module
exactly (tests/models/test_linear_tnl.py); the default differs from TNL in the norm.

q is scaled by K^-1/2 (TNL has no scale) unless qk_scale is false: either norm after
the operator makes the forward independent of that factor up to its eps, and the
smaller state is the fix reported for overflow in lightning-attention issue #17.
All H heads have their own k and v (n_kv_heads is not used): the state is
H x K x K whatever the grouping.

Decoding state: {"kv": (B, H, K, K) fp32}, constant in the sequence length.

Context parallelism (ctx.cp, passed to the op): a
prefix scan of the pieces' states across ranks (the same for either cp_impl).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from loom.kernels.linear import alibi_slopes, linear_attention
from loom.models.config import ranged
from loom.models.mixers.base import Mixer, MixerDims, SeqContext, register
from loom.models.norms import RMSNorm


@dataclass
class LinearConfig:
    block: int = ranged(64, ge=1)  # tokens per tile of the chunked kernel (Lightning Attention-2 uses 64)
    output_gate: Literal["lowrank", "full", "none"] = "lowrank"
    gate_rank: int = ranged(0, ge=0)  # rank of the low-rank gate; 0: head_dim (TNL)
    layer_decay: bool = True  # TNL's per-layer scaling of the slopes
    qk_scale: bool = True  # multiply q by head_dim^-1/2
    norm: Literal["head_rms", "layernorm"] = "head_rms"  # per-head RMSNorm, or TNL's LayerNorm over H K
    norm_eps: float = ranged(1e-5, gt=0)

    def __post_init__(self):
        if self.block < 1:
            raise ValueError(f"block must be >= 1; got {self.block}")
        if self.gate_rank < 0:
            raise ValueError(f"gate_rank must be >= 0; got {self.gate_rank}")


@register("linear")
class LinearAttention(Mixer):
    Config = LinearConfig
    cp_impls = ("ring", "ulysses")  # the op runs the same state scan under either

    def __init__(self, dims: MixerDims, cfg: LinearConfig):
        super().__init__(dims, cfg)
        D, H, K = dims.d_model, dims.n_heads, dims.head_dim
        self.q_proj = nn.Linear(D, H * K, bias=False)
        self.k_proj = nn.Linear(D, H * K, bias=False)
        self.v_proj = nn.Linear(D, H * K, bias=False)
        self.norm = RMSNorm(K, cfg.norm_eps) if cfg.norm == "head_rms" else nn.LayerNorm(H * K, eps=cfg.norm_eps)
        if cfg.output_gate == "lowrank":
            rank = cfg.gate_rank or K
            self.gate = nn.Sequential(nn.Linear(D, rank, bias=False), nn.Linear(rank, H * K, bias=False))
        elif cfg.output_gate == "full":
            self.gate = nn.Linear(D, H * K, bias=False)
        else:
            self.gate = None
        self.o_proj = nn.Linear(H * K, D, bias=False)
        self.register_buffer("decay", self._slopes(), persistent=False)

    def _slopes(self) -> torch.Tensor:
        slopes = alibi_slopes(self.dims.n_heads)
        n, i = self.dims.n_layers, self.dims.layer_idx
        if self.cfg.layer_decay and n > 1:
            slopes = slopes * (1 - i / (n - 1) + 1e-5)
        return slopes

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The decay rates are a fixed buffer (ALiBi slopes, TNL layer scaling); refilled here
        so that a model built on the meta device gets them at initialisation."""
        self.decay = self._slopes().to(self.q_proj.weight.device)
        if isinstance(self.norm, nn.LayerNorm):  # weight 1, bias 0 (HybridLM.init_weights fills only RMSNorms)
            self.norm.reset_parameters()

    def forward(self, x: torch.Tensor, ctx: SeqContext, state=None):
        B, T, _ = x.shape
        H, K = self.dims.n_heads, self.dims.head_dim
        q = F.silu(self.q_proj(x)).view(B, T, H, K)
        k = F.silu(self.k_proj(x)).view(B, T, H, K)
        v = F.silu(self.v_proj(x)).view(B, T, H, K)
        scale = K ** -0.5 if self.cfg.qk_scale else 1.0
        o, kv = linear_attention(q, k, v, self.decay, block=self.cfg.block, reset=ctx.doc_starts,
                                 initial_state=None if state is None else state["kv"], return_state=True,
                                 scale=scale, cp=ctx.cp)
        o = self.norm(o) if self.cfg.norm == "head_rms" else self.norm(o.reshape(B, T, H * K))
        o = o.reshape(B, T, H * K)
        if self.gate is not None:
            o = o * torch.sigmoid(self.gate(x))
        y = self.o_proj(o)
        return y, ({"kv": kv} if ctx.want_state else None)

    def mixing_flops_per_token(self, seq_len: int) -> float:
        # Per head: the in-block q k^T and scores x v over a whole tile (2 x 2 x K x block),
        # the read of the carried state and the state update (2 x 2 x K x K).
        H, K = self.dims.n_heads, self.dims.head_dim
        block = min(self.cfg.block, seq_len)
        return H * (4 * K * block + 4 * K * K)

    def state_bytes(self, seq_len: int, bytes_per_elem: int = 2) -> int:
        # One K x K state per head, kept in fp32 whatever the model dtype; independent of seq_len.
        return self.dims.n_heads * self.dims.head_dim ** 2 * 4
