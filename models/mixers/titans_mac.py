"""`titans_mac`: Titans Memory-as-Context. Each segment attends over persistent
tokens, what the memory recalls for it, and itself; then the memory learns
from the attention output.

Legend: B batch, T tokens, D model width, H query heads, G key/value heads,
K head dim, N segments (blocks) per row, C slots per block (<= segment).

Segments are `segment` tokens of a document, on a grid that restarts at every
document start (position 0), like the memory's chunks; `segment` must be a
multiple of `chunk_size`, so segments start on chunk boundaries. For
segment i with memory weights W^(i-1) at its start:

    h = M_{W^(i-1)}(q_r)          q_r = l2norm(SiLU(conv(x W_r))): the memory's recall for each token
    a = Attn([P ; h ; x])         x: the segment itself. Token t sees all of P, and h_j and x_j for j <= t
    memory update with a          (keys, values and queries of the memory come from a, gates too)
    m_t = M_{W_t}(q_t(a))         read after write, per token (retrieval="token" keeps this causal)
    o = RMSNorm_a(a) * sigmoid(RMSNorm_b(m)),   y = o W_o

Choices where the paper leaves room:
- h is masked causally (h_j for j <= t). The paper's unmasked prefix would let token t
  see h_j of later tokens j.
- The memory tokens h get their own key/value projections (H*K -> G*K) and the
  RoPE position of their token.
- The output gate o = a ⊗ M(a) is written as above.

Segments depend on each other through the memory, so this mixer loops over
segments. Rows whose documents start at different tokens are laid out per
document (loom.kernels.memory.doc_chunks).

Decoding state:
- "memory": the memory branch's state.
- "read_conv": the conv cache of q_r.
- "seg": keys and values (k_h, v_h, k_x, v_x), each (B, segment, G, K). They hold the
  current segment's earlier tokens, right-aligned (the last `position % segment` entries are live).
- "seg_weights": W^(i-1) of the current segment.
- "fill": (B,) int64 tokens of the current segment already seen (exact even for a row
  that began inside a document, which its positions alone do not tell).

The layer runs through kernels.sequence.stateful_scan with its decoding state as
a flat tuple of tensors. Under context parallelism (ctx.cp) every part of
a segment depends on the memory weights at its start, so the whole layer is the
pipeline stage: the local chunks run in global order with that state carried
rank to rank. Serialised: the layer takes about its single-process time.
Training only: no state in or out.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loom.kernels.sequence import stateful_scan
from loom.kernels.memory import MemoryState, doc_chunks, memory_read
from loom.models.config import ranged
from loom.models.mixers.base import Mixer, MixerDims, SeqContext, register
from loom.models.mixers.conv import ShortConv
from loom.models.mixers.memory import MemoryOptions, NeuralMemory
from loom.models.mixers.titans_attention import PersistentKV, masked_attention
from loom.models.norms import RMSNorm
from loom.models.rope import Rotary, apply_rotary


@dataclass
class MACConfig(MemoryOptions):
    segment: int = ranged(256, ge=1)       # attention span; a multiple of chunk_size
    persistent: int = ranged(4, ge=0)      # persistent memory tokens; 0 disables
    rope: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.segment < 1 or self.segment % self.chunk_size:
            raise ValueError(f"segment ({self.segment}) must be a positive multiple of chunk_size "
                             f"({self.chunk_size})")
        if self.persistent < 0:
            raise ValueError(f"persistent must be >= 0; got {self.persistent}")


@register("titans_mac")
class TitansMAC(Mixer):
    Config = MACConfig
    # The impl only matters for full softmax layers; this layer always carries its state rank to rank.
    cp_impls = ("ring", "ulysses")

    def __init__(self, dims: MixerDims, cfg: MACConfig):
        super().__init__(dims, cfg)
        D, H, G, K = dims.d_model, dims.n_heads, dims.n_kv_heads, dims.head_dim
        self.q_proj = nn.Linear(D, H * K, bias=False)
        self.k_proj = nn.Linear(D, G * K, bias=False)
        self.v_proj = nn.Linear(D, G * K, bias=False)
        self.hk_proj = nn.Linear(H * K, G * K, bias=False)   # keys and values of the memory tokens h
        self.hv_proj = nn.Linear(H * K, G * K, bias=False)
        self.read_proj = nn.Linear(D, H * K, bias=False)    # the memory's queries for h
        self.read_conv = ShortConv(H * K, cfg.conv_size) if cfg.conv_size > 1 else None
        self.rotary = Rotary(K, dims.rope) if cfg.rope else None
        self.persistent = PersistentKV(cfg.persistent, G, K, dims.init_std) if cfg.persistent else None
        self.memory = NeuralMemory(H * K, H, K, cfg)         # learns from the attention output
        self.attn_norm = RMSNorm(K, 1e-6)
        self.mem_norm = RMSNorm(K, 1e-6)
        self.o_proj = nn.Linear(H * K, D, bias=False)

    def reset_parameters(self) -> None:
        self.memory.reset_parameters()
        if self.read_conv is not None:
            self.read_conv.reset_parameters()
        if self.persistent is not None:
            self.persistent.reset_parameters()

    def _rope(self, x, pos):
        if self.rotary is None:
            return x
        cos, sin = self.rotary(pos)
        return apply_rotary(x, cos, sin)

    def forward(self, x: torch.Tensor, ctx: SeqContext, state=None):
        def step(pieces, flat):
            y, st = self._segments(*pieces, None if flat is None else self._state_from_tensors(flat))
            return y, self._state_to_tensors(st)

        params = [p for p in self.parameters() if p.requires_grad]
        y, flat = stateful_scan(step, [x, ctx.position_ids], params,
                                state=None if state is None else self._state_to_tensors(state), cp=ctx.cp)
        return y, (self._state_from_tensors(flat) if ctx.want_state else None)

    def _segments(self, x: torch.Tensor, pos: torch.Tensor, state: dict | None):
        """x (B, T, D), pos (B, T) -> y (B, T, D) and the state after these tokens."""
        B, T, _ = x.shape
        H, G, K = self.dims.n_heads, self.dims.n_kv_heads, self.dims.head_dim
        Cs = self.cfg.segment
        q = self._rope(self.q_proj(x).view(B, T, H, K), pos)
        kx = self._rope(self.k_proj(x).view(B, T, G, K), pos)
        vx = self.v_proj(x).view(B, T, G, K)
        rq = self.read_proj(x)
        read_cache = None
        if self.read_conv is not None:
            rq, read_cache = self.read_conv(rq, pos, None if state is None else state["read_conv"])
        rq = F.normalize(F.silu(rq).view(B, T, H, K), dim=-1)

        # Tokens of the current segment already seen (0 at a document start).
        fill = torch.zeros(B, dtype=torch.long, device=x.device) if state is None else \
            torch.where(pos[:, 0] == 0, 0, state["fill"])
        lay = doc_chunks(pos == 0, fill, T, Cs)
        N, C = lay.n_blocks, lay.width
        qb, kxb, vxb, rqb = (lay.to_blocks(t).unbind(1) for t in (q, kx, vx, rq))
        posb = lay.to_blocks(pos).unbind(1)
        slot = torch.arange(C, device=x.device)
        causal = slot[None, :, None] >= slot[None, None, :]                     # (1, C, C)

        W0 = tuple(w[None] for w in self.memory.w0)
        mem_state = None if state is None else state["memory"]
        weights = W0 if mem_state is None else mem_state["memory"].weights     # current W per row
        read_last = W0 if state is None else state["seg_weights"]
        outs, khs, vhs = [], [], []
        for n in range(N):
            length = lay.length[:, n]
            restart = lay.block_reset[:, n].view(B, 1, 1, 1)
            read_w = tuple(torch.where(restart, w0, w) for w0, w in zip(W0, weights))
            if n == 0 and state is not None:  # a segment continued from the last call reads its start weights
                cont = (fill > 0).view(B, 1, 1, 1)
                read_w = tuple(torch.where(cont, s, w) for s, w in zip(state["seg_weights"], read_w))
            h = memory_read(read_w, rqb[n], self.memory.opts.activation,
                            self.memory.norm_weight).to(x.dtype)  # (B, C, H, K)
            kh = self._rope(self.hk_proj(h.flatten(-2)).view(B, C, G, K), posb[n])
            vh = self.hv_proj(h.flatten(-2)).view(B, C, G, K)
            keys, vals = [kh, kxb[n]], [vh, vxb[n]]
            visible = [causal.expand(B, C, C)] * 2
            if n == 0 and state is not None:
                live = torch.arange(Cs, device=x.device)[None, :] >= Cs - fill[:, None]  # (B, Cs)
                keys = [state["seg"][0], state["seg"][2]] + keys
                vals = [state["seg"][1], state["seg"][3]] + vals
                visible = [live[:, None, :].expand(B, C, Cs)] * 2 + visible
            a = masked_attention(qb[n], torch.cat(keys, 1), torch.cat(vals, 1), torch.cat(visible, -1),
                                 self.persistent)
            real = slot[None, :] < length[:, None]
            m, mem_state = self.memory(a.flatten(-2), posb[n], mem_state, mask=real, lengths=length)
            outs.append(self.attn_norm(a) * torch.sigmoid(self.mem_norm(m.to(a.dtype))))
            khs.append(kh)
            vhs.append(vh)
            weights = mem_state["memory"].weights
            has = (length > 0).view(B, 1, 1, 1)
            read_last = tuple(torch.where(has, r, p) for r, p in zip(read_w, read_last))
        o = lay.from_blocks(torch.stack(outs, 1), T)
        y = self.o_proj(o.reshape(B, T, -1))
        seg = []
        for i, new in enumerate((torch.stack(khs, 1), torch.stack(vhs, 1), kx, vx)):
            new = lay.from_blocks(new, T) if i < 2 else new
            old = new.new_zeros(B, Cs, G, K) if state is None else state["seg"][i]
            seg.append(torch.cat([old, new], 1)[:, -Cs:])  # right-aligned: the current segment is at the end
        return y, {"memory": mem_state, "read_conv": read_cache, "seg": tuple(seg), "seg_weights": read_last,
                   "fill": lay.end_offset}

    def _state_to_tensors(self, st: dict) -> tuple[torch.Tensor, ...]:
        """The decoding state as a flat tuple (which entries exist depends only on the config)."""
        mem = st["memory"]["memory"]
        opt = lambda t: () if t is None else (t,)  # noqa: E731
        return (*opt(st["memory"]["conv"]), *mem.weights, *mem.momentum, *mem.base, mem.offset,
                *opt(st["read_conv"]), *st["seg"], *st["seg_weights"], st["fill"])

    def _state_from_tensors(self, ts) -> dict:
        it, depth = iter(ts), len(self.memory.w0)
        take = lambda n: tuple(next(it) for _ in range(n))  # noqa: E731
        conv = next(it) if self.memory.conv is not None else None
        weights, momentum, base, offset = take(depth), take(depth), take(depth), next(it)
        read_conv = next(it) if self.read_conv is not None else None
        seg, seg_weights, fill = take(4), take(depth), next(it)
        return {"memory": {"conv": conv, "memory": MemoryState(weights, momentum, base, offset)},
                "read_conv": read_conv, "seg": seg, "seg_weights": seg_weights, "fill": fill}

    def mixing_flops_per_token(self, seq_len: int) -> float:
        # A query sees about half its segment twice (tokens and their memory tokens) plus P.
        visible = min(self.cfg.segment, seq_len) + 1 + self.cfg.persistent
        read = 2.0 * sum(w.numel() for w in self.memory.w0)
        return 4 * self.dims.n_heads * self.dims.head_dim * visible + self.memory.flops_per_token() + read

    def state_bytes(self, seq_len: int, bytes_per_elem: int = 2) -> int:
        seg = 4 * self.cfg.segment * self.dims.n_kv_heads * self.dims.head_dim
        read = sum(w.numel() for w in self.memory.w0)
        conv = (self.cfg.conv_size - 1) * self.dims.n_heads * self.dims.head_dim if self.read_conv else 0
        return (seg + read + conv) * bytes_per_elem + self.memory.state_bytes(bytes_per_elem)
