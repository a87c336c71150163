"""`mamba2`: the Mamba-2 mixer of Nemotron-H, Bamba and Granite-4.0-H (SSD, scalar decay per head).

Legend: B batch, T tokens, D model width, E = expand * D inner width, H heads, P head dim
(E = H P), G groups, N state size, W conv taps, X = E + 2 G N conv channels.

As transformers' NemotronHMamba2Mixer / BambaMixer (their torch_forward), one to one:
    z, xBC, dt = in_proj(u)                       (B, T, E), (B, T, X), (B, T, H)
    xBC        = SiLU(conv1d(xBC) + bias)         causal depthwise, W taps, per document
    x, B, C    = split(xBC)                       (B, T, H, P), (B, T, G, N), (B, T, G, N)
    y          = SSD(x, dt, A = -exp(A_log), B, C) + D x,  dt = softplus(dt + dt_bias) in dt_limit
    y          = norm(y * SiLU(z))                RMSNorm over each of the G groups of E / G channels
    out        = out_proj(y)
Head h reads group h // (H / G), as in transformers (B.repeat_interleave over heads).

Parameters and their transformers names: in_proj.weight (2E + 2GN + H, D), conv1d.weight
(X, W) with conv1d.weight[:, j] multiplying x_{t-j} (transformers: (X, 1, W) in the
opposite tap order, i.e. ours = theirs[:, 0].flip(-1)), conv1d.bias (X,), dt_bias (H,),
A_log (H,), D (H,), norm.weight (E,), out_proj.weight (D, E); in_proj / out_proj biases
with `bias: true`.

Decoding state: {"conv": (B, W-1, X) the last conv inputs, "ssm": (B, H, P, N) fp32},
constant in the sequence length. Documents: the conv never reaches into an earlier
document (conv.py) and the SSM state is dropped at every document start (ctx.doc_starts).
Context parallelism (ctx.cp): the conv takes a W-1 token halo from the previous
chunk's owner; the op exchanges each piece's (transition, offset) (kernels/ssd/cp.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from loom.kernels.ssd import ssd
from loom.models.config import ranged
from loom.models.mixers.base import Mixer, MixerDims, SeqContext, register
from loom.models.mixers.conv import ShortConv, short_conv


@dataclass
class Mamba2Config:
    d_state: int = ranged(128, ge=1)  # N, the state size per head (Nemotron-H, Bamba: 128)
    d_conv: int = ranged(4, ge=1)  # W, taps of the causal conv over xBC
    expand: int = ranged(2, ge=1)  # E = expand * d_model
    head_dim: int = ranged(64, ge=1)  # P; heads H = E / P
    n_heads: int = ranged(0, ge=0)  # 0: E / head_dim; else H, and E = H * head_dim (Nemotron-H's mamba_num_heads)
    n_groups: int = ranged(1, ge=1)  # G groups sharing B and C (Bamba 1, Nemotron-H 8)
    chunk: int = ranged(64, ge=1)  # tokens per chunk of the CPU chunked kernel
    dt_min: float = ranged(0.001, gt=0)  # dt_bias initialisation: softplus(dt_bias) log-uniform in [dt_min, dt_max]
    dt_max: float = ranged(0.1, gt=0)
    dt_init_floor: float = ranged(1e-4, gt=0)
    dt_limit: list[float] = ranged(factory=lambda: [0.0, math.inf], ge=0, finite=False)  # clamp of dt after softplus
    A_init_range: list[float] = ranged(factory=lambda: [1.0, 16.0], gt=0)  # A = -exp(A_log), -A uniform here
    conv_bias: bool = True
    bias: bool = False  # biases of in_proj and out_proj (transformers' use_bias)
    norm_eps: float = ranged(1e-5, gt=0)
    impl: Literal["auto", "chunked", "fla", "reference"] = "auto"  # the ssd op's backend

    def __post_init__(self):
        for name in ("d_state", "d_conv", "expand", "head_dim", "n_groups", "chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.n_heads < 0:
            raise ValueError(f"n_heads must be >= 0; got {self.n_heads}")
        if len(self.dt_limit) != 2 or not 0.0 <= self.dt_limit[0] <= self.dt_limit[1]:
            raise ValueError(f"dt_limit must be [low, high] with 0 <= low <= high; got {self.dt_limit}")
        if not 0.0 < self.dt_min <= self.dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max; got {self.dt_min}, {self.dt_max}")
        if len(self.A_init_range) != 2 or not 0.0 < self.A_init_range[0] <= self.A_init_range[1]:
            raise ValueError(f"A_init_range must be [low, high] with 0 < low <= high; got {self.A_init_range}")


class GatedGroupRMSNorm(nn.Module):
    """norm(y * SiLU(z)): RMS over each group of `group` channels, then weight (transformers'
    MambaRMSNormGated with n_groups). Computed in fp32 (fp64 for fp64 inputs)."""

    def __init__(self, dim: int, group: int, eps: float):
        super().__init__()
        self.group, self.eps = group, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        cd = torch.float64 if y.dtype == torch.float64 else torch.float32
        h = y.to(cd) * F.silu(z.to(cd))
        hg = h.view(*h.shape[:-1], -1, self.group)  # (..., G, E / G)
        hg = hg * torch.rsqrt(hg.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * hg.view_as(h).to(y.dtype)


@register("mamba2")
class Mamba2(Mixer):
    Config = Mamba2Config
    cp_impls = ("ring", "ulysses")  # the op exchanges piece states under either

    def __init__(self, dims: MixerDims, cfg: Mamba2Config):
        super().__init__(dims, cfg)
        D = dims.d_model
        if cfg.n_heads:
            self.n_heads, self.d_inner = cfg.n_heads, cfg.n_heads * cfg.head_dim
        else:
            if (cfg.expand * D) % cfg.head_dim:
                raise ValueError(f"model.mixers.mamba2: expand * d_model = {cfg.expand * D} is not a multiple of "
                                 f"head_dim = {cfg.head_dim}")
            self.n_heads, self.d_inner = cfg.expand * D // cfg.head_dim, cfg.expand * D
        H, E, G, N = self.n_heads, self.d_inner, cfg.n_groups, cfg.d_state
        if H % G:
            raise ValueError(f"model.mixers.mamba2: n_groups = {G} must divide the {H} heads")
        self.conv_dim = E + 2 * G * N
        self.in_proj = nn.Linear(D, E + self.conv_dim + H, bias=cfg.bias)
        self.conv1d = ShortConv(self.conv_dim, cfg.d_conv, bias=cfg.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.A_log = nn.Parameter(torch.empty(H))
        self.D = nn.Parameter(torch.empty(H))
        self.norm = GatedGroupRMSNorm(E, E // G, cfg.norm_eps)
        self.out_proj = nn.Linear(E, D, bias=cfg.bias)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Mamba-2's initialisation (in_proj / out_proj come from HybridLM.init_weights):
        conv1d uniform(+-1/sqrt(W)); A_log = log(a), a ~ U(A_init_range); D = 1; norm weight 1;
        dt_bias = softplus^-1(dt), dt = max(exp(U(log dt_min, log dt_max)), dt_init_floor)."""
        cfg = self.cfg
        self.conv1d.reset_parameters()
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(*cfg.A_init_range).log())
        self.D.fill_(1.0)
        self.norm.weight.fill_(1.0)
        u = torch.rand_like(self.dt_bias)
        dt = torch.exp(u * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
        dt = dt.clamp(min=cfg.dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1

    def forward(self, x: torch.Tensor, ctx: SeqContext, state=None):
        Bt, T, _ = x.shape
        cfg, H, E = self.cfg, self.n_heads, self.d_inner
        G, N, P = cfg.n_groups, cfg.d_state, cfg.head_dim
        z, xBC, dt = self.in_proj(x).split([E, self.conv_dim, H], dim=-1)
        xBC, conv_cache = short_conv(self.conv1d, xBC, ctx.position_ids,
                                     cache=None if state is None else state["conv"], cp=ctx.cp)
        xs, Bm, Cm = F.silu(xBC).split([E, G * N, G * N], dim=-1)
        A = -torch.exp(self.A_log.to(torch.promote_types(self.A_log.dtype, torch.float32)))  # (H,), fp32 at least
        y, ssm = ssd(xs.view(Bt, T, H, P), dt, A,
                     Bm.view(Bt, T, G, N), Cm.view(Bt, T, G, N), D=self.D, dt_bias=self.dt_bias,
                     dt_limit=tuple(cfg.dt_limit), initial_state=None if state is None else state["ssm"],
                     doc_starts=ctx.doc_starts, return_state=True, chunk=cfg.chunk, cp=ctx.cp,
                     impl=cfg.impl)
        out = self.out_proj(self.norm(y.reshape(Bt, T, E), z))
        return out, ({"conv": conv_cache, "ssm": ssm} if ctx.want_state else None)

    def mixing_flops_per_token(self, seq_len: int) -> float:
        # Per token, over a whole chunk of Q tokens: C B^T once per group (2 Q N G), the scores
        # times dt x per head (2 Q P H), the read of the carried state and the state update
        # (2 x 2 N P H). The conv's taps are parameters, counted by the model.
        cfg = self.cfg
        Q = min(cfg.chunk, seq_len)
        P, N = cfg.head_dim, cfg.d_state
        return 2 * Q * N * cfg.n_groups + self.n_heads * (2 * Q * P + 4 * N * P)

    def state_bytes(self, seq_len: int, bytes_per_elem: int = 2) -> int:
        # The SSM state (H P N, fp32 whatever the model dtype) and the last W-1 conv inputs; flat in seq_len.
        cfg = self.cfg
        return self.n_heads * cfg.head_dim * cfg.d_state * 4 + (cfg.d_conv - 1) * self.conv_dim * bytes_per_elem
