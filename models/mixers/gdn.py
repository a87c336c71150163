"""`gdn`: Gated DeltaNet, the linear layer of Qwen3.5 / Qwen3-Next (and OLMo-hybrid).

Legend: B batch, T tokens, D model width, HK q/k heads, HV value heads (HV % HK == 0),
K key head dim, V value head dim, W conv taps, C = 2 HK K + HV V conv channels.

As transformers' Qwen3_5GatedDeltaNet / Qwen3NextGatedDeltaNet:
    q, k, v = split(SiLU(causal depthwise conv(x W_qkv)))        (B, T, HK, K), (B, T, HK, K), (B, T, HV, V)
    z       = x W_z                                              (B, T, HV, V) output gate
    beta    = sigmoid(x W_b)                (beta: "sigmoid2": 2 sigmoid(x W_b) in (0, 2), OLMo-hybrid's
                                             allow_neg_eigval)
    g       = -exp(A_log) * softplus(x W_a + dt_bias)            (B, T, HV) log-decay
    o       = gated_delta_rule(q, k, v, g, beta, l2-normalised q/k, scale K^-1/2)   (loom.kernels)
    y       = out_proj(RMSNorm_V(o) * norm.weight * SiLU(z))     per-head gated RMSNorm

Weights map one to one onto transformers' names: in_proj_qkv, in_proj_z, in_proj_b, in_proj_a,
dt_bias, A_log, norm.weight, out_proj as Qwen3.5; conv1d.weight is (C, W) with weight[:, j]
multiplying x_{t-j}, i.e. HF's conv1d.weight (C, 1, W) as weight[:, 0].flip(-1). Qwen3-Next packs
in_proj_qkvz / in_proj_ba per key head ([q, k, v_group, z_group] of each of the HK heads): the
importer un-interleaves them into these four matrices. OLMo-hybrid's q/k/v_proj (concatenated
into in_proj_qkv), g_proj (= in_proj_z), a_proj, b_proj, conv1d, o_norm (= norm) and o_proj (=
out_proj) map the same way, with beta: sigmoid2 and norm_eps: 1e-5 (tests/models/test_gdn_parity.py
checks all three layers).
The conv keeps documents apart (models/mixers/conv.py), as does the op (seq_ids).

Decoding state: {"conv": (B, W-1, C) the last pre-conv projections, "recurrent": (B, HV, K, V)
fp32}, constant in the sequence length. A continuation whose first token is a document start
(position 0) drops the recurrent state (the conv's taps stop there too).

Context parallelism (ctx.cp, passed on as `cp`): the conv takes its W-1 previous inputs
from the preceding chunk's rank, and the op composes the pieces' affine state maps across ranks
(kernels/gated_delta_rule/cp.py); the same for either cp_impl.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from loom.kernels.gated_delta_rule import gated_delta_rule
from loom.models.config import ranged
from loom.models.mixers.base import Mixer, MixerDims, SeqContext, register
from loom.models.mixers.conv import ShortConv, short_conv


@dataclass
class GDNConfig:
    n_v_heads: int = ranged(0, ge=0)     # value heads HV (linear_num_value_heads); 0: model.n_heads
    n_k_heads: int = ranged(0, ge=0)     # query/key heads HK (linear_num_key_heads), dividing HV; 0: HV
    head_k_dim: int = ranged(0, ge=0)    # K (linear_key_head_dim); 0: model head_dim
    head_v_dim: int = ranged(0, ge=0)    # V (linear_value_head_dim); 0: model head_dim
    conv_size: int = ranged(4, ge=1)     # taps of the causal depthwise conv on q, k, v (linear_conv_kernel_dim)
    beta: Literal["sigmoid", "sigmoid2"] = "sigmoid"  # sigmoid2: 2 sigmoid(b), OLMo-hybrid's negative eigenvalues
    norm_eps: float = ranged(1e-6, gt=0)  # gated RMSNorm epsilon (Qwen: rms_norm_eps; OLMo-hybrid: 1e-5)
    chunk: int = ranged(64, ge=1)        # tokens per chunk of the CPU chunked form
    impl: Literal["auto", "chunked", "fla", "reference"] = "auto"  # loom.kernels.gated_delta_rule backend

    def __post_init__(self):
        if min(self.n_v_heads, self.n_k_heads, self.head_k_dim, self.head_v_dim) < 0:
            raise ValueError("model.mixers.gdn: head counts and dims must be >= 0 (0: the model's)")
        if self.conv_size < 1 or self.chunk < 1:
            raise ValueError(f"model.mixers.gdn: conv_size and chunk must be >= 1; got {self.conv_size}, {self.chunk}")


class GatedRMSNorm(nn.Module):
    """Per-head RMSNorm of o, times weight, times SiLU(z): Qwen3-Next's RMSNormGated (norm before gate).
    o, z: (..., V) -> (..., V); the norm is taken in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, o: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dt = o.dtype
        of = o.to(torch.promote_types(dt, torch.float32))
        of = of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + self.eps)
        return ((self.weight * of.to(dt)) * F.silu(z.to(of.dtype))).to(dt)


@register("gdn")
class GatedDeltaNet(Mixer):
    Config = GDNConfig
    cp_impls = ("ring", "ulysses")  # the op composes the pieces' state maps under either

    def __init__(self, dims: MixerDims, cfg: GDNConfig):
        super().__init__(dims, cfg)
        D = dims.d_model
        self.HV = cfg.n_v_heads or dims.n_heads
        self.HK = cfg.n_k_heads or self.HV
        self.K = cfg.head_k_dim or dims.head_dim
        self.V = cfg.head_v_dim or dims.head_dim
        if self.HV % self.HK:
            raise ValueError(f"model.mixers.gdn: n_v_heads = {self.HV} must be a multiple of n_k_heads = {self.HK}")
        key, value = self.HK * self.K, self.HV * self.V
        self.in_proj_qkv = nn.Linear(D, 2 * key + value, bias=False)
        self.in_proj_z = nn.Linear(D, value, bias=False)
        self.in_proj_b = nn.Linear(D, self.HV, bias=False)
        self.in_proj_a = nn.Linear(D, self.HV, bias=False)
        self.conv1d = ShortConv(2 * key + value, cfg.conv_size)
        self.dt_bias = nn.Parameter(torch.empty(self.HV))
        self.A_log = nn.Parameter(torch.empty(self.HV))
        self.norm = GatedRMSNorm(self.V, cfg.norm_eps)
        self.out_proj = nn.Linear(value, D, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A = exp(A_log) ~ U(1, 16) per head; dt_bias = softplus^-1(dt), dt log-uniform in
        [1e-3, 1e-1] (fla's and OLMo-hybrid's GatedDeltaNet, Mamba-2's dt); the conv: nn.Conv1d's
        default; the norm weight 1 (the projections are the model's N(0, init_std))."""
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1.0, 16.0).log())
        dt = torch.exp(torch.empty_like(self.dt_bias).uniform_(math.log(1e-3), math.log(1e-1))).clamp_min(1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.conv1d.reset_parameters()
        self.norm.weight.fill_(1.0)

    def forward(self, x: torch.Tensor, ctx: SeqContext, state=None):
        B, T, _ = x.shape
        HK, HV, K, V = self.HK, self.HV, self.K, self.V
        cp = ctx.cp
        pos = ctx.position_ids
        qkv, conv_cache = short_conv(self.conv1d, self.in_proj_qkv(x), pos, None if state is None else state["conv"],
                                     cp=cp)
        q, k, v = F.silu(qkv).split([HK * K, HK * K, HV * V], dim=-1)
        q, k, v = q.view(B, T, HK, K), k.view(B, T, HK, K), v.view(B, T, HV, V)
        ft = torch.promote_types(x.dtype, torch.float32)
        beta = torch.sigmoid(self.in_proj_b(x).to(ft))
        if self.cfg.beta == "sigmoid2":
            beta = 2.0 * beta
        g = -self.A_log.to(ft).exp() * F.softplus(self.in_proj_a(x).to(ft) + self.dt_bias.to(ft))  # (B, T, HV)
        init = None
        if state is not None:  # a row that opens with a document start sees nothing from before
            init = state["recurrent"] * (pos[:, 0] > 0).to(state["recurrent"].dtype)[:, None, None, None]
        seq_ids = ctx.seq_ids if cp is not None else ctx.doc_starts.long().cumsum(1)
        o, S = gated_delta_rule(q, k, v, g, beta, initial_state=init, seq_ids=seq_ids, use_qk_l2norm=True,
                                return_state=True, cp=cp, impl=self.cfg.impl, chunk=self.cfg.chunk)
        o = self.norm(o, self.in_proj_z(x).view(B, T, HV, V))
        y = self.out_proj(o.reshape(B, T, HV * V))
        return y, ({"conv": conv_cache, "recurrent": S} if ctx.want_state else None)

    def mixing_flops_per_token(self, seq_len: int) -> float:
        # Per value head and token of the chunked form (C = chunk): k k^T and q k^T in the chunk
        # (2 x 2 C K), the triangular solve for [beta v, beta k] (C (V + K)), the in-chunk output
        # (2 C V), and the state read, the new values' correction and the state update (3 x 2 K V).
        C = min(self.cfg.chunk, seq_len)
        K, V = self.K, self.V
        return self.HV * (4 * C * K + C * (V + K) + 2 * C * V + 6 * K * V)

    def state_bytes(self, seq_len: int, bytes_per_elem: int = 2) -> int:
        conv = (self.cfg.conv_size - 1) * (2 * self.HK * self.K + self.HV * self.V) * bytes_per_elem
        return conv + self.HV * self.K * self.V * 4  # the recurrent state is fp32 whatever the model dtype
