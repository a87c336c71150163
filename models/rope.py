"""Rotary position embeddings with context-extension scalings.

Convention: rotate-half (as Llama/Qwen in transformers), so converted
checkpoints need no permutation. Scalings, chosen by `RopeConfig.scaling`:
  none    plain RoPE, inv_freq_i = base^(-2i/K)
  linear  position interpolation: positions divided by `factor`
  ntk     NTK-aware: base multiplied by factor^(K/(K-2))
  yarn    YaRN: per-frequency blend of interpolation and extrapolation
          (ramp between beta_fast and beta_slow rotations over
          `original_max_len`) and attention temperature 0.1 ln(factor) + 1
  llama3  Llama 3.1's band-wise frequency scaling

Partial rotary (`fraction` < 1, Qwen3.5 / Qwen3-Next use 0.25): only the first
R = int(K * fraction) dims of each head rotate (rotate-half within those R), the
other K - R pass through unchanged, and the frequencies are those of a head of
size R (base^(-2i/R)), as transformers computes them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from loom.kernels.rotary import rotate
from loom.models.config import ranged


@dataclass(frozen=True)
class RopeConfig:
    base: float = ranged(10000.0, gt=1)
    scaling: Literal["none", "linear", "ntk", "yarn", "llama3"] = "none"
    factor: float = ranged(1.0, gt=0)
    original_max_len: int = ranged(4096, ge=1)
    beta_fast: float = ranged(32.0, gt=0)
    beta_slow: float = ranged(1.0, gt=0)
    low_freq_factor: float = ranged(1.0, gt=0)
    high_freq_factor: float = ranged(4.0, gt=0)


def inv_frequencies(head_dim: int, cfg: RopeConfig) -> tuple[torch.Tensor, float]:
    """Returns (inv_freq of shape (K/2,), attention scaling of cos/sin).

    Computed in float32 in the same order of operations as Meta's Llama code
    and transformers: pretrained checkpoints learned these exact fp32 values
    (a float64 table differs by 1-2 ulp, a phase error that grows with the
    position), and imported models then match their source bit for bit.
    """
    k = head_dim
    base = cfg.base
    if cfg.scaling == "ntk":
        base = base * cfg.factor ** (k / (k - 2))
    pos_freqs = base ** (torch.arange(0, k, 2, dtype=torch.int64).float() / k)  # (K/2,) fp32
    inv = 1.0 / pos_freqs
    mscale = 1.0
    if cfg.scaling == "linear":
        inv = inv / cfg.factor
    elif cfg.scaling == "yarn":
        def dim_for(rotations: float) -> float:
            return (k * math.log(cfg.original_max_len / (rotations * 2 * math.pi))) / (2 * math.log(cfg.base))

        low = max(math.floor(dim_for(cfg.beta_fast)), 0)
        high = min(math.ceil(dim_for(cfg.beta_slow)), k - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(k // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        extrapolate = 1 - ramp  # 1 for high frequencies: keep them as they are
        inv = (1.0 / (cfg.factor * pos_freqs)) * (1 - extrapolate) + inv * extrapolate
        mscale = 0.1 * math.log(cfg.factor) + 1.0 if cfg.factor > 1 else 1.0
    elif cfg.scaling == "llama3":
        low_wavelen = cfg.original_max_len / cfg.low_freq_factor
        high_wavelen = cfg.original_max_len / cfg.high_freq_factor
        wavelen = 2 * math.pi / inv
        smooth = (cfg.original_max_len / wavelen - cfg.low_freq_factor) / (cfg.high_freq_factor - cfg.low_freq_factor)
        scaled = torch.where(wavelen > low_wavelen, inv / cfg.factor, inv)
        mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        inv = torch.where(mid, (1 - smooth) * inv / cfg.factor + smooth * inv, scaled)
    return inv, mscale


class Rotary(nn.Module):
    """cos/sin tables for arbitrary position ids.

    Example:
        rope = Rotary(64, RopeConfig())
        cos, sin = rope(position_ids)          # (B, T, K) each
        q = apply_rotary(q, cos, sin)           # q: (B, T, H, K)
    """

    def __init__(self, head_dim: int, cfg: RopeConfig, fraction: float = 1.0):
        super().__init__()
        self.rotary_dim = rotary_dim(head_dim, fraction)
        inv, self.mscale = inv_frequencies(self.rotary_dim, cfg)
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = position_ids.to(torch.float32)[..., None] * self.inv_freq  # (B, T, K/2)
        angles = torch.cat([angles, angles], dim=-1)  # (B, T, K)
        return angles.cos() * self.mscale, angles.sin() * self.mscale


def rotary_dim(head_dim: int, fraction: float) -> int:
    """R = int(head_dim * fraction), the rotated dims of each head; ValueError unless 0 < R and,
    for a partial rotary, R is even."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"rope_fraction must be in (0, 1]; got {fraction}")
    r = int(head_dim * fraction)
    if r < head_dim and (r < 2 or r % 2):
        raise ValueError(f"rope_fraction {fraction} of head_dim {head_dim} rotates {r} dims; it must be an even "
                         f"number >= 2")
    return r


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, H, K); cos, sin: (B, T, R) with R <= K: the first R dims of each head
    rotate, the rest pass. Computed in fp32 (fp64 for fp64 x), returned in x's dtype."""
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    R = cos.shape[-1]
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    if R == x.shape[-1]:
        return rotate(xf, c, s).to(x.dtype)
    return torch.cat([rotate(xf[..., :R], c, s), xf[..., R:]], dim=-1).to(x.dtype)
