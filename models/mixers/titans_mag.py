"""`titans_mag`: Titans Memory-as-Gate. Sliding-window attention and the neural
memory read the same input in parallel; the memory gates the attention.

Legend: B batch, T tokens, S cached + new keys, D model width, H query heads,
G key/value heads, K head dim.

    a = SWA([P ; x])          window `window`, the persistent tokens P always visible, RoPE
    m = LMM(x)                the `memory` branch (conv, SiLU, l2-norm, chunked memory), (B, T, H, K)
    o = RMSNorm_a(a) * sigmoid(RMSNorm_b(m))      per head, learnable channel weights
    y = o W_o

The paper only says "normalise both with learnable vector weights, then a
non-linearity"; the form above is our choice. Documents: no attention or
memory crosses a position-0 token.

The window branch is loom.kernels.swa (banded on CPU, flash-attn's window on CUDA
when there are no persistent tokens); the persistent tokens are merged
through its log-sum-exp.

Context parallelism (ctx.cp): each local chunk's window branch gets the
`window` keys before it from their owners (kernels.sequence.with_halo, any
window length) and runs the same prefix-merged kernel; the memory branch
carries its state rank to rank (see `memory`). Training only: no decoding state.

Decoding state: {"k", "v": (B, <= window, G, K) post-RoPE keys and values,
"doc": (B, <= window) their document index (as `swa`), "memory": the memory
branch's state}.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from loom.kernels.sequence import with_halo
from loom.models.config import ranged
from loom.models.mixers.base import Mixer, MixerDims, SeqContext, register
from loom.models.mixers.memory import MemoryOptions, NeuralMemory
from loom.models.mixers.attn import continue_docs
from loom.models.mixers.titans_attention import PersistentKV, window_attention_with_prefix
from loom.models.norms import RMSNorm
from loom.models.rope import Rotary, apply_rotary


@dataclass
class MAGConfig(MemoryOptions):
    window: int = ranged(512, ge=1)        # keys at most `window` tokens behind a query are visible
    persistent: int = ranged(4, ge=0)      # persistent memory tokens; 0 disables
    rope: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.window < 1 or self.persistent < 0:
            raise ValueError(f"window must be >= 1 and persistent >= 0; got {self.window}, {self.persistent}")


@register("titans_mag")
class TitansMAG(Mixer):
    Config = MAGConfig
    # The impl only matters for full softmax layers: the window branch exchanges a halo and
    # the memory carries its state rank to rank, under either.
    cp_impls = ("ring", "ulysses")

    def __init__(self, dims: MixerDims, cfg: MAGConfig):
        super().__init__(dims, cfg)
        D, H, G, K = dims.d_model, dims.n_heads, dims.n_kv_heads, dims.head_dim
        self.q_proj = nn.Linear(D, H * K, bias=False)
        self.k_proj = nn.Linear(D, G * K, bias=False)
        self.v_proj = nn.Linear(D, G * K, bias=False)
        self.rotary = Rotary(K, dims.rope) if cfg.rope else None
        self.persistent = PersistentKV(cfg.persistent, G, K, dims.init_std) if cfg.persistent else None
        self.memory = NeuralMemory(D, H, K, cfg)
        self.attn_norm = RMSNorm(K, 1e-6)
        self.mem_norm = RMSNorm(K, 1e-6)
        self.o_proj = nn.Linear(H * K, D, bias=False)

    def reset_parameters(self) -> None:
        self.memory.reset_parameters()
        if self.persistent is not None:
            self.persistent.reset_parameters()

    def forward(self, x: torch.Tensor, ctx: SeqContext, state=None):
        B, T, _ = x.shape
        K = self.dims.head_dim
        q = self.q_proj(x).view(B, T, -1, K)
        k = self.k_proj(x).view(B, T, -1, K)
        v = self.v_proj(x).view(B, T, -1, K)
        if self.rotary is not None:
            cos, sin = self.rotary(ctx.position_ids)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        doc = ctx.seq_ids
        if state is not None:
            doc = torch.cat([state["doc"], continue_docs(state["doc"], ctx.position_ids)], dim=1)
            k, v = torch.cat([state["k"], k], dim=1), torch.cat([state["v"], v], dim=1)
        a = self._window_attention(q, k, v, doc, ctx.cp)
        m, mem_state = self.memory(x, ctx.position_ids, None if state is None else state["memory"],
                                   cp=ctx.cp)
        o = self.attn_norm(a) * torch.sigmoid(self.mem_norm(m.to(a.dtype)))
        y = self.o_proj(o.reshape(B, T, -1))
        if not ctx.want_state:
            return y, None
        keep = min(k.shape[1], self.cfg.window)
        if doc is None:
            doc = torch.zeros(B, k.shape[1], dtype=torch.long, device=x.device)
        return y, {"k": k[:, -keep:], "v": v[:, -keep:], "doc": doc[:, -keep:], "memory": mem_state}

    def _window_attention(self, q, k, v, doc, cp):
        """q (B, T, H, K); k, v (B, S, G, K), the queries being the last T keys; doc (B, S) or None.
        Piece by piece: one piece on one device; under cp, each local chunk of C queries
        with the `window` keys before it (fetched from their owners) followed by its own."""
        W = self.cfg.window
        k_ext, v_ext = with_halo(k, W, cp), with_halo(v, W, cp)   # [(B, h + C, G, K)]
        doc_ext = [None] * len(k_ext) if doc is None else with_halo(doc, W, cp)
        C = q.shape[1] // len(k_ext)
        return torch.cat([window_attention_with_prefix(q[:, i * C:(i + 1) * C], ki, vi, d, W, self.persistent)
                          for i, (ki, vi, d) in enumerate(zip(k_ext, v_ext, doc_ext))], dim=1)

    def mixing_flops_per_token(self, seq_len: int) -> float:
        visible = min(self.cfg.window + 1, (seq_len + 1) / 2) + self.cfg.persistent
        return 4 * self.dims.n_heads * self.dims.head_dim * visible + self.memory.flops_per_token()

    def state_bytes(self, seq_len: int, bytes_per_elem: int = 2) -> int:
        kv = 2 * min(seq_len, self.cfg.window) * self.dims.n_kv_heads * self.dims.head_dim * bytes_per_elem
        return kv + self.memory.state_bytes(bytes_per_elem)
