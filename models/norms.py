"""RMSNorm in the three conventions checkpoints use, and the MLP kinds.

Legend: B batch, T tokens, D model width, F MLP hidden width.

RMSNorm, n(x) = x / sqrt(mean(x^2) + eps), computed in fp32 (fp64 for fp64 inputs):
    plain        weight * round(n(x))           (Llama, Qwen, Mistral: round to x's dtype first)
    weight_fp32  round(weight * n(x))           (OLMo 2/3: the weight multiplies in fp32)
    zero_centred round((1 + weight) * n(x))     (Gemma: weight stored as w, initialised 0)
In fp32 the first two are the same function; in bf16 they differ by one rounding,
which is why a converted model keeps its source's convention.

MLP kinds (`model.mlp_kind`), x: (B, T, D) -> (B, T, D):
    swiglu  down(silu(gate(x)) * up(x))                  Llama layout: gate_proj, up_proj, down_proj
    geglu   down(gelu_tanh(gate(x)) * up(x))             Gemma (gelu_pytorch_tanh), same names
    relu2   down(relu(up(x))^2)                          non-gated squared ReLU (Nemotron-H): up_proj, down_proj
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

MLP_KINDS = ("swiglu", "geglu", "relu2")


@dataclass(frozen=True)
class NormStyle:
    """How every RMSNorm of a model applies its weight (see the module docstring)."""

    zero_centred: bool = False
    weight_fp32: bool = False


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension. x: (..., dim) -> (..., dim), x's dtype.

    Example:
        norm = RMSNorm(256, 1e-6, NormStyle(zero_centred=True))   # Gemma's (1 + w)
        y = norm(x)
    """

    def __init__(self, dim: int, eps: float = 1e-5, style: NormStyle = NormStyle()):
        super().__init__()
        self.eps = eps
        self.zero_centred = style.zero_centred
        self.weight_fp32 = style.weight_fp32 or style.zero_centred
        self.weight = nn.Parameter(torch.zeros(dim) if style.zero_centred else torch.ones(dim))

    def reset_parameters(self) -> None:
        """Identity: weight 1 (stored as 0 when zero-centred)."""
        with torch.no_grad():
            self.weight.fill_(0.0 if self.zero_centred else 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32, or fp64 for fp64 inputs
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if not self.weight_fp32:
            return self.weight * xf.to(x.dtype)
        w = self.weight.to(xf.dtype)
        return (xf * (1.0 + w) if self.zero_centred else w * xf).to(x.dtype)


class SwiGLU(nn.Module):
    """down(act(gate(x)) * up(x)); act silu (SwiGLU) or tanh-approximated GELU (GeGLU)."""

    def __init__(self, d_model: int, hidden: int, act: str = "silu", bias: bool = False):
        super().__init__()
        if act not in ("silu", "gelu_tanh"):
            raise ValueError(f"act must be 'silu' or 'gelu_tanh'; got {act!r}")
        self.act = act
        self.gate_proj = nn.Linear(d_model, hidden, bias=bias)
        self.up_proj = nn.Linear(d_model, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate_proj(x)
        g = F.silu(g) if self.act == "silu" else F.gelu(g, approximate="tanh")
        return self.down_proj(g * self.up_proj(x))


class ReLU2(nn.Module):
    """down(relu(up(x))^2): the non-gated squared-ReLU MLP."""

    def __init__(self, d_model: int, hidden: int, bias: bool = False):
        super().__init__()
        self.up_proj = nn.Linear(d_model, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.relu(self.up_proj(x)).square())


def build_mlp(kind: str, d_model: int, hidden: int, bias: bool = False) -> nn.Module:
    """The MLP of `model.mlp_kind` (one of MLP_KINDS)."""
    if kind == "swiglu":
        return SwiGLU(d_model, hidden, "silu", bias)
    if kind == "geglu":
        return SwiGLU(d_model, hidden, "gelu_tanh", bias)
    if kind == "relu2":
        return ReLU2(d_model, hidden, bias)
    raise ValueError(f"mlp kind must be one of {MLP_KINDS}; got {kind!r}")
