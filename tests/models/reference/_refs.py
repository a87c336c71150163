"""Shared pieces of the per-mixer reference tests.

Each test file under this folder holds an independent reference of one mixer,
written from its paper's equations, token by token in float64. The reference
functions read only the weight tensors of the built mixer (`W(m, "q_proj")`);
they import nothing from loom.models or loom.kernels. The helpers below are the
equations every reference shares (RoPE in closed form, RMSNorm, a causal
depthwise conv that stops at document starts), written here once, from the papers.

Legend: B batch, T tokens, D model width, H heads, G kv heads, K head dim.
"""
from __future__ import annotations

import math

import torch

from loom.models.mixers import MIXERS
from loom.models.mixers.base import MixerDims, SeqContext
from loom.models.rope import RopeConfig

D, H, G, K = 32, 4, 2, 8
TOL = dict(rtol=1e-9, atol=1e-9)
# fp32 RoPE tables inside the mixer (as pretrained checkpoints learned them) against fp64 here
ROPE_TOL = dict(rtol=1e-5, atol=1e-5)


def build(kind: str, *, model_rope: RopeConfig | None = None, layer_idx: int = 1, n_layers: int = 3,
          init_scale: float = 0.4, seed: int = 0, **opts):
    """The registered mixer `kind` with options `opts`, every parameter drawn at random
    (no parameter left at an identity or zero init, so every weight reaches the output), fp64."""
    dims = MixerDims(d_model=D, n_heads=H, n_kv_heads=G, head_dim=K,
                     layer_idx=layer_idx, n_layers=n_layers, rope=model_rope or RopeConfig(base=100.0))
    cls = MIXERS[kind]
    m = cls(dims, cls.Config(**opts))
    m.reset_parameters()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            fan_in = p.shape[-1] if p.dim() >= 2 else 1
            p.add_(torch.randn(p.shape, generator=gen) * init_scale / math.sqrt(fan_in) if p.dim() >= 2
                   else torch.randn(p.shape, generator=gen) * 0.3)
    return m.double()


def W(m, name: str) -> torch.Tensor:
    """The fp64 tensor of the parameter (or buffer) `name` of mixer m, detached."""
    return m.get_parameter(name).detach().double() if name in dict(m.named_parameters()) \
        else m.get_buffer(name).detach().double()


def packed(lengths_per_row: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids and seq_ids (B, T) for rows made of documents of the given lengths."""
    pos, seq = [], []
    for lengths in lengths_per_row:
        pos.append(torch.cat([torch.arange(n) for n in lengths]))
        seq.append(torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]))
    return torch.stack(pos), torch.stack(seq)


# Row 0 one document of T tokens, row 1 three documents (awkward lengths).
LAYOUTS = {13: [[13], [5, 1, 7]], 37: [[37], [11, 19, 7]]}


def inputs(T: int, seed: int = 1, d_model: int = D):
    lengths = LAYOUTS[T]
    pos, seq = packed(lengths)
    x = torch.randn(len(lengths), T, d_model, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x, pos, seq


def run(m, x, pos, seq):
    """The mixer's forward on x (B, T, D) with packed documents."""
    y, _ = m(x, SeqContext(position_ids=pos, seq_ids=seq))
    return y


def lin(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w^T + b (nn.Linear's layout of w: (out, in))."""
    y = x @ w.T
    return y if b is None else y + b


def sigmoid(x):
    return 1.0 / (1.0 + torch.exp(-x))


def silu(x):
    return x * sigmoid(x)


def rms_norm(x, w=None, eps=1e-6):
    y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
    return y if w is None else y * w


def doc_start_index(pos: torch.Tensor, t: int) -> int:
    """Index of the first token of token t's document (pos is one row)."""
    return t - int(pos[t])


# ---- RoPE, closed forms (Su et al.; Chen et al. PI; bloc97 NTK; Peng et al. YaRN; Llama 3.1) ----

def rope_inv_freq(R: int, cfg: RopeConfig) -> tuple[torch.Tensor, float]:
    """(inv_freq (R/2,) fp64, cos/sin scale) of RoPE with `cfg`'s scaling over R rotated dims."""
    i = torch.arange(R // 2, dtype=torch.float64)
    base, s = cfg.base, cfg.factor
    if cfg.scaling == "ntk":  # NTK-aware: base' = base * s^(R / (R - 2))
        base = base * s ** (R / (R - 2))
    theta = base ** (-2 * i / R)
    if cfg.scaling in ("none", "ntk"):
        return theta, 1.0
    if cfg.scaling == "linear":  # position interpolation: m -> m / s
        return theta / s, 1.0
    L = cfg.original_max_len
    if cfg.scaling == "yarn":
        # dimension d whose wavelength completes r rotations in L tokens: L / (2 pi base^(2d/R)) = r
        d = lambda r: R * math.log(L / (r * 2 * math.pi)) / (2 * math.log(cfg.base))  # noqa: E731
        lo, hi = max(math.floor(d(cfg.beta_fast)), 0), min(math.ceil(d(cfg.beta_slow)), R - 1)
        hi = hi + 0.001 if lo == hi else hi
        gamma = ((i - lo) / (hi - lo)).clamp(0, 1)  # 0: extrapolate (keep), 1: interpolate (divide by s)
        inv = theta * (1 - gamma) + theta / s * gamma
        return inv, (0.1 * math.log(s) + 1.0) if s > 1 else 1.0
    if cfg.scaling == "llama3":
        wavelen = 2 * math.pi / theta
        lo_w, hi_w = L / cfg.low_freq_factor, L / cfg.high_freq_factor
        smooth = (L / wavelen - cfg.low_freq_factor) / (cfg.high_freq_factor - cfg.low_freq_factor)
        out = torch.where(wavelen > lo_w, theta / s, theta)
        mid = (wavelen <= lo_w) & (wavelen >= hi_w)
        return torch.where(mid, (1 - smooth) * theta / s + smooth * theta, out), 1.0
    raise ValueError(cfg.scaling)


def rope_vec(x: torch.Tensor, p: int, cfg: RopeConfig, fraction: float = 1.0) -> torch.Tensor:
    """One head vector x (..., K) rotated to position p: rotate-half pairs (i, i + R/2)
    of the first R = int(K fraction) dims, the rest unchanged."""
    Kx = x.shape[-1]
    R = int(Kx * fraction)
    inv, mscale = rope_inv_freq(R, cfg)
    a = p * inv
    c, s = torch.cos(a) * mscale, torch.sin(a) * mscale
    x1, x2, rest = x[..., :R // 2], x[..., R // 2:R], x[..., R:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, rest], dim=-1)


def causal_conv(x: torch.Tensor, w: torch.Tensor, pos: torch.Tensor, t: int) -> torch.Tensor:
    """Depthwise causal conv at token t of one row: sum_j w[:, j] x[t - j] over taps j that stay
    inside t's document. x (T, C), w (C, W)."""
    y = torch.zeros_like(x[t])
    for j in range(w.shape[1]):
        if j <= int(pos[t]):
            y = y + w[:, j] * x[t - j]
    return y
