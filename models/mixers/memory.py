"""`memory`: the Titans neural long-term memory (LMM) as a sequence-mixing layer.

Legend: B batch, T tokens, D model width, H heads, K head dim, W conv taps.

Paper §4.4 block, per head:
    q, k, v = SiLU(causal depthwise conv(x W_{q,k,v})); q, k l2-normalised
    theta   = theta_max * sigmoid(x w_theta + b_theta)    inner learning rate
    eta     = sigmoid(x w_eta + b_eta)                    momentum
    alpha   = sigmoid(x w_alpha + b_alpha)                forget (weight decay)
    m       = loom.kernels.memory.neural_memory(q, k, v, theta, eta, alpha, W0)
    y       = (RMSNorm(m) * sigmoid(x W_g)) W_o      W_g: D -> H*K (output_gate: elementwise),
                                                  D -> H (headwise) or absent (none)
The conv comes before the SiLU, as in the linear-recurrent models the paper
follows (fla's ShortConvolution); it never reaches into an earlier document.

Decisions (paper silent or unstable as written):
- retrieval "token": m_t = M_{W_t}(q_t), the paper's read after write, exact per token.
- theta_max defaults to 1 / (2 chunk_size): a chunk's summed step cannot overshoot.
- memory_norm (default on): M(x) = rmsnorm(MLP(x)) * gamma. The paper's plain
  deep MLP diverged within a few hundred tokens once training grew its weights
  (its curvature grows with them).
- Document starts (position 0) reset the memory to its learned W0 and zero momentum.
- momentum_step "token" (default) is the paper's per-token recurrence; "chunk" steps
  momentum and decay once per chunk (titans-pytorch's rule, with the chunk's first
  token's gates so that it stays causal at any split), for half the chunk-end work.

The same code runs at training, evaluation and generation: the memory keeps
learning from the context at test time.

Interleaved with `swa` this is the paper's MAL (recipes/titans-mal*.yaml).
Persistent memory tokens are not used here: prepending learned,
data-independent tokens to a memory layer's input only moves its starting
point, which the learned W0 already is; MAG and MAC give them to attention.

Context parallelism (ctx.cp, passed on as `cp`): the conv's W-1 previous
inputs come from the preceding chunk's rank (kernels.sequence.with_halo) and the
op carries the memory state rank to rank in global chunk order (serialised, so
it takes about as long as on one process). Training only: no state.

Decoding state: {"conv": (B, W-1, 3*H*K) last pre-conv projections,
"memory": loom.kernels.memory.MemoryState}.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from loom.kernels.memory import init_memory_weights, neural_memory
from loom.models.config import ranged
from loom.models.mixers.base import Mixer, MixerDims, SeqContext, register
from loom.models.mixers.conv import ShortConv, short_conv
from loom.models.norms import RMSNorm


@dataclass
class MemoryOptions:
    """The memory's options, shared by `memory`, `titans_mag` and `titans_mac`."""

    chunk_size: int = ranged(64, ge=1)           # tokens whose gradients are taken at the same weights
    depth: int = ranged(2, ge=1)                 # memory MLP layers; 1 = linear memory
    expansion: int = ranged(4, ge=1)             # hidden width = expansion * head_dim (depth >= 2)
    activation: Literal["gelu", "silu"] = "gelu"
    retrieval: Literal["token", "chunk"] = "token"  # read after each token's write, or at chunk start
    # momentum and decay step at every token (the paper's recurrence) or once per chunk, with the gates
    # of its first token (titans-pytorch's rule; one chunk-end sum per layer instead of two)
    momentum_step: Literal["token", "chunk"] = "token"
    conv_size: int = ranged(4, ge=0)             # causal depthwise conv taps on q, k, v; 0 disables
    theta_max: float | None = ranged(None, gt=0)  # upper bound of the inner learning rate; None: 1 / (2 chunk_size)
    memory_norm: bool = True       # M(x) = rmsnorm(MLP(x)) * gamma; False: the paper's plain MLP
    # loom.kernels.memory backend: auto/chunked (eager) or compiled (torch.compile of each chunk block:
    # ~1.25x faster on CPU once compiled, seconds of compilation per new shape; not under cp)
    impl: Literal["auto", "chunked", "compiled"] = "auto"

    def __post_init__(self):
        if self.chunk_size < 1 or self.depth < 1 or self.expansion < 1 or self.conv_size < 0:
            raise ValueError("chunk_size, depth and expansion must be >= 1 and conv_size >= 0")
        if self.theta_max is not None and not self.theta_max > 0:
            raise ValueError(f"theta_max must be > 0; got {self.theta_max}")

    @property
    def lr_bound(self) -> float:
        """A chunk's b gradients are summed at one point, so on b identical unit-norm keys the
        step is 2 b theta times the error; theta <= 1 / (2 b) keeps that from overshooting
        (heavy-ball momentum is stable up to (1 + eta) times that). Larger values diverged
        at initialisation in the CPU recipes."""
        return self.theta_max if self.theta_max is not None else 1.0 / (2 * self.chunk_size)


class NeuralMemory(nn.Module):
    """Projections, conv, gates and W0 around the memory op.

    forward(x (B, T, D_in), position_ids (B, T), state, mask) -> (y (B, T, H, K), new_state)."""

    def __init__(self, d_in: int, n_heads: int, head_dim: int, opts: MemoryOptions):
        super().__init__()
        self.opts, self.n_heads, self.head_dim = opts, n_heads, head_dim
        HK = n_heads * head_dim
        self.q_proj = nn.Linear(d_in, HK, bias=False)
        self.k_proj = nn.Linear(d_in, HK, bias=False)
        self.v_proj = nn.Linear(d_in, HK, bias=False)
        self.conv = ShortConv(3 * HK, opts.conv_size) if opts.conv_size > 1 else None
        self.gate_proj = nn.Linear(d_in, 3 * n_heads, bias=True)  # theta, eta, alpha logits
        sizes = init_memory_weights(n_heads, head_dim, opts.depth, opts.expansion)
        self.w0 = nn.ParameterList(nn.Parameter(torch.empty_like(w)) for w in sizes)
        self.norm_weight = nn.Parameter(torch.empty(n_heads, head_dim)) if opts.memory_norm else None

    def reset_parameters(self) -> None:
        """W0: Xavier-uniform per head. Output gamma: 1/sqrt(K), unit-norm reads like the
        unit-norm keys. Gate biases: theta starts at theta_max / 2, eta at 0.9 (momentum),
        alpha at 0.01 (little forgetting). Conv: Conv1d default."""
        for w, w_init in zip(self.w0, init_memory_weights(self.n_heads, self.head_dim, self.opts.depth,
                                                           self.opts.expansion)):
            w.data.copy_(w_init)
        if self.norm_weight is not None:
            nn.init.constant_(self.norm_weight, self.head_dim ** -0.5)
        H = self.n_heads
        with torch.no_grad():
            self.gate_proj.bias[:H].fill_(0.0)
            self.gate_proj.bias[H:2 * H].fill_(math.log(0.9 / 0.1))
            self.gate_proj.bias[2 * H:].fill_(math.log(0.01 / 0.99))
        if self.conv is not None:
            self.conv.reset_parameters()

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, state: dict | None = None,
                mask: torch.Tensor | None = None, lengths: torch.Tensor | None = None, cp=None):
        """x (B, T, D), position_ids (B, T) -> y (B, T, H, K), state. Under context
        parallelism (`cp` a CPContext, x and position_ids this rank's shard) the conv's
        previous taps come from the preceding chunk's owner and the op carries the memory
        state rank to rank; no state in or out."""
        B, T, _ = x.shape
        H, K = self.n_heads, self.head_dim
        qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)  # (B, T, 3*H*K)
        conv_cache = None
        if self.conv is not None:
            qkv, conv_cache = short_conv(self.conv, qkv, position_ids, None if state is None else state["conv"],
                                          lengths, cp)
        q, k, v = F.silu(qkv).view(B, T, 3, H, K).unbind(2)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        g = torch.sigmoid(self.gate_proj(x).to(torch.promote_types(x.dtype, torch.float32))).view(B, T, 3, H)
        theta, eta, alpha = self.opts.lr_bound * g[:, :, 0], g[:, :, 1], g[:, :, 2]
        reset = position_ids == 0
        if mask is not None:
            reset = reset & mask
        y, mem = neural_memory(q, k, v, theta, eta, alpha, list(self.w0), chunk_size=self.opts.chunk_size,
                               state=None if state is None else state["memory"], reset=reset, mask=mask,
                               activation=self.opts.activation, retrieval=self.opts.retrieval,
                               norm_weight=self.norm_weight, momentum_step=self.opts.momentum_step,
                               return_state=True, impl=self.opts.impl, cp=cp)
        return y, {"conv": conv_cache, "memory": mem}

    def state_bytes(self, bytes_per_elem: int) -> int:
        n_weights = sum(w.numel() for w in self.w0)
        conv = (self.opts.conv_size - 1) * 3 * self.n_heads * self.head_dim if self.conv is not None else 0
        return (3 * n_weights + conv) * bytes_per_elem  # weights, momentum, chunk-start weights

    def flops_per_token(self) -> float:
        """Forward FLOPs per token of the memory op: 2 per weight for the keys' forward, ~2 for
        the hand backward, 4 for the two chunk-end sums (2 for the one of momentum_step="chunk"),
        2 for a chunk-start read; the per-token read adds 2 (momentum term) plus the masked
        (C x C) products."""
        n_weights = sum(w.numel() for w in self.w0)
        per_weight = 10.0 if self.opts.momentum_step == "token" else 8.0
        if self.opts.retrieval == "chunk":
            return per_weight * n_weights
        widths = sum(w.shape[1] + w.shape[2] for w in self.w0) * self.n_heads
        return (per_weight + 2.0) * n_weights + 2.0 * self.opts.chunk_size * widths


@dataclass
class MemoryMixerConfig(MemoryOptions):
    # sigma(x W_g) on the normed read: one value per channel (D -> H*K, the paper's output gate),
    # one per head (D -> H, as titans-pytorch's retrieve gate) or none.
    output_gate: Literal["elementwise", "headwise", "none"] = "elementwise"


@register("memory")
class Memory(Mixer):
    Config = MemoryMixerConfig
    # The impl only matters for softmax layers; the memory always carries its state rank to rank.
    cp_impls = ("ring", "ulysses")

    def __init__(self, dims: MixerDims, cfg: MemoryMixerConfig):
        super().__init__(dims, cfg)
        H, K = dims.n_heads, dims.head_dim
        self.memory = NeuralMemory(dims.d_model, H, K, cfg)
        self.out_norm = RMSNorm(K, 1e-6)
        gate_width = {"elementwise": H * K, "headwise": H, "none": 0}[cfg.output_gate]
        self.gate_proj = nn.Linear(dims.d_model, gate_width, bias=False) if gate_width else None
        self.o_proj = nn.Linear(H * K, dims.d_model, bias=False)

    def reset_parameters(self) -> None:
        self.memory.reset_parameters()

    def forward(self, x: torch.Tensor, ctx: SeqContext, state=None):
        B, T, _ = x.shape
        y, new_state = self.memory(x, ctx.position_ids, state, cp=ctx.cp)
        y = self.out_norm(y.to(x.dtype))
        if self.gate_proj is not None:
            y = y * torch.sigmoid(self.gate_proj(x)).view(B, T, y.shape[2], -1)
        return self.o_proj(y.reshape(B, T, -1)), new_state if ctx.want_state else None

    def mixing_flops_per_token(self, seq_len: int) -> float:
        return self.memory.flops_per_token()

    def state_bytes(self, seq_len: int, bytes_per_elem: int = 2) -> int:
        return self.memory.state_bytes(bytes_per_elem)
